r"""Runs the paper's ablations as a sweep and tabulates them as the paper does.

  python -m flamingo_jax.ablate --config experiments/tiny.py \
      --rows table3,table10 --seeds 3 --workdir /tmp/abl
  python -m flamingo_jax.ablate --config experiments/tiny.py:smoke \
      --rows no_m3w,vanilla_xattn --seeds 1 --workdir /tmp/abl \
      --override=--config.total_steps=20
  python -m flamingo_jax.ablate --config experiments/tiny.py \
      --rows table3,table10 --seeds 1 --baseline_seeds 3 --jobs 2 \
      --workdir /tmp/abl    # 28 runs; each row against the baseline's spread
  python -m flamingo_jax.ablate --config experiments/tiny.py:icl \
      --rows all_previous_images,xattn_every_4 --seeds 3 --jobs 3 \
      --workdir /tmp/icl_abl                 # 3 runs side by side
  python -m flamingo_jax.ablate --config experiments/flamingo.py:3B \
      --rows table3 --seeds 3 --workdir gs://B/abl --dry-run   # a cluster
  python -m flamingo_jax.ablate --workdir /tmp/abl --collect

What it runs and writes (W/<row>/seed<k>, W/ablations.md/.csv/.png):
`flamingo_jax/orchestration/ablation/sweep.py`.
"""

import sys

from absl import app
from absl import flags

from flamingo_jax.orchestration.ablation import plan
from flamingo_jax.orchestration.ablation import sweep

_CONFIG = flags.DEFINE_string(
    'config', None, 'Config file and argument, e.g. experiments/tiny.py or '
    'experiments/flamingo.py:3B (each row appends its ablation names). '
    'With --collect, default: the sweep\'s (W/sweep.json).')
_ROWS = flags.DEFINE_list(
    'rows', ['table3', 'table10'], 'Rows: table3, table10, or ablation names '
    '(several joined by +, run together).')
_SEEDS = flags.DEFINE_integer('seeds', 3, 'Seeds per row (config.seed = 0, '
                              '1, ...).')
_BASELINE_SEEDS = flags.DEFINE_integer(
    'baseline_seeds', 0, 'Seeds of the baseline, when more than --seeds '
    '(0: --seeds). A cheaper sweep: --seeds 1 --baseline_seeds 3 judges '
    'each row against twice the baseline\'s seed spread.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'The sweep\'s directory.')
_OVERRIDES = flags.DEFINE_multi_string(
    'override', [], 'A config override for every run, as on the training '
    'command line, e.g. --override=--config.total_steps=300 (repeatable).')
_EVALUATE_ARGS = flags.DEFINE_multi_string(
    'evaluate_arg', [], 'A flag for `python -m flamingo_jax.evaluate`, which '
    'then evaluates each run after training in place of the recipe\'s own '
    'evaluation, e.g. --evaluate_arg=--num_queries=256 '
    '--evaluate_arg=--shots=4 (repeatable).')
_DRY_RUN = flags.DEFINE_bool('dry-run', False, 'Print the runs\' commands '
                             'instead of running them.')
_JOBS = flags.DEFINE_integer(
    'jobs', 1, 'Runs side by side on this machine, after the baseline\'s '
    'seed 0 (which trains the stages the others share). Small runs on a few '
    'cores get more done 2-3 at a time.')
_COLLECT = flags.DEFINE_bool('collect', False, 'Only build W/ablations.md, '
                             '.csv, .png from the finished runs.')
_OVERALL_TASKS = flags.DEFINE_list(
    'overall_tasks', [], 'Tasks the overall score averages (default: all). '
    'Leave out tasks the baseline scores near 0: their ratios are noise.')
flags.mark_flag_as_required('workdir')


def _collect(workdir: str) -> None:
  """--collect: the table, with what --config did not give from W/sweep.json."""
  done = plan.read_sweep(workdir) or {}
  config_file = _CONFIG.value or done.get('config')
  if not config_file:
    raise app.UsageError(f'No {plan.SWEEP_FILE} in {workdir}: give '
                         '--config (and --rows, --seeds, --override).')
  rows = plan.expand_rows(_ROWS.value) if (
      _CONFIG.value or 'rows' not in done) else done['rows']
  seeds = done.get('seeds', _SEEDS.value) if not _CONFIG.value else (
      _SEEDS.value)
  baseline_seeds = (done.get('baseline_seeds') if not _CONFIG.value
                    else _BASELINE_SEEDS.value) or None
  overrides = _OVERRIDES.value or done.get('overrides', [])
  try:
    paths = sweep.collect(workdir, config_file, rows, seeds, overrides,
                          _OVERALL_TASKS.value or None, baseline_seeds)
  except ValueError as e:  # An unknown overall task.
    sys.exit(f'ablate: {e}')
  for path in paths:
    print(f'Wrote {path}')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  workdir = _WORKDIR.value
  if _COLLECT.value:
    _collect(workdir)
    return
  if not _CONFIG.value:
    raise app.UsageError('--config is required, e.g. --config '
                         'experiments/tiny.py')
  if _SEEDS.value < 1:
    raise app.UsageError(f'--seeds must be >= 1; got {_SEEDS.value}.')
  if _BASELINE_SEEDS.value < 0:
    raise app.UsageError('--baseline_seeds must be >= 0; got '
                         f'{_BASELINE_SEEDS.value}.')
  if _JOBS.value < 1:
    raise app.UsageError(f'--jobs must be >= 1; got {_JOBS.value}.')
  try:
    rows = plan.expand_rows(_ROWS.value)
  except ValueError as e:
    sys.exit(f'ablate: {e}')
  config_file, seeds, overrides = _CONFIG.value, _SEEDS.value, _OVERRIDES.value
  baseline_seeds = _BASELINE_SEEDS.value or None
  # Bad rows fail here, before anything runs.
  configs = sweep.load_configs(config_file, rows, overrides)
  # An overall task the runs will not score fails now, not after training.
  evaluated = sorted(configs[plan.BASELINE].eval.tasks)
  unknown = sorted(set(_OVERALL_TASKS.value) - set(evaluated))
  if unknown:
    sys.exit(f'ablate: --overall_tasks {unknown} are not among the tasks '
             f'that {config_file} evaluates {evaluated}.')
  if _DRY_RUN.value:
    sweep.print_commands(workdir, config_file, rows, seeds, overrides, configs,
                         baseline_seeds, _EVALUATE_ARGS.value)
    return
  for path in sweep.run_sweep(workdir, config_file, rows, seeds, overrides,
                              configs, jobs=_JOBS.value,
                              overall_tasks=_OVERALL_TASKS.value or None,
                              baseline_seeds=baseline_seeds,
                              evaluate_args=_EVALUATE_ARGS.value):
    print(f'Wrote {path}')


if __name__ == '__main__':
  sys.exit(app.run(main))
