"""The training loop: runs, logs, checkpoints, resumes bit-exactly."""

import json
import os

import jax
import numpy as np
import pytest

from experiments import tiny
from flamingo_jax.training import loop


class _Data:
  """Batches that are a pure function of the step (like the real pipeline)."""

  def __init__(self, config, start_step):
    self.config, self.next_step = config, start_step

  def __iter__(self):
    return self

  def __next__(self):
    batches = {}
    for index, (name, spec) in enumerate(sorted(
        self.config.data.datasets.items())):
      rng = np.random.default_rng([self.next_step, index])
      b, l, n = spec.batch_size, spec.seq_len, spec.max_media
      tokens = rng.integers(0, 64, [b, l]).astype(np.int32)
      batches[name] = dict(
          tokens=tokens, targets=np.roll(tokens, -1, axis=1),
          loss_mask=np.ones([b, l], np.float32),
          media=rng.integers(0, 255, [b, n, spec.frames, spec.image_size,
                                      spec.image_size, 3]).astype(np.uint8),
          media_mask=np.ones([b, n], bool),
          media_index=np.ones([b, l], np.int32))
    self.next_step += 1
    return batches

  def stats(self):
    return {'data/skipped/total': 0}


def _config(total_steps, every=2):
  config = tiny.get_config('smoke')
  config.stages, config.init_from = {}, []  # The loop alone, no LM stage.
  config.total_steps = total_steps
  config.log_every = 1
  config.checkpoint.every = every
  config.optim.warmup_steps = 0
  for spec in config.data.datasets.values():
    spec.batch_size = 8
  return config


def _params(state):
  return jax.tree.map(np.asarray, jax.device_get(state.trainable))


@pytest.mark.slow
def test_train_resume_is_bit_exact(tmp_path):
  full = loop.train_and_evaluate(_config(4), str(tmp_path / 'full'), _Data)
  part = str(tmp_path / 'part')
  loop.train_and_evaluate(_config(2), part, _Data)
  resumed = loop.train_and_evaluate(_config(4), part, _Data)
  jax.tree.map(np.testing.assert_array_equal, _params(full), _params(resumed))
  rows_full = loop.read_metrics(str(tmp_path / 'full'))
  rows_part = loop.read_metrics(part)
  assert [r['step'] for r in rows_full] == [1, 2, 3, 4]
  assert [r['step'] for r in rows_part] == [1, 2, 3, 4]
  assert rows_full[-1]['loss'] == rows_part[-1]['loss']
  # Frozen parameters never move; trainable ones do.
  assert int(jax.device_get(full.step)) == 4
  assert sorted(os.listdir(tmp_path / 'full' / 'checkpoints'))[-1] == '4'
  config = json.loads((tmp_path / 'full' / 'config.json').read_text())
  assert config['total_steps'] == 4
  row = rows_full[-1]
  for key in ('loss', 'grad_norm', 'learning_rate', 'steps_per_sec',
              'tokens_per_sec', 'gates/attn_gate_0', 'loss/pairs'):
    assert key in row, key
  assert any(f.startswith('events') for f in
             os.listdir(tmp_path / 'full' / 'tensorboard'))
