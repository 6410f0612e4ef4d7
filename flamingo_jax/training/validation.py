"""Config validation: every numeric field the training loop uses, checked
before any work, with an error that names the key, its value and what it
must be (e.g. `config.checkpoint.keep=0: must be an integer >= 1: the
number of checkpoints kept (0 would delete every one).`).
"""

from typing import Any

import ml_collections
import numpy as np


def _field(config: ml_collections.ConfigDict, key: str) -> Any:
  for part in key.split('.'):
    config = config.get(part) if hasattr(config, 'get') else None
  return config


def _is_int(value: Any) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


# (dotted key, test, what the value must be): the fields the loop uses; a
# missing optional field is not checked.
_CHECKS = (
    ('total_steps', lambda v: _is_int(v) and v >= 0, 'an integer >= 0'),
    ('log_every', lambda v: _is_int(v) and v >= 1, 'an integer >= 1'),
    ('checkpoint.every', lambda v: _is_int(v) and v >= 1, 'an integer >= 1'),
    ('checkpoint.keep', lambda v: _is_int(v) and v >= 1,
     'an integer >= 1: the number of checkpoints kept (0 would delete every '
     'one)'),
    ('seed', _is_int, 'an integer'),
    ('max_nonfinite_steps', lambda v: _is_int(v) and v >= 1,
     'an integer >= 1'),
    ('debug.poison_step', lambda v: _is_int(v) and v >= 0,
     'an integer >= 0 (0: off)'),
    ('optim.learning_rate', lambda v: np.isfinite(v) and v >= 0,
     'a finite number >= 0'),
    ('optim.warmup_steps', lambda v: _is_int(v) and v >= 0, 'an integer >= 0'),
    ('optim.microbatches', lambda v: _is_int(v) and v >= 1, 'an integer >= 1'),
)
_DATASET_CHECKS = (
    ('batch_size', lambda v: _is_int(v) and v >= 1, 'an integer >= 1'),
    ('seq_len', lambda v: _is_int(v) and v >= 2, 'an integer >= 2'),
    ('max_media', lambda v: _is_int(v) and v >= 1, 'an integer >= 1'),
    ('frames', lambda v: _is_int(v) and v >= 1, 'an integer >= 1'),
    ('image_size', lambda v: _is_int(v) and v >= 1, 'an integer >= 1'),
    ('weight', lambda v: np.isfinite(v) and v >= 0, 'a finite number >= 0'),
    ('p_next', lambda v: 0 <= v <= 1, 'a probability in [0, 1]'),
)


def validate_config(config: ml_collections.ConfigDict,
                    name: str = 'config') -> None:
  """Checks every numeric field the loop uses; call it before any work.

  Args:
    config: a training config (one stage's).
    name: how the error names `config`, e.g. 'config.stages.vision'.

  Raises:
    ValueError: naming the first bad field, its value and what it must be.
  """
  checks = list(_CHECKS)
  for dataset in (config.get('data', {}).get('datasets', None) or {}):
    checks += [(f'data.datasets.{dataset}.{key}', test, what)
               for key, test, what in _DATASET_CHECKS]
  for key, test, what in checks:
    value = _field(config, key)
    try:
      ok = value is None or bool(test(value))
    except TypeError:
      ok = False
    if not ok:
      raise ValueError(f'{name}.{key}={value!r}: must be {what}.')
  poison = _field(config, 'debug.poison_step')
  if poison and config.get('task', None) == 'contrastive':
    raise ValueError(
        f'{name}.debug.poison_step={poison}: the contrastive task reads no '
        'loss mask to poison (use it on a Flamingo or LM stage).')
