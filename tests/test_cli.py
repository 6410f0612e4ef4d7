"""Command-line entry points: summarize output, clear config errors."""

import json
import re
import subprocess
import sys

import pytest


def _run(*args):
  return subprocess.run([sys.executable, '-m', *args], capture_output=True,
                        text=True, timeout=300, check=False)


def test_summarize_json_has_the_components():
  result = _run('flamingo_jax.summarize', '--config',
                'experiments/flamingo.py:tiny', '--json')
  assert result.returncode == 0, result.stderr
  counts = json.loads(result.stdout.strip().splitlines()[-1])
  assert set(counts) == {'lm', 'vision', 'xattn', 'resampler', 'total'}
  assert counts['total'] == sum(v for k, v in counts.items() if k != 'total')


def test_summarize_override_changes_the_model():
  base = _run('flamingo_jax.summarize', '--config',
              'experiments/flamingo.py:tiny', '--json')
  halved = _run('flamingo_jax.summarize', '--config',
                'experiments/flamingo.py:tiny', '--json',
                '--config.model.xattn.every=2')
  xattn = [json.loads(r.stdout.splitlines()[-1])['xattn']
           for r in (base, halved)]
  assert xattn[1] * 2 == xattn[0]


@pytest.mark.parametrize('module', ['flamingo_jax.train',
                                    'flamingo_jax.summarize'])
def test_unknown_config_key_is_named(module, tmp_path):
  config = ('experiments/tiny.py' if module.endswith('train')
            else 'experiments/flamingo.py:tiny')
  result = _run(module, '--config', config, '--workdir', str(tmp_path),
                '--config.optim.bogus=1')
  assert result.returncode != 0
  assert "unknown config key '--config.optim.bogus'" in result.stderr
  assert not (tmp_path / 'checkpoints').exists()  # Before any work.


@pytest.mark.parametrize('module', ['flamingo_jax.bench',
                                    'flamingo_jax.data.show'])
def test_unknown_key_of_the_default_config_is_named(module):
  """These CLIs default --config to the tiny recipe; an override of that
  default is checked like one of a named config (not a bare traceback)."""
  result = _run(module, '--config.optim.bogus=1')
  assert result.returncode != 0
  assert "unknown config key '--config.optim.bogus'" in result.stderr
  assert 'Traceback' not in result.stderr


@pytest.mark.parametrize('overrides, culprits', [
    # The bad key shares its last component with a good one before it.
    (['--config.model.xattn.every=2', '--config.optim.xattn.every=3'],
     {'--config.optim.xattn.every': "config.optim has no field 'xattn'"}),
    # Two bad keys with the same last component, behind a good one.
    (['--config.seed=3', '--config.model.bogus=1', '--config.optim.bogus',
      '1'],
     {'--config.model.bogus': "config.model has no field 'bogus'",
      '--config.optim.bogus': "config.optim has no field 'bogus'"}),
])
def test_only_the_unknown_overrides_are_named(overrides, culprits):
  result = _run('flamingo_jax.summarize', '--config',
                'experiments/flamingo.py:tiny', *overrides)
  assert result.returncode != 0
  assert 'Traceback' not in result.stderr, result.stderr[-2000:]
  message = [l for l in result.stderr.splitlines() if l.startswith('FATAL')]
  assert len(message) == 1, result.stderr[-2000:]  # One line names them all.
  named = re.findall(r"unknown config key '([^']+)': ([^;(]+)", message[0])
  assert {key: why.strip() for key, why in named} == culprits


def test_bad_value_is_named(tmp_path):
  result = _run('flamingo_jax.train', '--config', 'experiments/tiny.py',
                '--workdir', str(tmp_path), '--config.total_steps=abc')
  assert result.returncode != 0
  assert '--config.total_steps=abc' in result.stderr


def test_unknown_variant_is_named():
  result = _run('flamingo_jax.summarize', '--config',
                'experiments/flamingo.py:3B,bogus_ablation')
  assert result.returncode != 0
  assert 'bogus_ablation' in result.stderr


def test_plot_writes_pngs(tmp_path):
  rows = [{'step': s, 'loss': 5.0 - s, 'loss/pairs': 4.0 - s,
           'gates/attn_gate_0': 0.1 * s, 'gates/ffw_gate_0': 0.05 * s}
          for s in range(1, 4)]
  (tmp_path / 'metrics.jsonl').write_text(
      ''.join(json.dumps(r) + '\n' for r in rows))
  result = _run('flamingo_jax.plot', '--workdir', str(tmp_path))
  assert result.returncode == 0, result.stderr
  for name in ('loss.png', 'gates.png'):
    data = (tmp_path / 'plots' / name).read_bytes()
    assert data[:4] == b'\x89PNG' and len(data) > 5000


def test_plot_without_metrics_names_the_file(tmp_path):
  result = _run('flamingo_jax.plot', '--workdir', str(tmp_path))
  assert result.returncode != 0
  assert 'metrics.jsonl' in result.stderr


def test_data_show_writes_a_grid(tmp_path):
  out = tmp_path / 'documents.png'
  result = _run('flamingo_jax.data.show', '--config',
                'experiments/tiny.py:smoke', '--dataset', 'documents',
                '--out', str(out), '--rows', '2',
                f'--config.data.data_dir={tmp_path}/data',
                f'--config.data.tokenizer={tmp_path}/data/tok.model')
  assert result.returncode == 0, result.stderr[-2000:]
  data = out.read_bytes()
  assert data[:4] == b'\x89PNG' and len(data) > 20000
  bad = _run('flamingo_jax.data.show', '--dataset', 'nope', '--out',
             str(out))
  assert bad.returncode != 0 and "--dataset must be one of" in bad.stderr
