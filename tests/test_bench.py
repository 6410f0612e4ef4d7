"""The benchmark CLI runs and reports its figures (no timing asserted)."""

import os
import re
import subprocess
import sys


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench(*args):
  env = dict(os.environ, JAX_NUM_CPU_DEVICES='1')
  result = subprocess.run(
      [sys.executable, '-m', 'flamingo_jax.bench', *args,
       '--config', os.path.join(ROOT, 'experiments', 'tiny.py'),
       '--repeats', '1'],
      capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def test_generate_reports_the_speedup_of_cached_decoding():
  out = _bench('generate', '--batch', '2', '--prompt_len', '16',
               '--new_tokens', '4', '--images', '1')
  assert re.search(r'speed-up \(cached / uncached\): [\d.]+x', out), out
  assert 'same tokens: True' in out


def test_train_reports_steps_and_mfu():
  out = _bench('train', '--steps', '1')
  assert re.search(r'[\d.]+ steps/s, \d+ tokens/s', out), out
  assert 'MFU' in out


def test_unknown_command_is_named():
  env = dict(os.environ, JAX_NUM_CPU_DEVICES='1')
  result = subprocess.run([sys.executable, '-m', 'flamingo_jax.bench', 'fly'],
                          capture_output=True, text=True, cwd=ROOT, env=env)
  assert result.returncode != 0
  assert 'generate|train|data' in result.stderr + result.stdout
