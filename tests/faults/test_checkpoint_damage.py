"""Damaged checkpoints on disk are found, named, and stepped over.

Steps 1-3 of a small train-state tree are saved by the training loop's
`Checkpointer`; then step 3 is damaged as a bad copy or a stray `rm` would
(tests/faults/corrupt.py): a data file cut in half, one flipped byte inside
a parameter (which orbax alone restores without complaint), the state's
metadata file deleted. Everything runs in this process, on the directory:
training adds nothing to what is tested here (its use of the same fallback
is tests/training/test_loop.py).
"""

import re
import shutil
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import flamingo_jax
from flamingo_jax import checkpoint
from tests.faults import corrupt


def _state(step: int) -> dict:
  rng = np.random.default_rng(step)
  return {
      'step': np.int32(step),
      'trainable': {'layer': {'w': rng.normal(size=[64, 64]).astype(
          np.float32)}},
      'frozen': {'embed': {'embeddings': rng.normal(size=[32, 16]).astype(
          jax.numpy.bfloat16)}},
      'opt_state': {'mu': np.zeros([64, 64], np.float32)}}


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('saved')
  saver = checkpoint.Checkpointer(str(workdir / 'checkpoints'), save_every=1,
                                  keep=3, async_save=False)
  for step in (1, 2, 3):
    saver.save(step, _state(step), {'next_step': step})
  saver.close()
  return workdir


