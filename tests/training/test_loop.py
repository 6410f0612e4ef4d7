"""The training loop: runs, logs, checkpoints and resumes bit-exactly; skips,
counts and stops on non-finite steps; saves on Ctrl-C; sets a damaged
checkpoint aside; refuses by name a bad config value, a second trainer and a
checkpoint of another shape.

All on a one-matrix toy task (seconds to compile); the real model in real
processes is tests/faults/test_recipe_faults.py.
"""

import functools
import json
import os
import pathlib
import re
import signal
import subprocess
import sys

import haiku as hk
import jax
import numpy as np
import pytest

from experiments import tiny
from flamingo_jax import checkpoint as checkpoint_lib
from flamingo_jax.training import loop
from flamingo_jax.training import train_step as train_step_lib
from flamingo_jax.training import workdir as workdir_lib
from tests.faults import corrupt

_REPO = pathlib.Path(__file__).resolve().parents[2]


class _Data:
  """Batches that are a pure function of the step (like the real pipeline)."""

  def __init__(self, config, start_step, interrupt_at=None):
    self.config, self.next_step = config, start_step
    self.interrupt_at = interrupt_at  # Ctrl-C while making this step's.

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
    if self.next_step == self.interrupt_at:
      os.kill(os.getpid(), signal.SIGINT)
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

  def forward(tokens, media, media_mask, media_index, is_training=False, *,
              width):
    del media, media_mask, media_index, is_training
    return hk.Embed(64, width, name='embed')(tokens) @ hk.get_parameter(
        'out', [width, 64], init=hk.initializers.RandomNormal())

  def example_inputs(model_config):
    del model_config  # Unused.
    zeros = np.zeros([1, 4], np.int32)
    return (zeros, np.zeros([1, 1, 1, 2, 2, 3], np.uint8),
            np.ones([1, 1], bool), zeros)

  return loop.Task(
      lambda model_config: hk.transform(
          functools.partial(forward, width=model_config.lm.width)),
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
  config.model.lm.width = 8
  return config


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """An uninterrupted 4-step toy run: (workdir, final trainable params)."""
  workdir = tmp_path_factory.mktemp('reference')
  with pytest.MonkeyPatch.context() as monkeypatch:
    state = loop.train_and_evaluate(_toy_config(monkeypatch, 4),
                                    str(workdir), _Data)
  return workdir, _params(state)


def test_train_resume_is_bit_exact(tmp_path, monkeypatch, reference):
  # The loop's resumption on 8 devices; the real model's, in real processes,
  # is tests/faults/test_recipe_faults.py.
  full_dir, full = reference
  part = str(tmp_path / 'part')
  loop.train_and_evaluate(_toy_config(monkeypatch, 2), part, _Data)
  assert checkpoint_lib.saved_steps(part) == [2]
  resumed = loop.train_and_evaluate(_toy_config(monkeypatch, 4), part, _Data)
  jax.tree.map(np.testing.assert_array_equal, full, _params(resumed))
  rows_full = loop.read_metrics(str(full_dir))
  rows_part = loop.read_metrics(part)
  assert [r['step'] for r in rows_full] == [1, 2, 3, 4]
  assert [r['step'] for r in rows_part] == [1, 2, 3, 4]
  assert rows_full[-1]['loss'] == rows_part[-1]['loss']
  assert int(jax.device_get(resumed.step)) == 4
  assert checkpoint_lib.saved_steps(str(full_dir)) == [2, 4]
  assert workdir_lib.finished_step(str(full_dir)) == 4
  config = json.loads((full_dir / 'config.json').read_text())
  assert config['total_steps'] == 4
  for key in ('loss', 'grad_norm', 'learning_rate', 'steps_per_sec',
              'tokens_per_sec', 'loss/pairs', 'data/skipped/total',
              'skipped_steps'):
    assert key in rows_full[-1], key
  assert any(f.startswith('events') for f in
             os.listdir(full_dir / 'tensorboard'))


def test_a_non_finite_step_is_skipped_counted_and_never_saved(
    tmp_path, monkeypatch):
  config = _toy_config(monkeypatch, total_steps=4, every=1)
  config.debug.poison_step = 3  # NaN loss masks in step 3's batches.
  workdir = str(tmp_path / 'run')
  loop.train_and_evaluate(config, workdir, _Data)
  rows = loop.read_metrics(workdir)
  assert np.isnan(rows[2]['loss']) and np.isfinite(rows[3]['loss'])
  assert [r['skipped_steps'] for r in rows] == [0, 0, 1, 1]
  assert checkpoint_lib.saved_steps(workdir) == [2, 3, 4]
  # Step 3 changed nothing but the counters; every checkpoint is finite
  # (load_params checks).
  jax.tree.map(np.testing.assert_array_equal,
               checkpoint_lib.load_params(workdir, 2),
               checkpoint_lib.load_params(workdir, 3))


def test_non_finite_steps_in_a_row_stop_then_ctrl_c_then_resume_exactly(
    tmp_path, monkeypatch, reference):
  workdir = str(tmp_path / 'run')
  config = _toy_config(monkeypatch, total_steps=4, every=1)
  config.max_nonfinite_steps = 1
  config.debug.poison_step = 3
  with pytest.raises(loop.NonFiniteError,
                     match=r'Steps 3-3: 1 steps in a row .* the last '
                     r'checkpoint, step 2 '):
    loop.train_and_evaluate(config, workdir, _Data)
  assert checkpoint_lib.saved_steps(workdir) == [1, 2]  # Not 3.
  assert [r['step'] for r in loop.read_metrics(workdir)] == [1, 2, 3]

  config.debug.poison_step = 0  # The data fixed; Ctrl-C during step 3.
  with pytest.raises(loop.Preempted, match='saved step 3'):
    loop.train_and_evaluate(
        config, workdir, functools.partial(_Data, interrupt_at=3))
  assert checkpoint_lib.saved_steps(workdir) == [1, 2, 3]
  assert workdir_lib.finished_step(workdir) is None
  rows = loop.read_metrics(workdir)  # Step 3's NaN row was dropped.
  assert [r['step'] for r in rows] == [1, 2, 3]
  assert np.isfinite(rows[2]['loss'])

  final = loop.train_and_evaluate(config, workdir, _Data)
  jax.tree.map(np.testing.assert_array_equal, reference[1], _params(final))
  assert [r['step'] for r in loop.read_metrics(workdir)] == [1, 2, 3, 4]
  assert workdir_lib.finished_step(workdir) == 4


def test_a_damaged_latest_step_is_set_aside_and_training_resumes_before_it(
    tmp_path, monkeypatch, reference):
  workdir = tmp_path / 'run'
  loop.train_and_evaluate(_toy_config(monkeypatch, 2, every=1), str(workdir),
                          _Data)
  corrupt.truncate(workdir / 'checkpoints' / '2')
  final = loop.train_and_evaluate(_toy_config(monkeypatch, 4, every=1),
                                  str(workdir), _Data)
  jax.tree.map(np.testing.assert_array_equal, reference[1], _params(final))
  # Kept for inspection, out of orbax's way (step 2 was saved anew).
  assert (workdir / 'checkpoints.damaged' / '2').is_dir()
  assert checkpoint_lib.saved_steps(str(workdir)) == [2, 3, 4]


def test_resuming_another_shape_names_parameter_shapes_and_config_key(
    tmp_path, monkeypatch):
  workdir = tmp_path / 'run'
  loop.train_and_evaluate(_toy_config(monkeypatch, 1), str(workdir), _Data)
  saved_config = (workdir / 'config.json').read_text()
  config = _toy_config(monkeypatch, 2)
  config.model.lm.width = 4
  with pytest.raises(ValueError) as error:
    loop.train_and_evaluate(config, str(workdir), _Data)
  message = str(error.value)
  assert 'trainable/~/out: (8, 64) in the checkpoint, (4, 64) now' in message
  assert 'model.lm.width: 8 -> 4' in message
  # The workdir is as the first run left it, and still loads.
  assert (workdir / 'config.json').read_text() == saved_config
  assert checkpoint_lib.load_params(str(workdir))['~']['out'].shape == (8, 64)


_HOLD_LOCK = """
import sys, time
from flamingo_jax.training import workdir
held = workdir.lock(sys.argv[1])
held.__enter__()
print('locked', flush=True)
time.sleep(300)
"""


def test_a_second_trainer_is_refused_but_a_dead_ones_lock_is_not(
    tmp_path, monkeypatch):
  workdir = str(tmp_path / 'run')
  holder = subprocess.Popen([sys.executable, '-c', _HOLD_LOCK, workdir],
                            cwd=_REPO, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == 'locked'
    with pytest.raises(workdir_lib.WorkdirLockedError,
                       match=f'pid {holder.pid} on host'):
      loop.train_and_evaluate(_toy_config(monkeypatch, 1), workdir, _Data)
  finally:
    holder.kill()  # As SIGKILL leaves it: the lock file stays behind.
    holder.wait()
  assert os.path.exists(os.path.join(workdir, workdir_lib.LOCK_FILE))
  with workdir_lib.lock(workdir):  # The kernel released the dead one's lock.
    pass


@pytest.mark.parametrize('key, value', [
    ('checkpoint.keep', 0), ('checkpoint.keep', -1), ('checkpoint.every', 0),
    ('log_every', 0), ('total_steps', -1), ('max_nonfinite_steps', 0),
    ('data.datasets.pairs.batch_size', 0), ('optim.learning_rate', np.nan)])
def test_a_bad_number_is_refused_by_name_before_any_work(tmp_path, key,
                                                         value):
  config = tiny.get_config('smoke')
  parent = config
  for part in key.split('.')[:-1]:
    parent = parent[part]
  parent[key.split('.')[-1]] = value
  with pytest.raises(ValueError, match=re.escape(f'config.{key}={value!r}: '
                                                 'must be')):
    loop.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()
