"""The ablation sweep behind `python -m flamingo_jax.ablate`.

Trains the baseline (the config as given) and every row (a name from
experiments/ablations.py's ABLATIONS, several joined by '+', or `table3` /
`table10` for all of a table's rows) once per seed, each run in its own
workdir W/<row>/seed<k> with the existing recipe (`python -m
flamingo_jax.train`, then `python -m flamingo_jax.evaluate` when the config
does not evaluate at the end), one after the other or `--jobs` at a time
(the baseline's seed 0 always first). A run already done (its
training's finished marker and its eval/results.json) is skipped, so the
same command resumes the sweep. Runs whose pretraining stages equal the
baseline's reuse W/baseline/seed0's (see plan.py).

`--dry-run` (`print_commands`) prints each run's commands instead (a shell
script: run the baseline's seed 0 first, then the rest in parallel, e.g. one
cluster job per line); `--collect` (`collect`) then (or after a sweep, which
collects at its end) builds, from the finished workdirs alone and without
running anything:

  W/ablations.md    the paper's columns: row, setting, changed config keys,
                    parameter count, step time, a score per task, overall
                    score (mean of score / baseline), the paper's figures
                    and whether the direction agrees, the seed spread
  W/ablations.csv   the same, one field per figure
  W/ablations.png   overall score per row with seed error bars (and the
                    paper's, relative to its baseline)
"""

import concurrent.futures
import os
import re
import shlex
import subprocess
import sys
import time

from absl import flags
from absl import logging

from flamingo_jax.orchestration.ablation import plan
from flamingo_jax.orchestration.ablation import table


def load_configs(config_file, rows, overrides):
  """row -> its config; a row the config cannot take stops with its name."""
  configs = {}
  for row in [plan.BASELINE, *rows]:
    try:
      configs[row] = plan.load_config(config_file, row, overrides)
    except (ValueError, KeyError, flags.Error) as e:
      why = str(e).strip().splitlines()[-1]  # The config's own error.
      sys.exit(f'ablate: row {row!r} on {config_file}: '
               f'{re.sub(r"^[A-Za-z]*Error: ", "", why)}')
  return configs


def _shell(run, config_file, overrides, configs, workdir, evaluate_args=()):
  """One line of shell that sets up and runs `run`."""
  parts = []
  shared = plan.shared_stages(configs[run.row], configs[plan.BASELINE])
  if shared and not (run.row == plan.BASELINE and run.seed == 0):
    source = os.path.relpath(os.path.join(workdir, plan.BASELINE, 'seed0'),
                             run.workdir)
    parts.append(f'mkdir -p {shlex.quote(run.workdir)}')
    parts += [f'ln -sfn {shlex.quote(os.path.join(source, name))} '
              f'{shlex.quote(os.path.join(run.workdir, name))}'
              for name in shared]
  parts += [shlex.join(c) for c in plan.commands(
      run, config_file, overrides, configs[run.row], python='python',
      evaluate_args=evaluate_args)]
  return ' && '.join(parts)


def _run_one(run, config_file, overrides, configs, workdir,
             evaluate_args=()) -> float:
  """Trains and evaluates `run`; returns its wall time in seconds."""
  config = configs[run.row]
  linked = plan.link_stages(
      run, plan.shared_stages(config, configs[plan.BASELINE]), workdir)
  if linked:
    logging.info('%s seed %d: stages %s from %s/seed0.', run.row, run.seed,
                 linked, plan.BASELINE)
  os.makedirs(run.workdir, exist_ok=True)
  log_path = os.path.join(run.workdir, 'ablate.log')
  started = time.time()
  with open(log_path, 'a') as log:
    for command in plan.commands(run, config_file, overrides, config,
                                 evaluate_args=evaluate_args):
      logging.info('%s seed %d: %s (log: %s)', run.row, run.seed,
                   shlex.join(command[1:4]), log_path)
      done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT,
                            check=False)
      if done.returncode:
        with open(log_path) as f:
          tail = f.read()[-3000:]
        raise RuntimeError(f'{run.row} seed {run.seed} failed (exit '
                           f'{done.returncode}): {shlex.join(command)}\n'
                           f'... {log_path}:\n{tail}')
  return time.time() - started


