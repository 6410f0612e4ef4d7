"""The sweep's results in the paper's form: W/ablations.md, .csv and .png.

Read from finished runs only (nothing is trained or evaluated here): each
run's W/<row>/seed<k>/eval/results.json (the scores at the evaluation's
`overall_shots`, 4, or its most shots below that) and metrics.jsonl (the
step time: the median of 1 / steps_per_sec over the Flamingo stage's logged
steps). Per row, over its seeds:

  overall   the mean over tasks of score / the baseline's mean score, x 100
            (Table 3's overall score, with our baseline as the divisor;
            tasks where the baseline scores 0 are left out, and with
            `overall_tasks` only those: a task the baseline scores near 0
            makes its ratio noise);
  spread    the standard deviation over seeds (ddof 1) of every figure;
  paper     the paper's parameter count, step time and overall score, and
            that score relative to its Flamingo-3B row (70.7 = 100);
  agrees    the row moves the overall score the way the paper's does
            (both below their baseline, or both above);
  > spread  |ours - baseline| exceeds the row's spread plus the baseline's.
            A row of one seed beside a baseline of several (`ablate
            --baseline_seeds`) takes the baseline's spread as its own: the
            same recipe with another seed, so |ours - baseline| is judged
            against twice the baseline's spread (marked * in the table).
"""

import csv
import json
import math
import os
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from experiments import ablations
from flamingo_jax.orchestration.ablation import plan


def _mean_std(values: Sequence[float]) -> tuple[float, Optional[float]]:
  values = [v for v in values if v is not None and not math.isnan(v)]
  if not values:
    return math.nan, None
  std = float(np.std(values, ddof=1)) if len(values) > 1 else None
  return float(np.mean(values)), std


def read_run(run_dir: str) -> Optional[dict[str, Any]]:
  """{'scores': {task: score}, 'shots': k, 'step_time': s} of a finished
  run's evaluation and metrics, or None when it has no results."""
  path = os.path.join(run_dir, 'eval', 'results.json')
  if not os.path.exists(path):
    return None
  with open(path) as f:
    results = json.load(f)
  by_task = results.get('scores') or {}
  available = sorted({int(s) for by_shots in by_task.values()
                      for s in by_shots})
  wanted = int(results.get('metadata', {}).get('overall_shots', 4))
  below = [s for s in available if s <= wanted]
  shots = max(below) if below else (available[-1] if available else None)
  scores = {task: float(by_shots[str(shots)])
            for task, by_shots in by_task.items() if str(shots) in by_shots}
  return dict(scores=scores, shots=shots, step_time=_step_time(run_dir))


def _step_time(run_dir: str) -> Optional[float]:
  path = os.path.join(run_dir, 'metrics.jsonl')
  if not os.path.exists(path):
    return None
  rates = []
  with open(path) as f:
    for line in f:
      try:
        rate = json.loads(line).get('steps_per_sec')
      except (json.JSONDecodeError, AttributeError):
        continue
      if rate:
        rates.append(1.0 / rate)
  return float(np.median(rates)) if rates else None


def _fmt(mean: float, std: Optional[float], digits: int = 1) -> str:
  if mean is None or math.isnan(mean):
    return '-'
  text = f'{mean:.{digits}f}'
  return text + (f' ± {std:.{digits}f}' if std is not None else '')


