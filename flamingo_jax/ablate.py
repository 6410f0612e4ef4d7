r"""Runs the paper's ablations as a sweep and tabulates them as the paper does.

  python -m flamingo_jax.ablate --config experiments/tiny.py \
      --rows table3,table10 --seeds 3 --workdir /tmp/abl
  python -m flamingo_jax.ablate --config experiments/tiny.py:smoke \
      --rows no_m3w,vanilla_xattn --seeds 1 --workdir /tmp/abl \
      --override=--config.total_steps=20
  python -m flamingo_jax.ablate --config experiments/flamingo.py:3B \
      --rows table3 --seeds 3 --workdir gs://B/abl --dry-run   # a cluster
  python -m flamingo_jax.ablate --workdir /tmp/abl --collect

Trains the baseline (the config as given) and every row (a name from
experiments/flamingo.py's ABLATIONS, several joined by '+', or `table3` /
`table10` for all of a table's rows) once per seed, each run in its own
workdir W/<row>/seed<k> with the existing recipe (`python -m
flamingo_jax.train`, then `python -m flamingo_jax.evaluate` when the config
does not evaluate at the end), one after the other. A run already done (its
training's finished marker and its eval/results.json) is skipped, so the
same command resumes the sweep. Runs whose pretraining stages equal the
baseline's reuse W/baseline/seed0's (see flamingo_jax/ablation/plan.py).

`--dry-run` prints each run's commands instead (a shell script: run the
baseline's seed 0 first, then the rest in parallel, e.g. one cluster job per
line); `--collect` then (or after a sweep, which collects at its end)
builds, from the finished workdirs alone and without running anything:

  W/ablations.md    the paper's columns: row, setting, changed config keys,
                    parameter count, step time, a score per task, overall
                    score (mean of score / baseline), the paper's figures
                    and whether the direction agrees, the seed spread
  W/ablations.csv   the same, one field per figure
  W/ablations.png   overall score per row with seed error bars (and the
                    paper's, relative to its baseline)
"""

import os
import re
import shlex
import subprocess
import sys
import time

from absl import app
from absl import flags
from absl import logging

from flamingo_jax.ablation import plan
from flamingo_jax.ablation import table

_CONFIG = flags.DEFINE_string(
    'config', None, 'Config file and argument, e.g. experiments/tiny.py or '
    'experiments/flamingo.py:3B (each row appends its ablation names). '
    'With --collect, default: the sweep\'s (W/sweep.json).')
_ROWS = flags.DEFINE_list(
    'rows', ['table3', 'table10'], 'Rows: table3, table10, or ablation names '
    '(several joined by +, run together).')
_SEEDS = flags.DEFINE_integer('seeds', 3, 'Seeds per row (config.seed = 0, '
                              '1, ...).')
_WORKDIR = flags.DEFINE_string('workdir', None, 'The sweep\'s directory.')
_OVERRIDES = flags.DEFINE_multi_string(
    'override', [], 'A config override for every run, as on the training '
    'command line, e.g. --override=--config.total_steps=300 (repeatable).')
_DRY_RUN = flags.DEFINE_bool('dry-run', False, 'Print the runs\' commands '
                             'instead of running them.')
_COLLECT = flags.DEFINE_bool('collect', False, 'Only build W/ablations.md, '
                             '.csv, .png from the finished runs.')
flags.mark_flag_as_required('workdir')


def _configs(config_file, rows, overrides):
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


def _shell(run, config_file, overrides, configs, workdir):
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
      run, config_file, overrides, configs[run.row], python='python')]
  return ' && '.join(parts)


def _run_one(run, config_file, overrides, configs, workdir) -> float:
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
    for command in plan.commands(run, config_file, overrides, config):
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


def collect(workdir, config_file, rows, seeds, overrides) -> list[str]:
  configs = _configs(config_file, rows, overrides)
  data = table.build(workdir, rows, seeds, configs)
  paths = table.write(data, workdir)
  print(table.summary(data))
  return paths


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  workdir = _WORKDIR.value
  if _COLLECT.value:
    sweep = plan.read_sweep(workdir) or {}
    config_file = _CONFIG.value or sweep.get('config')
    if not config_file:
      raise app.UsageError(f'No {plan.SWEEP_FILE} in {workdir}: give '
                           '--config (and --rows, --seeds, --override).')
    rows = plan.expand_rows(_ROWS.value) if (
        _CONFIG.value or 'rows' not in sweep) else sweep['rows']
    seeds = sweep.get('seeds', _SEEDS.value) if not _CONFIG.value else (
        _SEEDS.value)
    overrides = _OVERRIDES.value or sweep.get('overrides', [])
    for path in collect(workdir, config_file, rows, seeds, overrides):
      print(f'Wrote {path}')
    return
  if not _CONFIG.value:
    raise app.UsageError('--config is required, e.g. --config '
                         'experiments/tiny.py')
  if _SEEDS.value < 1:
    raise app.UsageError(f'--seeds must be >= 1; got {_SEEDS.value}.')
  try:
    rows = plan.expand_rows(_ROWS.value)
  except ValueError as e:
    sys.exit(f'ablate: {e}')
  config_file, overrides = _CONFIG.value, _OVERRIDES.value
  configs = _configs(config_file, rows, overrides)  # Bad rows fail here.
  runs = plan.runs(workdir, rows, _SEEDS.value)
  if _DRY_RUN.value:
    print(f'# {len(runs)} runs of {len(rows)} rows + the baseline, '
          f'{_SEEDS.value} seed(s). Run the first line first (later runs '
          'reuse its pretraining stages), then the others in any order; '
          'then: python -m flamingo_jax.ablate --collect '
          f'--workdir {shlex.quote(workdir)}')
    for run in runs:
      print(_shell(run, config_file, overrides, configs, workdir))
    return
  plan.write_sweep(workdir, config_file, overrides, rows, _SEEDS.value)
  for i, run in enumerate(runs, 1):
    if plan.is_done(run.workdir, configs[run.row]):
      logging.info('[%d/%d] %s seed %d: done already.', i, len(runs),
                   run.row, run.seed)
      continue
    seconds = _run_one(run, config_file, overrides, configs, workdir)
    logging.info('[%d/%d] %s seed %d: finished in %.0f s.', i, len(runs),
                 run.row, run.seed, seconds)
  for path in collect(workdir, config_file, rows, _SEEDS.value, overrides):
    print(f'Wrote {path}')


if __name__ == '__main__':
  sys.exit(app.run(main))
