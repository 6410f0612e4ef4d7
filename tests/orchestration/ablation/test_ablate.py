"""The sweep CLI: --dry-run lists every run, --collect tabulates finished
workdirs (faked here, as the recipe and evaluation write them) and runs
nothing."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from flamingo_jax.orchestration.ablation import plan
from flamingo_jax.orchestration.ablation import table

# ml_collections loads config files with the deprecated load_module.
pytestmark = pytest.mark.filterwarnings(
    'ignore:the load_module:DeprecationWarning')
CONFIG = 'experiments/tiny.py:smoke'
ROOT = os.path.join(os.path.dirname(__file__), '..', '..', '..')
# row -> per seed, {task: 2-shot score}; smoke evaluates at 0 and 2 shots.
SCORES = {
    'baseline': [{'captions': 60.0, 'vqa': 50.0},
                 {'captions': 62.0, 'vqa': 50.0}],
    'no_m3w': [{'captions': 30.0, 'vqa': 40.0},
               {'captions': 32.0, 'vqa': 42.0}],
    'vanilla_xattn': [{'captions': 61.0, 'vqa': 51.0},
                      {'captions': 61.0, 'vqa': 49.0}],
}


def _ablate(*args):
  return subprocess.run(
      [sys.executable, '-m', 'flamingo_jax.ablate', *args], cwd=ROOT,
      capture_output=True, text=True, check=False,
      env=dict(os.environ, PYTHONPATH=os.path.abspath(ROOT)))


def _fake_run(run_dir, scores, steps_per_sec):
  """What a finished run leaves: marker, metrics and few-shot results."""
  os.makedirs(os.path.join(run_dir, 'eval'))
  with open(os.path.join(run_dir, 'finished.json'), 'w') as f:
    json.dump({'step': 6}, f)
  with open(os.path.join(run_dir, 'metrics.jsonl'), 'w') as f:
    for step, rate in enumerate(steps_per_sec, 1):
      f.write(json.dumps({'step': 2 * step, 'loss': 1.0,
                          'steps_per_sec': rate}) + '\n')
  results = dict(
      scores={t: {'0': s / 2, '2': s} for t, s in scores.items()},
      overall={}, overall_score=None,
      metadata=dict(step=6, overall_shots=4, shots=[0, 2]))
  with open(os.path.join(run_dir, 'eval', 'results.json'), 'w') as f:
    json.dump(results, f)


@pytest.fixture(scope='module')
def sweep(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('sweep'))
  for row, per_seed in SCORES.items():
    for seed, scores in enumerate(per_seed):
      _fake_run(os.path.join(workdir, row, f'seed{seed}'), scores,
                [2.0, 4.0, 4.0])
  return workdir


def test_dry_run_lists_every_row_and_seed(tmp_path):
  done = _ablate('--config', CONFIG, '--rows', 'table3,table10,laion_pairs+p_next_1',
                 '--seeds', '2', '--workdir', str(tmp_path), '--dry-run')
  assert done.returncode == 0, done.stderr
  lines = [l for l in done.stdout.splitlines() if not l.startswith('#')]
  rows = plan.expand_rows(['table3', 'table10']) + ['laion_pairs+p_next_1']
  assert len(rows) == 26 and len(lines) == 2 * (len(rows) + 1)
  assert 'seed0 ' in lines[0] and 'ln -s' not in lines[0]  # Baseline first.
  for row in ['baseline'] + rows:
    arg = plan.config_arg(CONFIG, row)
    for seed in range(2):
      matches = [l for l in lines
                 if f'--config={arg} ' in l and f'/{row}/seed{seed} ' in l
                 and f'--config.seed={seed}' in l]
      assert len(matches) == 1, (row, seed)
      # smoke does not evaluate at the end: the sweep evaluates.
      assert 'flamingo_jax.evaluate' in matches[0]
  # The ViT stand-in trains its own vision stage, and reuses the LM's.
  vit = next(l for l in lines if '/vision_clip_vit_l14/seed0 ' in l)
  assert 'seed0/lm ' in vit and 'seed0/vision ' not in vit
  assert not os.listdir(tmp_path)  # Nothing written, nothing run.


@pytest.mark.parametrize('rows,message', [
    ('no_m3w,bogus', "Unknown row(s) ['bogus']"),
    ('no_m3w+p_next_1', "row 'no_m3w+p_next_1' on experiments/tiny.py:smoke: "
     'p_next applies to interleaved documents')])
def test_bad_rows_are_named(tmp_path, rows, message):
  done = _ablate('--config', CONFIG, '--rows', rows,
                 '--workdir', str(tmp_path), '--dry-run')
  assert done.returncode != 0 and message in done.stderr, done.stderr
  assert 'Traceback' not in done.stderr


def test_an_unknown_overall_task_stops_before_any_run(tmp_path):
  done = _ablate('--config', CONFIG, '--rows', 'no_m3w', '--overall_tasks',
                 'captions,bogus', '--workdir', str(tmp_path))
  assert done.returncode != 0, done.stderr
  assert "--overall_tasks ['bogus'] are not among the tasks" in done.stderr
  assert 'Traceback' not in done.stderr and not os.listdir(tmp_path)


def test_collect_builds_the_table_from_finished_runs(sweep):
  before = sorted(os.walk(sweep))
  done = _ablate('--config', CONFIG, '--rows', 'no_m3w,vanilla_xattn',
                 '--seeds', '2', '--workdir', sweep, '--collect')
  assert done.returncode == 0, done.stderr
  assert 'Direction of the overall score as the paper\'s: 1 of 2' in (
      done.stdout)
  for ext in ('md', 'csv', 'png'):
    assert os.path.getsize(os.path.join(sweep, f'ablations.{ext}')) > 0
  after = [(d, s, [f for f in fs if not f.startswith('ablations.')])
           for d, s, fs in sorted(os.walk(sweep))]
  assert after == before  # Read only: no run was touched.
  with open(os.path.join(sweep, 'ablations.csv')) as f:
    rows = {r['row']: r for r in csv.DictReader(f)}
  assert list(rows) == ['baseline', 'no_m3w', 'vanilla_xattn']
  assert rows['no_m3w']['changed'] == 'data.datasets.documents'
  assert rows['vanilla_xattn']['changed'] == 'model.xattn.xattn_type'
  assert float(rows['no_m3w']['paper_overall']) == 53.4
  np.testing.assert_allclose(float(rows['baseline']['step_time_s']), 0.25)
  with open(os.path.join(sweep, 'ablations.md')) as f:
    text = f.read()
  assert '| `no_m3w` | Table 3 (i) w/o M3W |' in text


def test_overall_spread_and_direction(sweep):
  configs = {row: plan.load_config(CONFIG, row) for row in SCORES}
  data = table.build(sweep, ['no_m3w', 'vanilla_xattn'], 2, configs)
  base, no_m3w, vanilla = data['rows']
  assert data['tasks'] == ['captions', 'vqa'] and base['shots'] == [2]
  # Per seed: mean over tasks of score / the baseline's mean (61, 50).
  seeds = [100 * np.mean([30 / 61, 40 / 50]), 100 * np.mean([32 / 61, 42 / 50])]
  np.testing.assert_allclose(no_m3w['overall'][0], np.mean(seeds))
  np.testing.assert_allclose(no_m3w['overall'][1], np.std(seeds, ddof=1))
  np.testing.assert_allclose(base['overall'][0], 100.0)
  np.testing.assert_allclose(no_m3w['scores']['captions'], (31.0, np.sqrt(2)))
  assert (no_m3w['agrees'], no_m3w['above_spread']) == (True, True)
  # Unchanged on average: not the paper's drop, and within the spread.
  assert (vanilla['agrees'], vanilla['above_spread']) == (False, False)
  # Per task: no_m3w's captions (31 ± 1.4 against 61 ± 1.4) and VQA move.
  assert no_m3w['tasks_apart'] == ['captions-', 'vqa-']
  assert vanilla['tasks_apart'] == []
  assert 'tasks_apart' not in base
  assert base['params'] == no_m3w['params'] != vanilla['params']
  np.testing.assert_allclose(no_m3w['paper_relative'], 100 * 53.4 / 70.7)


def test_one_seed_rows_take_the_baselines_spread(sweep):
  """--seeds 1 --baseline_seeds 2: each row's seed 0 against the baseline's
  two seeds, its spread taken as the baseline's (marked in the table)."""
  configs = {row: plan.load_config(CONFIG, row) for row in SCORES}
  data = table.build(sweep, ['no_m3w', 'vanilla_xattn'], 1, configs,
                     baseline_seeds=2)
  base, no_m3w, vanilla = data['rows']
  assert (base['seeds'], no_m3w['seeds'], vanilla['seeds']) == (2, 1, 1)
  base_seeds = [100 * np.mean([60 / 61, 1.0]), 100 * np.mean([62 / 61, 1.0])]
  np.testing.assert_allclose(base['overall'][1], np.std(base_seeds, ddof=1))
  np.testing.assert_allclose(no_m3w['overall'][0],
                             100 * np.mean([30 / 61, 40 / 50]))
  assert no_m3w['overall'][1] is None  # One seed: no spread of its own.
  # 64.6 is 35 below 100, far beyond 2 x 1.16; vanilla's 101.0 is within.
  assert no_m3w['spread_from_baseline'] and vanilla['spread_from_baseline']
  assert (no_m3w['above_spread'], vanilla['above_spread']) == (True, False)
  # Per task, against twice the baseline's spread (VQA's is 0 here).
  assert no_m3w['tasks_apart'] == ['captions-', 'vqa-']
  assert vanilla['tasks_apart'] == ['vqa+']
  text = table.to_markdown(data)
  assert '| yes* | captions-, vqa-* | 1 |' in text
  assert "* One seed: the row's spread taken as the baseline's." in text
  assert '2 of them of one seed' in table.summary(data)
  # Without the baseline's extra seed nothing can be judged.
  alone = table.build(sweep, ['no_m3w'], 1, configs)['rows'][1]
  assert alone['above_spread'] is None and alone['tasks_apart'] is None
  assert not alone['spread_from_baseline']


