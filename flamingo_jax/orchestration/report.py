"""The run's human summary: W/report.md, linking every stage's figures.

  python -m flamingo_jax.report --workdir W      (the recipe writes it too)

One section per stage of the recipe (W/<stage>/ then W itself): steps, the
first and last logged loss (and the stage's other headline metrics), the
wall time of the logged steps, and its plots; then the few-shot results of
W/eval/results.json as a table, with W/eval/scores.png. Everything is read
from what the run left on disk, so the report can be rebuilt at any time.
"""

from collections.abc import Mapping, Sequence
import json
import time
from typing import Any

from flamingo_jax import fs
from flamingo_jax.training import metrics as metrics_lib

# Metrics shown per stage when present (first -> last logged value).
HEADLINE_PREFIXES = ('loss', 'i2t_accuracy', 't2i_accuracy', 'probe')


def _started(directory: str) -> float:
  for name in ('config.json', 'metrics.jsonl'):
    path = fs.join(directory, name)
    if fs.exists(path):
      return fs.getmtime(path)
  return 0.0


def _stage_dirs(workdir: str) -> list[tuple[str, str]]:
  """(name, directory) of the stages under W that trained, then W."""
  # In the order they ran: by when each began (its config.json is written
  # first).
  stages = sorted(
      (name for name in fs.listdir(workdir)
       if fs.exists(fs.join(workdir, name, 'metrics.jsonl'))),
      key=lambda name: _started(fs.join(workdir, name)))
  found = [(name, fs.join(workdir, name)) for name in stages]
  if fs.exists(fs.join(workdir, 'metrics.jsonl')):
    found.append(('main (Flamingo)', workdir))
  return found


def _headline(rows: Sequence[Mapping[str, Any]]) -> list[tuple[str, Any, Any]]:
  keys = sorted({k for row in rows for k in row
                 if k.split('/')[0] in HEADLINE_PREFIXES})
  out = []
  for key in keys:
    values = [row[key] for row in rows if key in row]
    out.append((key, values[0], values[-1]))
  return out


def _stage_section(name: str, directory: str, workdir: str) -> list[str]:
  rows = metrics_lib.read_metrics(directory)
  lines = [f'## Stage: {name}', '']
  if not rows:
    return lines + ['No metrics logged.', '']
  metrics_path = fs.relpath(fs.join(directory, 'metrics.jsonl'), workdir)
  lines.append(f'{rows[-1]["step"]} steps, logged in `{metrics_path}`.')
  lines += ['', '| metric | first logged | last logged |', '|---|---|---|']
  for key, first, last in _headline(rows):
    lines.append(f'| {key} | {first:.4g} | {last:.4g} |')
  lines.append('')
  plots = fs.join(directory, 'plots')
  if fs.isdir(plots):
    for png in sorted(p for p in fs.listdir(plots) if p.endswith('.png')):
      rel = fs.relpath(fs.join(plots, png), workdir)
      lines.append(f'![{name} {png}]({rel})')
    lines.append('')
  return lines


def _eval_section(workdir: str) -> list[str]:
  path = fs.join(workdir, 'eval', 'results.json')
  if not fs.exists(path):
    return ['## Few-shot evaluation', '',
            'Not run yet: `python -m flamingo_jax.evaluate --workdir '
            f'{workdir}`.', '']
  results = json.loads(fs.read_text(path))
  scores = results['scores']
  shots = sorted({int(s) for by in scores.values() for s in by})
  metrics = results.get('metadata', {}).get('metrics', {})
  lines = ['## Few-shot evaluation', '',
           f'Checkpoint step {results.get("metadata", {}).get("step")}; '
           'scores x 100 (`eval/results.json`, predictions in '
           '`eval/predictions/`).', '',
           '| task | metric | ' + ' | '.join(f'{s}-shot' for s in shots) +
           ' |', '|---|---|' + '---|' * len(shots)]
  for task, by_shots in scores.items():
    cells = [f'{by_shots[str(s)]:.2f}' if str(s) in by_shots else '-'
             for s in shots]
    lines.append(f'| {task} | {metrics.get(task, "")} | ' +
                 ' | '.join(cells) + ' |')
  if results.get('overall_score') is not None:
    lines += ['', f'Overall score (mean of score / reference, as Table 3): '
              f'{100 * results["overall_score"]:.1f}%.']
  if fs.exists(fs.join(workdir, 'eval', 'scores.png')):
    lines += ['', '![scores vs shots](eval/scores.png)']
  return lines + ['']


def write_report(workdir: str) -> str:
  """Writes W/report.md from what the run left; returns its path."""
  if not fs.isdir(workdir):
    raise FileNotFoundError(f'No workdir {workdir!r}.')
  lines = ['# Flamingo run report', '',
           f'Workdir `{fs.absolute(workdir)}`, written '
           f'{time.strftime("%Y-%m-%d %H:%M:%S")}. Config: `config.json` '
           '(each stage has its own).', '']
  stages = _stage_dirs(workdir)
  if not stages:
    lines += ['No stage has logged metrics yet.', '']
  for name, directory in stages:
    lines += _stage_section(name, directory, workdir)
  lines += _eval_section(workdir)
  path = fs.join(workdir, 'report.md')
  with fs.open_file(path, 'w') as f:
    f.write('\n'.join(lines))
  return path

