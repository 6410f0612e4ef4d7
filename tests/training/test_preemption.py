"""A real training process, killed (SIGKILL) and preempted (SIGTERM), resumes
from its last checkpoint and ends exactly where an uninterrupted run ends."""

import functools
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from experiments import tiny
from flamingo_jax import checkpoint
from flamingo_jax.data import prepare

STEPS = 20
# The main stage's steps at which the interrupted run is killed, then
# preempted; past the smoke recipe's stages (4 and 6 steps), whose loggers
# would otherwise send the signal too.
KILL_AT, PREEMPT_AT = 8, 14


# The smoke recipe with its LM stage (W/lm) but not its vision stage, whose
# compilation would double the test's time (the vision stage feeding Flamingo
# is tests/training/test_contrastive.py).
CONFIG = """
from experiments import tiny


def get_config():
  config = tiny.get_config('smoke')
  del config.stages['vision']
  config.init_from = [s for s in config.init_from if s['workdir'] == 'lm']
  return config
"""


def _smoke_config(data_dir):
  config = tiny.get_config('smoke')
  config.data.data_dir = str(data_dir)
  config.data.tokenizer = f'{data_dir}/tok.model'
  return config


def _run(config_file, data_dir, workdir, log, signal_at=None):
  """Runs CONFIG for STEPS steps in `workdir`; returns its exit code.

  With `signal_at` = (step, signal), the process sends itself the signal
  once it has logged that step (tests/training/signalled_train.py).
  """
  module, env = 'flamingo_jax.train', dict(os.environ)
  if signal_at is not None:
    module = 'tests.training.signalled_train'
    env['FLAMINGO_JAX_TEST_SIGNAL'] = f'{signal_at[0]}:{signal_at[1].name}'
  # One CPU device per process: what `python -m flamingo_jax.train` gets on
  # a laptop (the test process itself runs with 8 fake devices).
  env['JAX_NUM_CPU_DEVICES'] = '1'
  command = [sys.executable, '-m', module,
             '--config', str(config_file), '--workdir', str(workdir),
             f'--config.total_steps={STEPS}', '--config.log_every=1',
             '--config.checkpoint.every=5',
             f'--config.data.data_dir={data_dir}',
             f'--config.data.tokenizer={data_dir}/tok.model']
  with open(log, 'a') as out:
    return subprocess.run(command, stdout=out, stderr=subprocess.STDOUT,
                          env=env, timeout=400, check=False).returncode


def _rows(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f if line.strip()]


@pytest.mark.slow
def test_kill_and_preemption_resume_bit_exactly(tmp_path):
  data_dir = tmp_path / 'data'
  log = tmp_path / 'log.txt'
  # Data and tokenizer first, as a fresh machine's first run builds them.
  prepare.ensure_data(_smoke_config(data_dir))
  config_file = tmp_path / 'config.py'
  config_file.write_text(CONFIG)
  run = functools.partial(_run, config_file, data_dir)
  # The runs go one after another: each reuses the compilations of the first
  # (the tests' shared compilation cache, tests/conftest.py).
  interrupted = tmp_path / 'interrupted'
  code = run(interrupted, log, (KILL_AT, signal.SIGKILL))
  assert code == -signal.SIGKILL, log.read_text()[-3000:]
  assert _rows(interrupted)[-1]['step'] == KILL_AT
  code = run(interrupted, log, (PREEMPT_AT, signal.SIGTERM))
  assert code == 0, log.read_text()[-3000:]  # Preemption exits cleanly...
  saved = checkpoint.saved_steps(interrupted)
  assert saved[-1] == PREEMPT_AT == _rows(interrupted)[-1]['step']  # ...saved.
  assert run(interrupted, log) == 0
  text = log.read_text()
  assert 'Resuming from step' in text
  assert f'Preempted: saved step {PREEMPT_AT}' in text

  reference = tmp_path / 'reference'
  assert run(reference, tmp_path / 'reference.txt') == 0
  final = {r['step']: r for r in _rows(reference)}[STEPS]
  resumed = [r for r in _rows(interrupted) if r['step'] == STEPS][-1]
  for key in ('loss', 'grad_norm', 'param_norm', 'loss/documents'):
    assert resumed[key] == final[key], key
  np.testing.assert_equal(checkpoint.load_params(interrupted),
                          checkpoint.load_params(reference))

  # Stage 2 read its frozen LM from stage 1 (the recipe's W/lm).
  assert 'Initialised 16 parameters from' in text
  pretrained = checkpoint.load_params(interrupted / 'lm')
  flamingo = checkpoint.load_params(interrupted)
  for module in ('lm/embed', 'lm/blocks/block/ffw/hidden'):
    for name, value in pretrained[module].items():
      np.testing.assert_array_equal(
          value.astype(flamingo[module][name].dtype), flamingo[module][name])

  # What the run leaves for a person: its config, metrics for TensorBoard,
  # and every scalar of the loop in the JSONL mirror.
  config = json.loads((reference / 'config.json').read_text())
  assert config['total_steps'] == STEPS
  assert any(f.startswith('events')
             for f in os.listdir(reference / 'tensorboard'))
  for key in ('learning_rate', 'steps_per_sec', 'tokens_per_sec',
              'gates/attn_gate_0', 'loss/pairs'):
    assert key in final, key
