"""The training loop: runs, logs, checkpoints, resumes bit-exactly, stops on
a non-finite loss."""

import functools
import json
import os

import haiku as hk
import jax
import numpy as np
import pytest

from experiments import tiny
from flamingo_jax import checkpoint as checkpoint_lib
from flamingo_jax.training import loop
from flamingo_jax.training import train_step as train_step_lib


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


def _toy_task() -> loop.Task:
  """A one-matrix 'model' with the Flamingo task's interface: the loop's
  logic (checkpoints, metrics, errors) at a compile cost of seconds."""

  def forward(tokens, media, media_mask, media_index, is_training=False):
    del media, media_mask, media_index, is_training
    return hk.Embed(64, 8, name='embed')(tokens) @ hk.get_parameter(
        'out', [8, 64], init=hk.initializers.RandomNormal())

  def example_inputs(model_config):
    del model_config  # Unused.
    zeros = np.zeros([1, 4], np.int32)
    return (zeros, np.zeros([1, 1, 1, 2, 2, 3], np.uint8),
            np.ones([1, 1], bool), zeros)

  return loop.Task(lambda model_config: hk.transform(forward),
                   example_inputs, train_step_lib.make_train_step)


def _toy_config(monkeypatch, total_steps, every=2):
  """_config on the toy task, one dataset of 4-token rows."""
  monkeypatch.setitem(loop.TASKS, 'toy', _toy_task())
  config = _config(total_steps, every)
  config.task = 'toy'
  config.freeze = [('.*', 'train')]
  config.data.datasets = {'pairs': config.data.datasets.pairs}
  spec = config.data.datasets.pairs
  spec.seq_len, spec.image_size = 4, 2
  return config


def test_train_resume_is_bit_exact(tmp_path, monkeypatch):
  # The loop's resumption on 8 devices; the real model's resumption, in a
  # real process, is tests/training/test_preemption.py.
  toy = functools.partial(_toy_config, monkeypatch)
  full = loop.train_and_evaluate(toy(4), str(tmp_path / 'full'), _Data)
  part = str(tmp_path / 'part')
  loop.train_and_evaluate(toy(2), part, _Data)
  assert checkpoint_lib.saved_steps(part) == [2]
  resumed = loop.train_and_evaluate(toy(4), part, _Data)
  jax.tree.map(np.testing.assert_array_equal, _params(full), _params(resumed))
  rows_full = loop.read_metrics(str(tmp_path / 'full'))
  rows_part = loop.read_metrics(part)
  assert [r['step'] for r in rows_full] == [1, 2, 3, 4]
  assert [r['step'] for r in rows_part] == [1, 2, 3, 4]
  assert rows_full[-1]['loss'] == rows_part[-1]['loss']
  assert int(jax.device_get(full.step)) == 4
  assert checkpoint_lib.saved_steps(str(tmp_path / 'full')) == [2, 4]
  config = json.loads((tmp_path / 'full' / 'config.json').read_text())
  assert config['total_steps'] == 4
  for key in ('loss', 'grad_norm', 'learning_rate', 'steps_per_sec',
              'tokens_per_sec', 'loss/pairs', 'data/skipped/total'):
    assert key in rows_full[-1], key
  assert any(f.startswith('events') for f in
             os.listdir(tmp_path / 'full' / 'tensorboard'))


class _PoisonedData(_Data):
  """_Data whose batch of step `bad_step` (1-based) has a NaN loss mask."""

  bad_step = 3

  def __next__(self):
    step = self.next_step + 1
    batches = super().__next__()
    if step == self.bad_step:
      batches['pairs']['loss_mask'][0, 0] = np.nan
    return batches


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(
    tmp_path, monkeypatch):
  config = _toy_config(monkeypatch, total_steps=5)
  workdir = tmp_path / 'run'
  with pytest.raises(loop.NonFiniteLossError,
                     match=r'Loss is nan at step 3.* last good checkpoint '
                     r'is step 2'):
    loop.train_and_evaluate(config, str(workdir), _PoisonedData)
  assert [r['step'] for r in loop.read_metrics(str(workdir))] == [1, 2]
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['2']
  params = checkpoint_lib.load_params(str(workdir))
  assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(params))
  # A rerun resumes from that checkpoint (and stops at the same batch).
  with pytest.raises(loop.NonFiniteLossError, match='step 3'):
    loop.train_and_evaluate(config, str(workdir), _PoisonedData)
