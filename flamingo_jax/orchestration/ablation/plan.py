"""The sweep's plan: which rows, their configs, workdirs and commands.

A sweep of the ablation rows of `experiments/ablations.py`'s ABLATIONS (which
experiments/flamingo.py and tiny.py take) over seeds, in a sweep workdir W:

  W/sweep.json                   the sweep's config file, overrides, rows, seeds
  W/<row>/seed<k>/               one training run (the recipe: its stages, the
                                 main stage, the few-shot evaluation)
  W/baseline/seed<k>/            the config without ablation

A row is a name of ABLATIONS or several joined by '+' (applied together,
e.g. `laion_pairs+vision_clip_vit_l14`, Table 10 (vii)); `table3` and
`table10` stand for every row of those tables. A run is done when its
training left its finished marker (W/.../finished.json at the config's
final step) and its evaluation W/.../eval/results.json: such runs are not
run again.

The recipe's pretraining stages (`config.stages`: the tiny recipe's vision
encoder and LM) do not depend on the seed, and most rows leave them as they
are: a run whose stage config equals the baseline's reads the stage of
W/baseline/seed0 (a symlink) instead of training its own, as the paper's
ablations all start from the same pretrained encoder and LM. The seed spread
is therefore that of the Flamingo stage (and evaluation) alone.
"""

import json
import os
import sys
from typing import Any, NamedTuple, Optional, Sequence

from absl import flags
import ml_collections
from ml_collections import config_flags

from experiments import ablations

BASELINE = 'baseline'
TABLES = {'table3': 'Table 3 ', 'table10': 'Table 10 '}
SWEEP_FILE = 'sweep.json'
# Config keys that name the run rather than change it.
LABEL_KEYS = ('ablations',)


def expand_rows(spec: Sequence[str]) -> list[str]:
  """Row names from `--rows` entries (names, 'a+b', 'table3', 'table10').

  Raises:
    ValueError: naming every entry that is neither a table nor made of
      ablation names.
  """
  rows, unknown = [], []
  for entry in spec:
    entry = entry.strip()
    if not entry:
      continue
    if entry.lower() in TABLES:
      prefix = TABLES[entry.lower()]
      rows += [name for name, ablation in ablations.ABLATIONS.items()
               if ablation.row.startswith(prefix)]
      continue
    parts = entry.split('+')
    if entry == BASELINE or any(p not in ablations.ABLATIONS
                                for p in parts):
      unknown.append(entry)
    else:
      rows.append(entry)
  if unknown:
    raise ValueError(f'Unknown row(s) {unknown}: expected table3, table10, '
                     f'or names (joined by +) from '
                     f'{sorted(ablations.ABLATIONS)}.')
  return list(dict.fromkeys(rows))  # In order, once each.


def config_arg(config_file: str, row: str) -> str:
  """`--config` of a row: 'experiments/tiny.py:smoke' + 'no_m3w' ->
  'experiments/tiny.py:smoke,no_m3w' (the baseline: as given)."""
  if row == BASELINE:
    return config_file
  ablations = ','.join(row.split('+'))
  path, sep, arg = config_file.partition(':')
  return f'{path}:{arg},{ablations}' if sep and arg else f'{path}:{ablations}'


