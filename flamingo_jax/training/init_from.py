"""`config.init_from`: parameters of other runs (a recipe's stages, a
converted checkpoint) written into a new run's state before its first step, each parameter in
the new state's sharding (`apply`).
"""

from collections.abc import Callable, Mapping
import re
from typing import Any

from absl import logging
import jax

from flamingo_jax import checkpoint as checkpoint_lib
from flamingo_jax import fs
from flamingo_jax.training import train_step as train_step_lib
from flamingo_jax.training import workdir as workdir_lib

TrainState = train_step_lib.TrainState


def reads(source: Mapping[str, Any]) -> Callable[[str], bool]:
  """'module/param' -> whether an `init_from` source overwrites it: a full
  match of one of its `include` regexes (default all) and of no `exclude`."""
  include = [re.compile(r) for r in source.get('include', ['.*'])]
  exclude = [re.compile(r) for r in source.get('exclude', [])]
  return lambda key: (any(r.fullmatch(key) for r in include)
                      and not any(r.fullmatch(key) for r in exclude))


def apply(state: TrainState, config, workdir: str) -> TrainState:
  """Overwrites parameters with those of other runs (`config.init_from`).

  Each source is {'workdir': path (relative to this run's workdir, absolute,
  or a URL such as gs://...), 'include': [regex], 'exclude': [regex]} over
  'module/param' paths; e.g. a pretrained LM: include ['lm/.*'], exclude
  ['lm/eoc_.*'].
  """
  trainable, frozen = state.trainable, state.frozen
  for source in config.get('init_from', None) or []:
    path = source['workdir']
    path = fs.join(workdir, path)  # Absolute paths and URLs stay.
    # A recipe stage's final step (never an older one in its place).
    loaded = checkpoint_lib.load_params(path, workdir_lib.finished_step(path))
    source_reads = reads(source)

    def replace(params):
      count = 0
      out = {}
      for module, leaves in params.items():
        out[module] = dict(leaves)
        for name, old in leaves.items():
          key = f'{module}/{name}'
          if not source_reads(key):
            continue
          if name not in loaded.get(module, {}):
            raise ValueError(f'init_from {path}: it has no parameter {key}.')
          new = loaded[module][name]
          if new.shape != old.shape:
            raise ValueError(f'init_from {path}: {key} has shape {new.shape}, '
                             f'this model needs {old.shape}.')
          new = new.astype(old.dtype)
          out[module][name] = jax.make_array_from_callback(
              old.shape, old.sharding, lambda index, new=new: new[index])
          count += 1
      return out, count

    trainable, count_t = replace(trainable)
    frozen, count_f = replace(frozen)
    count = count_t + count_f
    if not count:
      raise ValueError(f'init_from {path}: include {source.get("include")} '
                       'matched no parameter of this model.')
    logging.info('Initialised %d parameters from %s.', count, path)
  return state._replace(trainable=trainable, frozen=frozen)