def test_dry_run_with_more_baseline_seeds_and_evaluate_args(tmp_path):
  done = _ablate('--config', 'experiments/tiny.py', '--rows',
                 'no_m3w,vanilla_xattn', '--seeds', '1', '--baseline_seeds',
                 '3', '--evaluate_arg=--num_queries=256',
                 '--evaluate_arg=--shots=4', '--workdir', str(tmp_path),
                 '--dry-run')
  assert done.returncode == 0, done.stderr
  lines = [l for l in done.stdout.splitlines() if not l.startswith('#')]
  assert len(lines) == 5
  for seed in range(3):
    assert f'/baseline/seed{seed} --config.seed={seed}' in lines[seed]
  assert '/no_m3w/seed0 --config.seed=0' in lines[3]
  assert '/vanilla_xattn/seed0 --config.seed=0' in lines[4]
  # The recipe evaluates at its end; with evaluate flags the sweep does.
  for line in lines:
    run_dir = line.split('--workdir=')[1].split()[0]
    assert line.endswith(
        '--config.evaluate_at_end=False && python -m flamingo_jax.evaluate '
        f'--workdir={run_dir} --num_queries=256 --shots=4'), line
  # The header's collect command names the sweep (a dry run writes none).
  head = done.stdout.splitlines()[0]
  assert head.startswith('# 5 runs of 2 rows + the baseline, 1 seed(s) '
                         '(the baseline 3).')
  collect = head[head.index('python -m'):].split()
  assert collect[3:] == ['--collect', '--config=experiments/tiny.py',
                         '--rows=no_m3w,vanilla_xattn', '--seeds=1',
                         '--baseline_seeds=3', f'--workdir={tmp_path}']


