"""The benchmark CLI runs and reports its figures (no timing asserted).

`train` and `generate` run with TensorFlow and TFDS made unimportable, as on
a GPU machine that has neither.
"""

import json
import os
import re
import subprocess
import sys

import pytest

from experiments import tiny
from flamingo_jax.training import flops as flops_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, 'experiments', 'tiny.py')

# Runs the bench as `python -m flamingo_jax.bench`, with `import tensorflow`
# and `import tensorflow_datasets` raising ImportError.
_WITHOUT_TF = (
    'import runpy, sys\n'
    "sys.modules['tensorflow'] = None\n"
    "sys.modules['tensorflow_datasets'] = None\n"
    "sys.argv[0] = 'flamingo_jax.bench'\n"
    "runpy.run_module('flamingo_jax.bench', run_name='__main__',"
    ' alter_sys=True)\n')


def _bench(*args, devices=1, check=True):
  env = dict(os.environ, JAX_NUM_CPU_DEVICES=str(devices))
  result = subprocess.run(
      [sys.executable, '-c', _WITHOUT_TF, *args], capture_output=True,
      text=True, cwd=ROOT, env=env, timeout=600)
  if check:
    assert result.returncode == 0, result.stderr[-3000:]
  return result


@pytest.mark.slow
def test_train_without_tensorflow_writes_every_figure(tmp_path):
  path = tmp_path / 'train.json'
  result = _bench('train', '--config', f'{TINY}:smoke', '--datasets', 'pairs',
                  '--batch', '4', '--seq', '16', '--warmup', '1', '--steps',
                  '3', '--peak_tflops', '0.5', '--mesh', 'data:2',
                  '--json', str(path), devices=2)
  assert re.search(r'[\d.]+ steps/s, \d+ tokens/s', result.stdout), (
      result.stdout)
  assert 'MFU' in result.stdout
  figures = json.loads(path.read_text())
  assert figures['command'] == 'train'
  assert figures['config'].endswith('tiny.py:smoke')
  assert figures['device_count'] == 2 and figures['mesh']['data'] == 2
  assert figures['datasets'] == {'pairs': dict(
      batch_size=4, seq_len=16, max_media=1, frames=1, image_size=64)}
  assert figures['timed_steps'] == 3 and len(figures['step_times_s']) == 3
  assert figures['compile_s'] > 0 and figures['step_s'] > 0
  assert (figures['remat_policy'], figures['xattn_remat_policy']) == (
      'none', 'none')  # experiments/tiny.py sets both stacks'.
  assert figures['tokens_per_s'] == pytest.approx(4 * 16 / figures['step_s'])
  # The analytic count of the GLOBAL batch, over the peak of BOTH devices.
  config = tiny.get_config('smoke')
  config.data.datasets = {'pairs': dict(
      config.data.datasets.pairs.to_dict(), batch_size=4, seq_len=16)}
  flops = flops_lib.train_step_flops(config)
  assert figures['model_tflop_per_step'] == pytest.approx(flops / 1e12)
  assert figures['achieved_tflop_per_s'] == pytest.approx(
      flops / figures['step_s'] / 1e12)
  assert figures['mfu'] == pytest.approx(
      figures['achieved_tflop_per_s'] / (2 * 0.5))
  assert figures['peak_source'] == '--peak_tflops'
  parts = figures['model_tflop_by_component']['pairs']
  assert parts['vision_encoder']['weight_grads'] == 0  # Frozen.
  assert parts['gated_xattn']['weight_grads'] > 0
  for key in ('jax_version', 'device_kind', 'compiled_memory', 'loss',
              'peak_bytes_in_use', 'overrides'):
    assert key in figures


def test_generate_without_tensorflow_reports_the_speedup(tmp_path):
  path = tmp_path / 'generate.json'
  result = _bench('generate', '--config', TINY, '--batch', '2',
                  '--prompt_len', '16', '--new_tokens', '4', '--images', '1',
                  '--repeats', '1', '--json', str(path))
  assert re.search(r'speed-up \(cached / uncached\): [\d.]+x',
                   result.stdout), result.stdout
  assert 'same tokens: True' in result.stdout
  figures = json.loads(path.read_text())
  assert figures['command'] == 'generate' and figures['new_tokens'] == 4
  assert figures['same_tokens'] is True
  assert figures['speedup'] == pytest.approx(
      figures['uncached_s'] / figures['cached_s'])


def test_unknown_dataset_is_named_with_the_available_ones():
  result = _bench('train', '--config', f'{TINY}:smoke', '--datasets', 'm3w',
                  check=False)
  assert result.returncode != 0
  assert "['documents', 'pairs', 'video_pairs']" in result.stderr, (
      result.stderr[-2000:])


def test_unknown_command_is_named():
  result = _bench('fly', check=False)
  assert result.returncode != 0
  assert 'generate|train|data' in result.stderr + result.stdout


def _gpu_script(*args, **env):
  return subprocess.run(
      ['bash', os.path.join(ROOT, 'launch', 'bench_gpu.sh'), *args],
      capture_output=True, text=True, cwd=ROOT, timeout=120,
      env=dict(os.environ, **env))


def test_gpu_script_plans_its_runs_by_importance(tmp_path):
  result = _gpu_script('--dry-run', OUT=str(tmp_path))
  assert result.returncode == 0, result.stderr
  runs = re.findall(r'^== (\S+) \(timeout \d+s\): (.*)$', result.stdout,
                    re.MULTILINE)
  assert [name for name, _ in runs] == [
      'smoke', 'train_3b_remat_none', 'generate_3b', 'train_3b_remat_dots',
      'train_3b_remat_full']
  commands = dict(runs)
  assert 'tiny.py:smoke' in commands['smoke']
  for policy in ('none', 'dots', 'full'):
    command = commands[f'train_3b_remat_{policy}']
    assert f'--config.model.lm.remat_policy={policy}' in command
    assert f'--config.model.xattn.remat_policy={policy}' in command
    for flag in ('--datasets m3w', '--batch 8', '--seq 256', '--images 5',
                 '--image_size 320', '--config.compute_dtype=bfloat16'):
      assert flag in command, (flag, command)
  assert '--new_tokens 64' in commands['generate_3b']
  for name, command in runs:
    assert f'--json {tmp_path}/{name}.json' in command
  assert not list(tmp_path.glob('*.log'))  # A dry run runs nothing.


def test_gpu_script_skips_runs_past_its_budget_and_summarises(tmp_path):
  result = _gpu_script('--no-install', OUT=str(tmp_path), BENCH_BUDGET_S='0',
                       JAX_PLATFORMS='cpu')
  assert result.returncode == 0, result.stderr
  assert result.stdout.count('skipped: 0s of the 0s budget left') == 5
  summary = json.loads((tmp_path / 'all.json').read_text())
  assert summary['train_3b_remat_none'] == {'status': 'skipped'}
  assert 'pip install' not in result.stdout
