r"""Parameter counts of a Flamingo config, per component, without allocating.

  python -m flamingo_jax.summarize --config experiments/flamingo.py:3B
  python -m flamingo_jax.summarize --config experiments/flamingo.py:80B --json
  python -m flamingo_jax.summarize --config experiments/flamingo.py:tiny \
      --config.model.xattn.every=2 --paths

The model is built with `jax.eval_shape`, so even 80B takes seconds on a CPU.
"""

from collections.abc import Mapping
import json
from typing import Any

from absl import app
from absl import flags
import numpy as np
from ml_collections import config_flags

from flamingo_jax import cli

from flamingo_jax.models import flamingo

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file, e.g. experiments/flamingo.py:3B.',
    lock_config=True)
_JSON = flags.DEFINE_bool('json', False, 'Print one JSON object instead of '
                          'a table.')
_PATHS = flags.DEFINE_bool('paths', False, 'Also list every parameter path '
                           'with its shape.')

# Top-level module -> component name in the summary (paper Table 5 columns).
COMPONENTS = {
    'lm': 'lm',
    'vision_encoder': 'vision',
    'gated_xattn': 'xattn',
    'perceiver_resampler': 'resampler',
}


def flat_shapes(params: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
  """{'module/path/param': shape} for a Haiku parameter tree."""
  return {f'{module}/{name}': tuple(leaf.shape)
          for module, leaves in params.items()
          for name, leaf in leaves.items()}


def count_by_component(params: Mapping[str, Any]) -> dict[str, int]:
  """Parameters per component and in total (keys of COMPONENTS, 'total')."""
  counts = {name: 0 for name in COMPONENTS.values()}
  for path, shape in flat_shapes(params).items():
    top = path.split('/')[0]
    if top not in COMPONENTS:
      raise ValueError(f'Parameter {path!r} belongs to no known component '
                       f'{sorted(COMPONENTS)}.')
    counts[COMPONENTS[top]] += int(np.prod(shape))
  counts['total'] = sum(counts.values())
  return counts


def human(count: int) -> str:
  for unit, scale in (('B', 1e9), ('M', 1e6), ('K', 1e3)):
    if count >= scale:
      return f'{count / scale:.2f}{unit}'
  return str(count)


def format_table(counts: Mapping[str, int]) -> str:
  rows = [f'{"component":<12}{"parameters":>16}{"":>10}']
  for name, count in counts.items():
    rows.append(f'{name:<12}{count:>16,}{human(count):>10}')
  return '\n'.join(rows)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config = _CONFIG.value
  if config is None:
    raise app.UsageError('--config is required, e.g. '
                         '--config experiments/flamingo.py:3B')
  params = flamingo.abstract_params(config.model)
  counts = count_by_component(params)
  if _JSON.value:
    print(json.dumps(counts))
  else:
    print(f'# {config.get("size", "?")} {config.get("ablations", "")}'.rstrip())
    print(format_table(counts))
  if _PATHS.value:
    for path, shape in sorted(flat_shapes(params).items()):
      print(f'{path}  {shape}')


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