def test_overall_score_over_named_tasks(sweep):
  configs = {row: plan.load_config(CONFIG, row) for row in SCORES}
  data = table.build(sweep, ['no_m3w'], 2, configs, overall_tasks=['vqa'])
  no_m3w = data['rows'][1]
  np.testing.assert_allclose(no_m3w['overall'][0],
                             100 * np.mean([40 / 50, 42 / 50]))
  assert data['overall_tasks'] == ['vqa']
  assert 'mean over tasks (vqa)' in table.to_markdown(data)
  with pytest.raises(ValueError, match=r"\['nonce'\] are not among the "
                     r"runs' tasks \['captions', 'vqa'\]"):
    table.build(sweep, ['no_m3w'], 2, configs, overall_tasks=['nonce'])


def test_a_rerun_sweep_runs_only_what_is_not_done(tmp_path, monkeypatch):
  """Resuming: finished runs are skipped; a run stopped before its final
  step, or trained but not evaluated, runs again; then the table."""
  from flamingo_jax.orchestration.ablation import sweep as sweep_lib  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path)
  rows = ['no_m3w', 'vanilla_xattn']
  for row, per_seed in SCORES.items():
    for seed, scores in enumerate(per_seed):
      _fake_run(os.path.join(workdir, row, f'seed{seed}'), scores, [2.0])
  stopped = os.path.join(workdir, 'no_m3w', 'seed1')
  with open(os.path.join(stopped, 'finished.json'), 'w') as f:
    json.dump({'step': 4}, f)  # Preempted at step 4 of 6.
  unevaluated = os.path.join(workdir, 'vanilla_xattn', 'seed0')
  os.remove(os.path.join(unevaluated, 'eval', 'results.json'))
  ran = []

  def fake_run_one(run, config_file, overrides, configs, workdir,
                   evaluate_args=()):
    del config_file, overrides, configs, workdir, evaluate_args
    ran.append((run.row, run.seed))
    row_scores = SCORES[run.row][run.seed]
    with open(os.path.join(run.workdir, 'finished.json'), 'w') as f:
      json.dump({'step': 6}, f)
    with open(os.path.join(run.workdir, 'eval', 'results.json'), 'w') as f:
      json.dump(dict(scores={t: {'0': s / 2, '2': s}
                             for t, s in row_scores.items()},
                     overall={}, overall_score=None,
                     metadata=dict(step=6, overall_shots=4, shots=[0, 2])), f)
    return 1.0

  monkeypatch.setattr(sweep_lib, '_run_one', fake_run_one)
  configs = sweep_lib.load_configs(CONFIG, rows, [])
  paths = sweep_lib.run_sweep(workdir, CONFIG, rows, 2, [], configs)
  assert ran == [('no_m3w', 1), ('vanilla_xattn', 0)]
  assert sorted(os.path.basename(p) for p in paths) == [
      'ablations.csv', 'ablations.md', 'ablations.png']
  ran.clear()
  sweep_lib.run_sweep(workdir, CONFIG, rows, 2, [], configs)
  assert not ran  # All done: a third call runs nothing.