def build(workdir: str, rows: Sequence[str], seeds: int,
          configs: Mapping[str, Any],
          overall_tasks: Optional[Sequence[str]] = None,
          baseline_seeds: Optional[int] = None) -> dict[str, Any]:
  """The table's data. `configs`: row -> its config (the baseline too);
  `overall_tasks`: the tasks the overall score averages (None: all);
  `baseline_seeds`: the baseline's seeds when more than `seeds`.

  Raises:
    ValueError: naming an overall task that no run scored.
  """
  per_row = {}
  for row in [plan.BASELINE, *rows]:
    found = [read_run(os.path.join(workdir, row, f'seed{s}'))
             for s in range(plan.seeds_of(row, seeds, baseline_seeds))]
    per_row[row] = [r for r in found if r is not None]
  base_runs = per_row[plan.BASELINE]
  tasks = sorted({t for runs in per_row.values() for r in runs
                  for t in r['scores']})
  base_mean = {t: _mean_std([r['scores'].get(t, math.nan)
                             for r in base_runs])[0] for t in tasks}
  divisors = {t: m for t, m in base_mean.items() if m and not math.isnan(m)}
  if overall_tasks:
    unknown = sorted(set(overall_tasks) - set(tasks))
    if unknown:
      raise ValueError(f'Overall task(s) {unknown} are not among the runs\' '
                       f'tasks {tasks}.')
    divisors = {t: m for t, m in divisors.items() if t in overall_tasks}
  paper_base = ablations.PAPER_BASELINE
  out_rows = []
  for row, runs in per_row.items():
    overall_per_seed = [
        100 * float(np.mean([r['scores'][t] / divisors[t]
                             for t in divisors if t in r['scores']]))
        for r in runs if any(t in r['scores'] for t in divisors)]
    entry = dict(
        row=row, seeds=len(runs),
        setting=_setting(row),
        changed=(plan.row_changes(configs[plan.BASELINE], configs[row])
                 if row != plan.BASELINE else []),
        params=plan.parameter_count(configs[row]),
        step_time=_mean_std([r['step_time'] for r in runs]),
        scores={t: _mean_std([r['scores'].get(t, math.nan) for r in runs])
                for t in tasks},
        overall=_mean_std(overall_per_seed),
        shots=sorted({r['shots'] for r in runs}))
    paper = (paper_base if row == plan.BASELINE else
             ablations.ABLATIONS[row].paper if '+' not in row else None)
    entry['paper'] = paper
    entry['paper_relative'] = (100 * paper.overall / paper_base.overall
                               if paper else None)
    out_rows.append(entry)
  base = out_rows[0]
  for entry in out_rows[1:]:
    ours, spread = entry['overall']
    base_mean_overall, base_spread = base['overall']
    delta = ours - base_mean_overall
    entry['delta'] = delta
    paper = entry['paper']
    entry['paper_delta'] = (paper.overall - paper_base.overall
                            if paper else None)
    entry['agrees'] = (None if paper is None or math.isnan(delta)
                       else (delta < 0) == (entry['paper_delta'] < 0))
    entry['spread_from_baseline'] = (spread is None and entry['seeds'] == 1
                                     and base_spread is not None)
    if entry['spread_from_baseline']:
      spread = base_spread
    entry['above_spread'] = (
        None if spread is None or base_spread is None or math.isnan(delta)
        else abs(delta) > spread + base_spread)
    entry['tasks_apart'] = _tasks_apart(
        entry['scores'], base['scores'], entry['spread_from_baseline'])
  return dict(rows=out_rows, tasks=tasks, seeds=seeds,
              overall_tasks=sorted(divisors))


def _tasks_apart(scores, base_scores,
                 spread_from_baseline: bool = False) -> Optional[list[str]]:
  """['captions-', 'vqa+']: the tasks whose mean moves from the baseline's
  by more than the two seed spreads together (None: under 2 seeds; with
  `spread_from_baseline`, the baseline's spread is the row's too). The
  overall score can hide them: a task near 0 makes its ratio noise."""
  apart = []
  for task, (mean, std) in scores.items():
    base_mean, base_std = base_scores.get(task, (math.nan, None))
    if spread_from_baseline:
      std = base_std
    if std is None or base_std is None:
      return None
    if abs(mean - base_mean) > std + base_std:
      apart.append(task + ('+' if mean > base_mean else '-'))
  return apart


def _setting(row: str) -> str:
  if row == plan.BASELINE:
    return 'the config as given'
  return ' + '.join(ablations.ABLATIONS[name].row
                    for name in row.split('+'))


def _yes_no(value: Optional[bool]) -> str:
  return '-' if value is None else ('yes' if value else 'no')


def summary(table: Mapping[str, Any]) -> str:
  """How many rows agree with the paper's direction / exceed the spread."""
  rows = [r for r in table['rows'][1:] if r['seeds']]
  judged = [r for r in rows if r['agrees'] is not None]
  agree = sum(r['agrees'] for r in judged)
  spread = [r for r in rows if r['above_spread'] is not None]
  above = sum(r['above_spread'] for r in spread)
  text = (f'Direction of the overall score as the paper\'s: {agree} of '
          f'{len(judged)} rows. ')
  if spread:
    text += (f'Difference from the baseline above the seed spread: {above} '
             f'of {len(spread)} rows.')
    one_seed = [r for r in spread if r.get('spread_from_baseline')]
    if one_seed:
      text += (f' ({len(one_seed)} of them of one seed, against twice the '
               'baseline\'s spread.)')
    apart = [r for r in spread if r.get('tasks_apart')]
    text += (f' Rows with a task apart from the baseline by more than the '
             f'seed spread: {len(apart)} of {len(spread)}.')
  else:
    text += 'Seed spread: needs 2 or more seeds per row.'
  return text


def _task_list(tasks: Optional[list[str]]) -> str:
  return '-' if tasks is None else (', '.join(tasks) or 'none')