def load_config(config_file: str, row: str,
                overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """The config a row's run trains with: the file's, then `overrides`
  (`--config.a.b=value`, as on the training command line)."""
  argv = ['ablate', f'--config={config_arg(config_file, row)}', *overrides]
  values = flags.FlagValues()
  holder = config_flags.DEFINE_config_file(
      'config', None, 'Config.', flag_values=values, lock_config=False,
      sys_argv=argv)
  values(argv)
  return holder.value


def _flatten(tree: Any, prefix: str = '') -> dict[str, Any]:
  if isinstance(tree, dict):
    out = {}
    for key, value in tree.items():
      out.update(_flatten(value, f'{prefix}{key}.'))
    return out or {prefix.rstrip('.'): {}}
  return {prefix.rstrip('.'): tree}


def config_diff(base: Any, other: Any) -> list[str]:
  """Dotted keys whose values differ between two configs (dicts or
  ConfigDicts), sorted. A section only one side has is one key; lists are
  compared whole; the label keys (LABEL_KEYS) are left out."""
  as_dict = lambda c: c.to_dict() if hasattr(c, 'to_dict') else dict(c)
  base, other = as_dict(base), as_dict(other)
  changed = set()

  def walk(a, b, prefix):
    for key in set(a) | set(b):
      path = f'{prefix}{key}'
      if key not in a or key not in b:
        changed.add(path)
      elif isinstance(a[key], dict) and isinstance(b[key], dict):
        walk(a[key], b[key], f'{path}.')
      elif _normal(a[key]) != _normal(b[key]):
        changed.add(path)

  walk(base, other, '')
  return sorted(k for k in changed if k not in LABEL_KEYS)


def _normal(value: Any) -> Any:
  """Tuples and lists compare equal (a config's rules are either)."""
  if isinstance(value, (list, tuple)):
    return [_normal(v) for v in value]
  return value


class Run(NamedTuple):
  row: str
  seed: int
  workdir: str


def seeds_of(row: str, seeds: int, baseline_seeds: Optional[int]) -> int:
  """How many seeds `row` runs: `seeds`, the baseline `baseline_seeds`
  when that is more."""
  return max(seeds, baseline_seeds or 0) if row == BASELINE else seeds


def runs(workdir: str, rows: Sequence[str], seeds: int,
         baseline_seeds: Optional[int] = None) -> list[Run]:
  """The baseline's runs then each row's, seed by seed (`seeds_of`)."""
  return [Run(row, seed, os.path.join(workdir, row, f'seed{seed}'))
          for row in [BASELINE, *rows]
          for seed in range(seeds_of(row, seeds, baseline_seeds))]


def is_done(run_dir: str, config: ml_collections.ConfigDict) -> bool:
  """The run's training is finished (its marker at the final step) and its
  evaluation written."""
  path = os.path.join(run_dir, 'finished.json')
  if not os.path.exists(path):
    return False
  try:
    with open(path) as f:
      step = int(json.load(f)['step'])
  except (OSError, ValueError, KeyError, TypeError):
    return False
  return (step >= config.total_steps
          and os.path.exists(os.path.join(run_dir, 'eval', 'results.json')))


def evaluates_at_end(config: ml_collections.ConfigDict) -> bool:
  """Whether the recipe evaluates its last checkpoint itself."""
  return (config.get('eval') is not None
          and bool(config.get('evaluate_at_end', True)))


def commands(run: Run, config_file: str, overrides: Sequence[str],
             config: ml_collections.ConfigDict,
             python: str = sys.executable,
             evaluate_args: Sequence[str] = ()) -> list[list[str]]:
  """The commands that train (resuming) and evaluate one run.

  `evaluate_args` (e.g. ['--num_queries=256', '--shots=4']) go to `python
  -m flamingo_jax.evaluate`, which then evaluates the run after training in
  place of the recipe's own evaluation at the end.
  """
  train = [python, '-m', 'flamingo_jax.train',
           f'--config={config_arg(config_file, run.row)}',
           f'--workdir={run.workdir}', f'--config.seed={run.seed}',
           *overrides]
  at_end = evaluates_at_end(config)
  if at_end and evaluate_args:
    train.append('--config.evaluate_at_end=False')
  out = [train]
  if not at_end or evaluate_args:
    out.append([python, '-m', 'flamingo_jax.evaluate',
                f'--workdir={run.workdir}', *evaluate_args])
  return out


def _stage_view(stage: ml_collections.ConfigDict) -> dict[str, Any]:
  """What a stage trains with: an LM stage (task 'lm') carries Flamingo's
  whole model config but builds only its LM (`flamingo.transform_lm`)."""
  view = stage.to_dict()
  if view.get('task') == 'lm':
    view['model'] = {'lm': view['model']['lm']}
  return view


def row_changes(baseline: ml_collections.ConfigDict,
                config: ml_collections.ConfigDict) -> list[str]:
  """`config_diff`, with each recipe stage seen as what it trains with."""
  def view(c):
    d = c.to_dict()
    for name, stage in (c.get('stages', None) or {}).items():
      d['stages'][name] = _stage_view(stage)
    return d
  return config_diff(view(baseline), view(config))


def shared_stages(config: ml_collections.ConfigDict,
                  baseline: ml_collections.ConfigDict) -> list[str]:
  """The recipe stages a row can take from the baseline (same config)."""
  mine = config.get('stages', None) or {}
  theirs = baseline.get('stages', None) or {}
  return sorted(name for name in mine if name in theirs and not config_diff(
      _stage_view(mine[name]), _stage_view(theirs[name])))


def link_stages(run: Run, names: Sequence[str], workdir: str) -> list[str]:
  """Symlinks run.workdir/<stage> -> W/baseline/seed0/<stage> (relative),
  unless the run has that stage already. Returns the stages linked."""
  if run.row == BASELINE and run.seed == 0:
    return []
  source = os.path.join(workdir, BASELINE, 'seed0')
  os.makedirs(run.workdir, exist_ok=True)
  linked = []
  for name in names:
    target = os.path.join(run.workdir, name)
    if os.path.lexists(target):
      continue
    os.symlink(os.path.relpath(os.path.join(source, name), run.workdir),
               target)
    linked.append(name)
  return linked


def write_sweep(workdir: str, config_file: str, overrides: Sequence[str],
                rows: Sequence[str], seeds: int,
                baseline_seeds: Optional[int] = None,
                evaluate_args: Sequence[str] = ()) -> str:
  """W/sweep.json, so that `--collect` needs only the workdir."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, SWEEP_FILE)
  with open(path, 'w') as f:
    json.dump(dict(config=config_file, overrides=list(overrides),
                   rows=list(rows), seeds=seeds,
                   baseline_seeds=baseline_seeds,
                   evaluate_args=list(evaluate_args)), f, indent=2)
  return path


def read_sweep(workdir: str) -> Optional[dict[str, Any]]:
  path = os.path.join(workdir, SWEEP_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def parameter_count(config: ml_collections.ConfigDict) -> int:
  """Total parameters of a config's model (`jax.eval_shape`: seconds)."""
  # pylint: disable=g-import-not-at-top
  import jax
  import numpy as np
  from flamingo_jax.models import flamingo
  # pylint: enable=g-import-not-at-top
  params = flamingo.abstract_params(config.model)
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