def test_jobs_run_side_by_side_after_the_baselines_first_seed(tmp_path,
                                                              monkeypatch):
  """With jobs=2 the baseline's seed 0 runs alone first (the others link its
  stages), then two runs at once: a barrier of two that one-at-a-time
  running would never pass."""
  import threading  # pylint: disable=g-import-not-at-top
  from flamingo_jax.orchestration.ablation import sweep as sweep_lib  # pylint: disable=g-import-not-at-top
  workdir, rows = str(tmp_path), ['no_m3w']
  both = threading.Barrier(2, timeout=20)
  lock, active, events = threading.Lock(), [0], []

  def fake_run_one(run, config_file, overrides, configs, workdir,
                   evaluate_args=()):
    del config_file, overrides, configs, workdir, evaluate_args
    with lock:
      active[0] += 1
      events.append(('start', run.row, run.seed, active[0]))
    if run.row == 'no_m3w':
      both.wait()  # Both no_m3w seeds are running now.
    _fake_run(run.workdir, SCORES[run.row][run.seed], [2.0])
    with lock:
      active[0] -= 1
      events.append(('end', run.row, run.seed))
    return 1.0

  monkeypatch.setattr(sweep_lib, '_run_one', fake_run_one)
  configs = sweep_lib.load_configs(CONFIG, rows, [])
  sweep_lib.run_sweep(workdir, CONFIG, rows, 2, [], configs, jobs=2)
  assert events[:2] == [('start', 'baseline', 0, 1), ('end', 'baseline', 0)]
  assert max(e[3] for e in events if e[0] == 'start') == 2
  assert len(events) == 8  # 4 runs, each started and ended once.