def to_markdown(table: Mapping[str, Any]) -> str:
  tasks = table['tasks']
  head = (['row', 'setting', 'changed', 'params', 'step time (s)'] + tasks +
          ['overall (% of baseline)', 'paper: params / step (s) / overall '
           '(% of its baseline)', 'direction as paper', '> seed spread',
           'tasks > seed spread', 'seeds'])
  lines = ['| ' + ' | '.join(head) + ' |',
           '|' + '---|' * len(head)]
  for r in table['rows']:
    paper = r['paper']
    paper_text = (f'{paper.params}B / {paper.step_time:.2f} / '
                  f'{paper.overall} ({r["paper_relative"]:.1f}%)'
                  if paper else '-')
    cells = [f'`{r["row"]}`', r['setting'],
             ', '.join(f'`{k}`' for k in r['changed']) or '-',
             f'{r["params"] / 1e9:.3f}B' if r['params'] >= 1e8 else
             f'{r["params"] / 1e6:.2f}M',
             _fmt(*r['step_time'], digits=3)]
    cells += [_fmt(*r['scores'][t]) for t in tasks]
    direction = ('no (unchanged)' if r.get('delta') == 0 else
                 _yes_no(r.get('agrees')))
    mark = '*' if r.get('spread_from_baseline') else ''
    cells += [_fmt(*r['overall']), paper_text,
              direction, _yes_no(r.get('above_spread')) + mark,
              _task_list(r.get('tasks_apart')) + mark, str(r['seeds'])]
    lines.append('| ' + ' | '.join(cells) + ' |')
  shots = sorted({s for r in table['rows'] for s in r['shots']})
  return '\n'.join([
      '# Ablations', '',
      f'Scores at {"/".join(map(str, shots))} shots, mean ± standard '
      f'deviation over seeds; overall = mean over tasks '
      f'({", ".join(table.get("overall_tasks") or table["tasks"])}) of '
      f'score / the baseline\'s mean score (x 100). The paper\'s figures are Flamingo-3B\'s'
      f' (its overall score divides by the fine-tuned state of the art; '
      f'shown also as % of its own baseline, 70.7).'
      + (' * One seed: the row\'s spread taken as the baseline\'s.'
         if any(r.get('spread_from_baseline') for r in table['rows'])
         else ''), '',
      summary(table), '', *lines, '',
      '![overall score per row](ablations.png)', ''])


def write_csv(table: Mapping[str, Any], path: str) -> None:
  tasks = table['tasks']
  fields = (['row', 'setting', 'changed', 'params', 'step_time_s',
             'step_time_std'] + [x for t in tasks for x in (t, f'{t}_std')] +
            ['overall', 'overall_std', 'delta', 'paper_params_b',
             'paper_step_time_s', 'paper_overall', 'paper_overall_relative',
             'paper_delta', 'direction_agrees', 'above_spread',
             'tasks_above_spread', 'spread_from_baseline', 'seeds'])
  with open(path, 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=fields)
    writer.writeheader()
    for r in table['rows']:
      paper = r['paper']
      record = dict(
          row=r['row'], setting=r['setting'], changed=';'.join(r['changed']),
          params=r['params'], step_time_s=r['step_time'][0],
          step_time_std=r['step_time'][1], overall=r['overall'][0],
          overall_std=r['overall'][1], delta=r.get('delta'),
          paper_params_b=paper.params if paper else None,
          paper_step_time_s=paper.step_time if paper else None,
          paper_overall=paper.overall if paper else None,
          paper_overall_relative=r['paper_relative'],
          paper_delta=r.get('paper_delta'),
          direction_agrees=r.get('agrees'),
          above_spread=r.get('above_spread'),
          tasks_above_spread=';'.join(r.get('tasks_apart') or []),
          spread_from_baseline=r.get('spread_from_baseline'),
          seeds=r['seeds'])
      for t in tasks:
        record[t], record[f'{t}_std'] = r['scores'][t]
      writer.writerow(record)


def plot(table: Mapping[str, Any], path: str) -> None:
  """Overall score per row with seed error bars; the paper's as dots."""
  # pylint: disable=g-import-not-at-top
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  # pylint: enable=g-import-not-at-top
  rows = table['rows']
  x = np.arange(len(rows))
  means = [r['overall'][0] for r in rows]
  errors = [r['overall'][1] or 0.0 for r in rows]
  fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(rows) + 2), 4.5))
  ax.bar(x, means, yerr=errors, capsize=3, color='tab:blue', alpha=0.8,
         label='ours (± seed std)')
  paper = [(i, r['paper_relative']) for i, r in enumerate(rows)
           if r['paper_relative'] is not None]
  if paper:
    ax.plot(*zip(*paper), 'o', color='tab:red',
            label='paper (% of its baseline)')
  ax.axhline(100, color='gray', linewidth=0.8)
  ax.set_xticks(x, [r['row'] for r in rows], rotation=60, ha='right',
                fontsize=8)
  ax.set_ylabel('overall score (% of baseline)')
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def write(table: Mapping[str, Any], workdir: str) -> list[str]:
  """W/ablations.md, .csv and .png; returns their paths."""
  paths = [os.path.join(workdir, f'ablations.{ext}')
           for ext in ('md', 'csv', 'png')]
  with open(paths[0], 'w') as f:
    f.write(to_markdown(table))
  write_csv(table, paths[1])
  plot(table, paths[2])
  return paths
