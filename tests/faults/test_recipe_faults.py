"""Real `python -m flamingo_jax.train` processes of the smoke recipe, each
stage interrupted, one step poisoned, resumed: they end exactly where an
uninterrupted run ends.

Every run poisons the main stage's step 2 (`config.debug.poison_step`: NaN
loss masks), which the non-finite guard skips and counts. One interrupted
workdir goes through the faults in turn, each process resuming what the one
before left, against one uninterrupted reference run:

  1. SIGTERM in the vision stage -> exit 0, that stage saved, nothing later
  2. Ctrl-C (SIGINT) in the LM stage -> exit 0, vision marked done, no main
     stage
  3. SIGTERM in the main stage, at its poisoned step 2 -> exit 0; the saved
     step 2 holds step 1's (finite) parameters and the skip counters
  4. SIGKILL in the main stage once step 3 is logged -> no chance to save
     or mark anything: the main stage is not finished
  5. no fault                    -> the run ends: every stage's parameters
     equal the reference's, bit for bit; metrics.jsonl repeats no step.

The processes run one after another and share the tests' compilation cache
(tests/conftest.py), so only the reference compiles; steps are few (2, 2, 3).
What these runs share with in-process tests is tested there, on a toy task:
N non-finite steps in a row stopping the run, a second Ctrl-C, damaged
checkpoints (tests/training/test_loop.py,
tests/faults/test_checkpoint_damage.py).
"""

import functools
import json
import os
import pathlib
import re
import signal
import subprocess
import sys

import numpy as np
import pytest

from experiments import tiny
from flamingo_jax import checkpoint
from flamingo_jax.orchestration import recipe
from flamingo_jax.training import workdir as workdir_lib

_REPO = pathlib.Path(__file__).resolve().parents[2]
STEPS = {'vision': 2, 'lm': 2, '.': 3}  # Per stage ('.': the main stage).


POISON_STEP = 2  # Of the main stage.


def _command(workdir, data_dir, module='flamingo_jax.train'):
  command = [sys.executable, '-m', module,
             '--config', 'experiments/tiny.py:smoke', '--workdir', str(workdir),
             f'--config.data.data_dir={data_dir}',
             f'--config.data.tokenizer={data_dir}/tok.model',
             f'--config.debug.poison_step={POISON_STEP}']
  for stage, steps in STEPS.items():
    prefix = '--config.' if stage == '.' else f'--config.stages.{stage}.'
    command += [f'{prefix}total_steps={steps}', f'{prefix}log_every=1',
                f'{prefix}checkpoint.every=1']
  return command


def _run(workdir, data_dir, log, signal_at=None) -> int:
  """Runs the smoke recipe in `workdir`; returns its exit code.

  With `signal_at` = (stage, step, signal), the process sends itself the
  signal once that stage has logged that step (faults/signalled_train.py).
  """
  env = dict(os.environ)
  # One CPU device per process: what `python -m flamingo_jax.train` gets on
  # a laptop (the test process itself runs with 8 fake devices).
  env['JAX_NUM_CPU_DEVICES'] = '1'
  module = 'flamingo_jax.train'
  if signal_at is not None:
    module = 'tests.faults.signalled_train'
    stage, step, signum = signal_at
    env['FLAMINGO_JAX_TEST_SIGNAL'] = f'{stage}:{step}:{signum.name}'
  with open(log, 'a') as out:
    out.write(f'\n=== {signal_at}\n')
    out.flush()
    return subprocess.run(_command(workdir, data_dir, module), cwd=_REPO,
                          env=env, stdout=out, stderr=subprocess.STDOUT,
                          timeout=400, check=False).returncode


def _rows(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f if line.strip()]


def _tail(log) -> str:
  return pathlib.Path(log).read_text()[-4000:]


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """The uninterrupted run (it also builds the data and the tokenizer)."""
  root = tmp_path_factory.mktemp('faults')
  data_dir, workdir, log = root / 'data', root / 'reference', root / 'ref.txt'
  assert _run(workdir, data_dir, log) == 0, _tail(log)
  return workdir, data_dir


