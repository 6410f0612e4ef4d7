"""The few-shot runner's outputs: scores, results.json, files, the table.

`evaluate` (`runner.py`) hands every task x shots to a `Collector`, which
writes `<out>/results.json` = {'scores': {task: {shots: score}}, 'overall':
{shots: overall score}, 'overall_score': the one at `overall_shots`,
'answer_types': {task: {shots: {'overall', 'yes/no', 'number', 'other'}}}
(VQA tasks whose dataset has answer types, VQAv2's), 'vqa_results': {task:
{shots: file}}, 'metadata': {...}}, `<out>/scores.png` (`plots.py`), and
`<out>/predictions/<task>_<shots>shot.jsonl` (prompt, prediction, target,
and a VQA query's question_id). A VQA task whose queries have no answers
(VQAv2 test-dev: `query_split='test'`) is not scored; its predictions go to
the evaluation server's results file
`<out>/vqa_results/<task>_<shots>shot.json` ([{question_id, answer}]),
written for every VQA task with `vqa_results=True`. `format_table` prints
the scores (a VQAv2 task with one row per answer type).
"""

from collections.abc import Callable, Mapping, Sequence
import json
import os
import time
from typing import Any

import numpy as np

from flamingo_jax import fs
from flamingo_jax.evaluation import metrics
from flamingo_jax.evaluation import tasks as tasks_lib


def _reference(reference: Mapping[str, Any], task: str, shots: int
               ) -> float | None:
  value = reference.get(task)
  if isinstance(value, Mapping):
    value = value.get(str(shots), value.get(shots))
  return None if value is None else float(value)


def overall_scores(scores: Mapping[str, Mapping[str, float]],
                   reference: Mapping[str, Any]) -> dict[str, float]:
  """{shots: metrics.overall_score over the tasks with a reference > 0}."""
  out = {}
  shots_all = sorted({int(s) for by_shots in scores.values()
                      for s in by_shots})
  for shots in shots_all:
    have, ref = {}, {}
    for task, by_shots in scores.items():
      value = _reference(reference, task, shots)
      if str(shots) in by_shots and value:
        have[task], ref[task] = by_shots[str(shots)], value
    if have:
      out[str(shots)] = metrics.overall_score(have, ref)
  return out


class Collector:
  """Gathers the scores of tasks x shots; writes their files as they come."""

  def __init__(self, out_dir: str | None, *, vqa_results: bool = False,
               log: Callable[[str], None] = print):
    self.out_dir, self.vqa_results, self.log = out_dir, vqa_results, log
    self.scores: dict[str, dict[str, float]] = {}
    self.answer_types: dict[str, dict[str, dict[str, float]]] = {}
    self.server_files: dict[str, dict[str, str]] = {}
    self.started = time.time()

  def add(self, task: tasks_lib.Task, shots: int, score: float | None,
          records: Sequence[Mapping[str, Any]]) -> None:
    """One task's score at `shots` (None: no answers) and its records."""
    if score is None:
      self.log(f'{task.name} {shots}-shot: no answers to score '
               f'({len(task.queries)} queries); see its server results file')
    else:
      self.scores.setdefault(task.name, {})[str(shots)] = score
      self.log(f'{task.name} {shots}-shot: {task.metric} {score:.2f} '
               f'({len(task.queries)} queries)')
      breakdown = task.score_by_answer_type(
          [r['prediction'] for r in records])
      if breakdown:
        self.answer_types.setdefault(task.name, {})[str(shots)] = breakdown
    if self.out_dir:
      write_records(self.out_dir, task.name, shots, records)
      if task.kind == 'vqa' and (score is None or self.vqa_results):
        self.server_files.setdefault(task.name, {})[str(shots)] = (
            write_vqa_results(self.out_dir, task, shots, records))

  def results(self, loaded: Sequence[tasks_lib.Task],
              eval_config: Mapping[str, Any], settings: Any,
              step: int | None) -> dict[str, Any]:
    """The results (`runner.Settings` `settings`), written to results.json
    and scores.png when there is an out_dir."""
    reference = dict(eval_config.get('reference') or {})
    overall = overall_scores(self.scores, reference)
    overall_shots = str(eval_config.get('overall_shots', 4))
    results = dict(
        scores=self.scores,
        overall=overall,
        overall_score=overall.get(overall_shots),
        answer_types=self.answer_types,
        vqa_results=self.server_files,
        metadata=dict(
            step=step, time=time.strftime('%Y-%m-%d %H:%M:%S'),
            seconds=round(time.time() - self.started, 1),
            shots=list(settings.shots),
            num_queries={t.name: len(t.queries) for t in loaded},
            metrics={t.name: t.metric for t in loaded},
            datasets={t.name: t.dataset for t in loaded},
            rices=settings.rices, ensemble=settings.ensemble,
            beam_size=settings.beam_size, seed=settings.seed,
            overall_shots=int(overall_shots),
            reference={t.name: reference.get(t.name) for t in loaded}))
    if self.out_dir:
      fs.makedirs(self.out_dir)
      with fs.open_file(fs.join(self.out_dir, 'results.json'), 'w') as f:
        json.dump(jsonable(results), f, indent=2)
      # pylint: disable-next=g-import-not-at-top
      from flamingo_jax.evaluation import plots
      plots.plot_scores(results, fs.join(self.out_dir, 'scores.png'))
    return results