def collect(workdir, config_file, rows, seeds, overrides,
            overall_tasks=None, baseline_seeds=None) -> list[str]:
  """Builds W/ablations.* from the finished runs (the overall score over
  `overall_tasks`, None: every task); returns their paths."""
  configs = load_configs(config_file, rows, overrides)
  data = table.build(workdir, rows, seeds, configs, overall_tasks,
                     baseline_seeds)
  paths = table.write(data, workdir)
  print(table.summary(data))
  return paths



def print_commands(workdir, config_file, rows, seeds, overrides,
                   configs, baseline_seeds=None, evaluate_args=()) -> None:
  """--dry-run: each run's line of shell, the baseline's seed 0 first."""
  runs = plan.runs(workdir, rows, seeds, baseline_seeds)
  extra = (f' (the baseline {baseline_seeds})'
           if baseline_seeds and baseline_seeds > seeds else '')
  print(f'# {len(runs)} runs of {len(rows)} rows + the baseline, '
        f'{seeds} seed(s){extra}. Run the first line first (later runs '
        'reuse its pretraining stages), then the others in any order; '
        'then (a dry run writes no W/sweep.json, so name the sweep): '
        + shlex.join(['python', '-m', 'flamingo_jax.ablate', '--collect',
                      f'--config={config_file}', f'--rows={",".join(rows)}',
                      f'--seeds={seeds}',
                      f'--baseline_seeds={baseline_seeds or 0}',
                      *[f'--override={o}' for o in overrides],
                      f'--workdir={workdir}']))
  for run in runs:
    print(_shell(run, config_file, overrides, configs, workdir,
                 evaluate_args))


def run_sweep(workdir, config_file, rows, seeds, overrides, configs, *,
              jobs: int = 1, overall_tasks=None, baseline_seeds=None,
              evaluate_args=()) -> list[str]:
  """Trains and evaluates every run not done yet, then collects; returns the
  paths `collect` wrote.

  The baseline's seed 0 runs first and alone (the others link its stages),
  then the rest, `jobs` at a time: on a few cores, small runs side by side
  get more done than one after the other (each alone leaves cores idle).
  """
  runs = plan.runs(workdir, rows, seeds, baseline_seeds)
  plan.write_sweep(workdir, config_file, overrides, rows, seeds,
                   baseline_seeds, evaluate_args)
  todo = []
  for i, run in enumerate(runs, 1):
    if plan.is_done(run.workdir, configs[run.row]):
      logging.info('[%d/%d] %s seed %d: done already.', i, len(runs),
                   run.row, run.seed)
    else:
      todo.append(run)
  first = [r for r in todo if r.row == plan.BASELINE and r.seed == 0]
  _run_all(first, 1, config_file, overrides, configs, workdir, evaluate_args)
  _run_all([r for r in todo if r not in first], jobs, config_file, overrides,
           configs, workdir, evaluate_args)
  return collect(workdir, config_file, rows, seeds, overrides, overall_tasks,
                 baseline_seeds)


def _run_all(runs, jobs, config_file, overrides, configs, workdir,
             evaluate_args=()) -> None:
  """Runs `runs`, `jobs` at a time; the first failure stops what has not
  started and is raised once the started runs end."""
  with concurrent.futures.ThreadPoolExecutor(max(1, jobs)) as pool:
    futures = {pool.submit(_run_one, run, config_file, overrides, configs,
                           workdir, evaluate_args): run for run in runs}
    try:
      for done, future in enumerate(
          concurrent.futures.as_completed(futures), 1):
        run = futures[future]
        seconds = future.result()
        logging.info('[%d/%d] %s seed %d: finished in %.0f s.', done,
                     len(runs), run.row, run.seed, seconds)
    except BaseException:
      pool.shutdown(wait=True, cancel_futures=True)
      raise