@pytest.mark.slow
def test_every_stage_preempted_and_poisoned_resumes_bit_exactly(
    reference, tmp_path):
  ref, data_dir = reference
  work, log = tmp_path / 'interrupted', tmp_path / 'log.txt'
  run = functools.partial(_run, work, data_dir, log)

  # 1. Preempted in the vision stage: the process ends, nothing later runs.
  assert run(('vision', 1, signal.SIGTERM)) == 0, _tail(log)
  assert checkpoint.saved_steps(work / 'vision') == [1]
  assert workdir_lib.finished_step(work / 'vision') is None
  assert not (work / 'lm').exists() and not (work / 'checkpoints').exists()
  assert 'Preempted: saved step 1' in log.read_text()

  # 2. The rerun finishes the vision stage; Ctrl-C in the LM stage.
  assert run(('lm', 1, signal.SIGINT)) == 0, _tail(log)
  assert workdir_lib.finished_step(work / 'vision') == STEPS['vision']
  assert checkpoint.saved_steps(work / 'lm') == [1]
  assert not (work / 'checkpoints').exists()

  # 3. Preempted in the main stage at its poisoned step: skipped, saved.
  assert run(('.', POISON_STEP, signal.SIGTERM)) == 0, _tail(log)
  assert checkpoint.saved_steps(work) == [1, 2]
  rows = _rows(work)
  assert [r['step'] for r in rows] == [1, 2]
  assert np.isnan(rows[1]['loss']) and rows[1]['skipped_steps'] == 1
  # load_params checks every value is finite (and the checksums).
  np.testing.assert_equal(checkpoint.load_params(work, 1),
                          checkpoint.load_params(work, 2))

  # 4. Killed where it stands after logging the main stage's last step.
  assert run(('.', STEPS['.'], signal.SIGKILL)) == -signal.SIGKILL
  assert workdir_lib.finished_step(work) is None

  # 5. The last rerun ends where the uninterrupted run ends, bit for bit.
  assert run() == 0, _tail(log)
  for stage in STEPS:
    np.testing.assert_equal(checkpoint.load_params(work / stage),
                            checkpoint.load_params(ref / stage))
    assert workdir_lib.finished_step(work / stage) == STEPS[stage]
    rows, ref_rows = _rows(work / stage), _rows(ref / stage)
    assert [r['step'] for r in rows] == list(range(1, STEPS[stage] + 1))
    assert rows[-1]['loss'] == ref_rows[-1]['loss'], stage
  # Vision, LM, the main stage twice (from step 2 after the SIGTERM, from
  # step 2 or 3 after the kill, as far as the kill let the save get).
  assert log.read_text().count('Resuming from step') == 4
  assert _rows(work)[-1]['skipped_steps'] == 1


@pytest.mark.slow
def test_the_reference_run_chains_its_stages(reference):
  """What the uninterrupted run leaves: each stage's final parameters
  initialise the main stage's frozen parts; config, metrics, events."""
  ref, _ = reference
  assert recipe.stage_order(tiny.get_config('smoke'), str(ref)) == [
      'vision', 'lm']
  flamingo = checkpoint.load_params(ref)
  for stage, prefix in (('vision', 'vision_encoder/'), ('lm', 'lm/')):
    pretrained = checkpoint.load_params(ref / stage)
    modules = [m for m in pretrained if m.startswith(prefix)]
    assert modules, stage
    for module in modules:
      for name, value in pretrained[module].items():
        stored = flamingo[module][name]  # Frozen in Flamingo: bf16.
        np.testing.assert_array_equal(value.astype(stored.dtype), stored)
  vision_rows = _rows(ref / 'vision')
  for key in ('loss/pairs', 'i2t_accuracy/pairs', 't2i_accuracy/pairs',
              'logit_scale', 'grad_norm', 'skipped_steps'):
    assert np.isfinite(vision_rows[-1][key]), key
  final = _rows(ref)[-1]
  for key in ('learning_rate', 'steps_per_sec', 'tokens_per_sec',
              'gates/attn_gate_0', 'loss/pairs', 'skipped_steps'):
    assert key in final, key
  config = json.loads((ref / 'config.json').read_text())
  assert config['total_steps'] == STEPS['.']
  assert any(f.startswith('events') for f in os.listdir(ref / 'tensorboard'))
  assert (ref / 'vision' / 'plots' / 'loss.png').exists()


@pytest.mark.parametrize('stage', ['', 'stages.lm.'])
def test_keep_zero_is_refused_by_name_before_anything_runs(tmp_path, stage):
  config = tiny.get_config('smoke')
  (config.stages.lm if stage else config).checkpoint.keep = 0
  with pytest.raises(ValueError, match=re.escape(
      f'config.{stage}checkpoint.keep=0: must be an integer >= 1')):
    recipe.run(config, str(tmp_path / 'w'))
  assert not (tmp_path / 'w').exists()
