"""The evaluate CLI on a workdir: config.json + an orbax checkpoint."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from experiments import tiny
from flamingo_jax import checkpoint
from flamingo_jax.data import world
from flamingo_jax.models import flamingo
from tests.data import test_tokenizer
from tests.evaluation import test_runner


def _run(*args):
  return subprocess.run([sys.executable, '-m', 'flamingo_jax.evaluate', *args],
                        capture_output=True, text=True, timeout=300,
                        check=False)


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  """A workdir as training leaves it, with the tiny world's captions."""
  root = tmp_path_factory.mktemp('run')
  data_dir = root / 'world'
  world.build_all(data_dir, 'tiny', datasets=['world_captions'],
                  num_workers=1, log=lambda line: None)
  config = tiny.get_config('smoke')
  config.model = flamingo.model_config('tiny')
  config.data.tokenizer = str(root / 'tok.model')
  test_tokenizer.train_tiny_tokenizer(config.data.tokenizer)
  config.eval.data_dir = str(data_dir)
  config.eval.sizes = 'tiny'
  config.eval.decoding.max_new_tokens = 3
  config.eval.decoding.beam_size = 1
  config.eval.batch_size = 2
  config.eval.reference = {'captions': 10.0}
  work = root / 'w'
  work.mkdir()
  (work / 'config.json').write_text(config.to_json_best_effort())
  params = test_runner.random_params(config.model)
  state = {'trainable': {k: v for k, v in params.items()
                         if not k.startswith('vision_encoder')},
           'frozen': {k: v for k, v in params.items()
                      if k.startswith('vision_encoder')}}
  saver = checkpoint.Checkpointer(str(work / 'checkpoints'), save_every=1,
                                  async_save=False)
  saver.save(5, state, {'next_step': 5}, force=True)
  saver.close()
  return work


def test_evaluate_writes_results_plot_and_table(workdir):
  result = _run('--workdir', str(workdir), '--tasks', 'captions', '--shots',
                '0,1', '--num_queries', '2')
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'captions' in result.stdout and '1-shot' in result.stdout
  assert 'overall   vs reference' in result.stdout
  out = workdir / 'eval'
  results = json.loads((out / 'results.json').read_text())
  assert set(results['scores']) == {'captions'}
  assert set(results['scores']['captions']) == {'0', '1'}
  assert all(np.isfinite(v) and v >= 0
             for v in results['scores']['captions'].values())
  assert results['metadata']['step'] == 5
  assert results['metadata']['num_queries'] == {'captions': 2}
  assert results['overall_score'] is None  # overall_shots is 4.
  assert set(results['overall']) == {'0', '1'}
  assert os.path.getsize(out / 'scores.png') > 1000


def test_unknown_task_and_help(workdir):
  result = _run('--workdir', str(workdir), '--tasks', 'bogus')
  assert result.returncode != 0
  assert "Unknown tasks ['bogus']" in result.stderr
  result = _run('--help')  # absl exits with 1 after printing the help.
  for flag in ('--workdir', '--shots', '--tasks', '--num_queries', '--rices',
               '--vqa_results'):
    assert flag in result.stdout