def _silent_flip(step_dir) -> None:
  """Flips one byte that orbax restores without an error, as a changed
  value: the damage only a checksum finds (orbax checks its own index
  files, not the arrays)."""
  reader = ocp.PyTreeCheckpointer()
  expected = _state(3)['trainable']['layer']['w']
  for path in corrupt.data_files(step_dir):
    original = path.read_bytes()
    for offset in range(len(original) // 4, len(original), 97):
      corrupt.flip_byte(path, offset)
      try:
        restored = reader.restore(step_dir / 'state')
        if not np.array_equal(restored['trainable']['layer']['w'], expected):
          return
      except Exception:  # pylint: disable=broad-except  # A loud byte.
        pass
      path.write_bytes(original)
  raise AssertionError('No byte of the data files changed a value silently.')


DAMAGE = {
    'truncated file': (corrupt.truncate,
                       'cannot be read (a file under state/ is truncated'),
    'flipped byte': (_silent_flip, 'does not match its checksum'),
    'deleted metadata': (corrupt.delete_metadata,
                         'its metadata file state/_METADATA is missing'),
}


@pytest.fixture(params=sorted(DAMAGE))
def damaged(request, saved, tmp_path):
  """A copy of `saved` whose step 3 is damaged: (workdir, expected words)."""
  workdir = tmp_path / 'w'
  shutil.copytree(saved, workdir)
  damage, words = DAMAGE[request.param]
  damage(workdir / 'checkpoints' / '3')
  return workdir, words


def _assert_is_step(params, step):
  expected = checkpoint.merge_parts(_state(step))
  np.testing.assert_equal(jax.tree.map(np.asarray, params), expected)


def test_load_params_falls_back_to_the_newest_intact_step(damaged, caplog):
  workdir, words = damaged
  params, step = checkpoint.load_params_and_step(str(workdir))
  assert step == 2
  _assert_is_step(params, 2)
  assert any('checkpoints/3 is damaged' in r.message and words in r.message
             for r in caplog.records), caplog.text
  # Asked for by name, the damaged step is an error that says what is wrong.
  with pytest.raises(checkpoint.CheckpointDamagedError,
                     match=re.escape(words)):
    checkpoint.load_params(str(workdir), 3)


def test_training_restores_the_step_before_and_sets_the_damaged_one_aside(
    damaged):
  workdir, _ = damaged
  saver = checkpoint.Checkpointer(str(workdir / 'checkpoints'), save_every=1,
                                  keep=3, async_save=False)
  try:
    state, data, step = saver.restore_intact(
        checkpoint.abstract_like(jax.tree.map(np.asarray, _state(3))))
    assert (step, data) == (2, {'next_step': 2})
    _assert_is_step(checkpoint.merge_parts(state), 2)
    assert saver.all_steps() == [1, 2]
    # Kept, not deleted; and step 3 can be saved again where it was.
    assert (workdir / 'checkpoints.damaged' / '3' / 'state').is_dir()
    assert saver.save(3, _state(3), {'next_step': 3})
    assert saver.all_steps() == [1, 2, 3]
  finally:
    saver.close()


def test_every_step_damaged_is_an_error_naming_each(saved, tmp_path):
  workdir = tmp_path / 'w'
  shutil.copytree(saved, workdir)
  for step in (1, 2, 3):
    corrupt.delete_metadata(workdir / 'checkpoints' / str(step))
  with pytest.raises(checkpoint.CheckpointDamagedError,
                     match=r'No intact checkpoint in .*step 3: .*step 1: '):
    checkpoint.load_params(str(workdir))
  saver = checkpoint.Checkpointer(str(workdir / 'checkpoints'), save_every=1)
  try:
    with pytest.raises(checkpoint.CheckpointDamagedError):
      saver.restore_intact(checkpoint.abstract_like(
          jax.tree.map(np.asarray, _state(3))))
    assert saver.all_steps() == [1, 2, 3]  # Nothing moved: nothing to use.
  finally:
    saver.close()


def test_saving_refuses_non_finite_values(saved, tmp_path):
  saver = checkpoint.Checkpointer(str(tmp_path / 'checkpoints'), save_every=1)
  state = _state(1)
  state['opt_state']['mu'][3, 4] = np.inf
  try:
    with pytest.raises(checkpoint.NonFiniteStateError,
                       match=r'Refusing to save step 1: 1 arrays hold NaN or '
                       r'inf \(e.g. opt_state/mu\)'):
      saver.save(1, state, {'next_step': 1}, force=True)
    assert saver.all_steps() == []
  finally:
    saver.close()
  with pytest.raises(ValueError, match='keep=0: must be >= 1'):
    checkpoint.Checkpointer(str(tmp_path / 'other'), save_every=1, keep=0)


def test_load_falls_back_from_a_damaged_latest_step(smoke_workdir, tmp_path,
                                                    caplog):
  workdir = tmp_path / 'w'
  shutil.copytree(smoke_workdir, workdir)
  # A second step (the same arrays) and its damaged copy.
  shutil.copytree(workdir / 'checkpoints' / '1', workdir / 'checkpoints' / '2')
  corrupt.truncate(workdir / 'checkpoints' / '2')
  model = flamingo_jax.load(workdir)
  assert model.step == 1
  assert 'checkpoints/2 is damaged' in caplog.text
  with pytest.raises(checkpoint.CheckpointDamagedError,
                     match='checkpoints/2 is damaged: the array .* cannot be '
                     'read'):
    flamingo_jax.load(workdir, step=2)


class _Counted(NamedTuple):
  step: Any
  trainable: Any
  frozen: Any
  opt_state: Any
  skipped_steps: Any


def test_an_older_checkpoint_restores_with_zero_counters_unverified(
    saved, tmp_path, caplog):
  # Saved before the skip counters and the checksums existed.
  workdir = tmp_path / 'w'
  shutil.copytree(saved, workdir)
  shutil.rmtree(workdir / 'checkpoints' / '3' / 'checksums')
  state = _state(3)
  target = checkpoint.abstract_like(jax.tree.map(np.asarray, _Counted(
      state['step'], state['trainable'], state['frozen'], state['opt_state'],
      np.int32(0))))
  saver = checkpoint.Checkpointer(str(workdir / 'checkpoints'), save_every=1)
  try:
    restored, _ = saver.restore(target, 3, zero_if_missing=['skipped_steps'])
  finally:
    saver.close()
  assert isinstance(restored, _Counted) and int(restored.skipped_steps) == 0
  _assert_is_step(checkpoint.merge_parts(restored._asdict()), 3)
  assert 'has no checksums (saved by an older version)' in caplog.text
