"""A real training process, killed (SIGKILL) and preempted (SIGTERM), resumes
from its last checkpoint and ends exactly where an uninterrupted run ends."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from experiments import tiny
from flamingo_jax import checkpoint
from flamingo_jax.data import prepare

STEPS = 20


def _smoke_config(data_dir):
  config = tiny.get_config('smoke')
  config.data.data_dir = str(data_dir)
  config.data.tokenizer = f'{data_dir}/tok.model'
  return config


def _command(workdir, data_dir):
  return [sys.executable, '-m', 'flamingo_jax.train',
          '--config', 'experiments/tiny.py:smoke', '--workdir', str(workdir),
          f'--config.total_steps={STEPS}', '--config.log_every=1',
          '--config.checkpoint.every=5',
          f'--config.data.data_dir={data_dir}',
          f'--config.data.tokenizer={data_dir}/tok.model']


def _rows(workdir):
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


# One CPU device per process: what `python -m flamingo_jax.train` gets on a
# laptop (the test process itself runs with 8 fake devices).
_ENV = dict(os.environ, JAX_NUM_CPU_DEVICES='1')


def _run_until(workdir, data_dir, step, sig, log):
  """Starts training, sends `sig` once `step` is logged; returns the code."""
  with open(log, 'a') as out:
    proc = subprocess.Popen(_command(workdir, data_dir), stdout=out,
                            stderr=subprocess.STDOUT, env=_ENV)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
      if any(r['step'] >= step for r in _rows(workdir)):
        proc.send_signal(sig)
        break
      time.sleep(0.2)
    return proc.wait(timeout=120)


def _complete(workdir, data_dir, log):
  with open(log, 'a') as out:
    return subprocess.run(_command(workdir, data_dir), stdout=out,
                          stderr=subprocess.STDOUT, timeout=300,
                          env=_ENV).returncode


@pytest.mark.slow
def test_kill_and_preemption_resume_bit_exactly(tmp_path):
  data_dir = tmp_path / 'data'
  log = tmp_path / 'log.txt'
  # Data and tokenizer first, so that the two runs below do not race.
  prepare.ensure_data(_smoke_config(data_dir))
  reference = tmp_path / 'reference'
  with open(tmp_path / 'reference.txt', 'w') as out:  # Alongside the others.
    uninterrupted = subprocess.Popen(
        _command(reference, data_dir), stdout=out, stderr=subprocess.STDOUT,
        env=_ENV)

  interrupted = tmp_path / 'interrupted'
  code = _run_until(interrupted, data_dir, 8, signal.SIGKILL, log)
  assert code == -signal.SIGKILL
  code = _run_until(interrupted, data_dir, 14, signal.SIGTERM, log)
  assert code == 0, log.read_text()[-3000:]  # Preemption exits cleanly...
  saved = sorted(int(s) for s in os.listdir(interrupted / 'checkpoints')
                 if s.isdigit())
  last_logged = _rows(interrupted)[-1]['step']
  assert saved[-1] == last_logged  # ...with a checkpoint of its last step.
  assert last_logged < STEPS
  assert _complete(interrupted, data_dir, log) == 0
  text = log.read_text()
  assert 'Resuming from step' in text
  assert uninterrupted.wait(timeout=300) == 0

  # Stage 2 read its frozen LM from stage 1 (the recipe's W/lm).
  assert 'Initialised 16 parameters from' in text
  pretrained = checkpoint.load_params(interrupted / 'lm')
  flamingo = checkpoint.load_params(interrupted)
  for module in ('lm/embed', 'lm/blocks/block/ffw/hidden'):
    for name, value in pretrained[module].items():
      np.testing.assert_array_equal(
          value.astype(flamingo[module][name].dtype), flamingo[module][name])

  final = {r['step']: r for r in _rows(reference)}[STEPS]
  resumed = [r for r in _rows(interrupted) if r['step'] == STEPS][-1]
  for key in ('loss', 'grad_norm', 'param_norm', 'loss/documents'):
    assert resumed[key] == final[key], key