def write_vqa_results(out_dir: str, task: tasks_lib.Task, shots: int,
                      records: Sequence[Mapping[str, Any]]) -> str:
  """Writes a VQA task's predictions as the evaluation server reads them.

  `<out_dir>/vqa_results/<task>_<shots>shot.json`: [{"question_id": int,
  "answer": str}] (`vqa.vqa_results`); rename it for the server, e.g.
  vqa_test-dev2015_<method>_results.json for VQAv2 test-dev on EvalAI.
  A query without a question_id (a hand-made task) gets its index.

  Returns:
    The file's path relative to `out_dir`.
  """
  relative = fs.join('vqa_results', f'{task.name}_{shots}shot.json')
  question_ids = [r.get('question_id', r['query']) for r in records]
  results = metrics.vqa_results(question_ids,
                                [r['prediction'] for r in records])
  fs.makedirs(fs.join(out_dir, 'vqa_results'))
  with fs.open_file(fs.join(out_dir, relative), 'w') as f:
    json.dump(results, f)
  return relative


def write_records(out_dir: str, task: str, shots: int,
                  records: Sequence[Mapping[str, Any]]) -> None:
  """`<out_dir>/predictions/<task>_<shots>shot.jsonl`: one record a line."""
  directory = fs.join(out_dir, 'predictions')
  fs.makedirs(directory)
  with fs.open_file(fs.join(directory, f'{task}_{shots}shot.jsonl'), 'w') as f:
    for record in records:
      f.write(json.dumps(jsonable(record)) + '\n')


def jsonable(value: Any) -> Any:
  """`value` with numpy scalars and bytes made JSON types."""
  if isinstance(value, Mapping):
    return {str(k): jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [jsonable(v) for v in value]
  if isinstance(value, (np.floating, np.integer)):
    return value.item()
  if isinstance(value, bytes):
    return value.decode('utf-8', 'replace')
  return value


def format_table(results: Mapping[str, Any]) -> str:
  """The scores as a text table: one row per task, one column per shots."""
  scores = results['scores']
  shots = sorted({int(s) for by in scores.values() for s in by})
  metric = results.get('metadata', {}).get('metrics', {})
  unscored = {t: files for t, files in
              (results.get('vqa_results') or {}).items() if t not in scores}
  width = max([len('overall')] + [len(t) for t in scores] +
              [len(t) for t in unscored]) + 2
  header = (f'{"task":<{width}}{"metric":<14}' +
            ''.join(f'{f"{s}-shot":>9}' for s in shots))
  lines = [header, '-' * len(header)]

  def cells(by_shots):
    return ''.join(f'{by_shots[str(s)]:>9.2f}' if str(s) in by_shots
                   else f'{"-":>9}' for s in shots)

  by_type = results.get('answer_types') or {}
  for task, by_shots in scores.items():
    lines.append(f'{task:<{width}}{metric.get(task, ""):<14}'
                 f'{cells(by_shots)}')
    types = sorted({t for by in by_type.get(task, {}).values() for t in by}
                   - {'overall'})
    for answer_type in types:
      lines.append(f'{"  " + answer_type:<{width}}{"answer type":<14}' +
                   cells({s: by[answer_type] for s, by in
                          by_type[task].items() if answer_type in by}))
  for task, files in unscored.items():
    lines.append(f'{task:<{width}}no answers: server results in '
                 f'{os.path.dirname(next(iter(files.values())))}/')
  overall = results.get('overall') or {}
  if overall:
    cells = ''.join(f'{100 * overall[str(s)]:>8.1f}%' if str(s) in overall
                    else f'{"-":>9}' for s in shots)
    lines.append(f'{"overall":<{width}}{"vs reference":<14}{cells}')
  return '\n'.join(lines)
