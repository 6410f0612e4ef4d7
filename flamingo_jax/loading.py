"""Where a trained model is, where its parameters go, and what its run's
config says of its context and decoding: the steps of `flamingo_jax.load`
(api.py) before it builds the `Model`."""

from collections.abc import Mapping, Sequence
import dataclasses
import json
import math
import os
from typing import Any, Optional

from absl import logging
import haiku as hk
import jax
import ml_collections
import numpy as np

from flamingo_jax import fs
from flamingo_jax.data import tokenizer as tokenizer_lib
from flamingo_jax.inference import generate as generate_lib
from flamingo_jax.training import sharding as sharding_lib

PathLike = str | os.PathLike
# Decoding defaults where the run's config has no `eval.decoding` (or lacks
# a field of it): greedy, and <EOC> held back until one token is out (an
# empty answer is never the one wanted).
FALLBACK_DECODING = {'max_new_tokens': 20, 'beam_size': 1,
                     'length_penalty': 0.0, 'min_new_tokens': 1}
# Fraction of one device's memory the parameters may take and still be
# placed on it (the rest: activations and the decoding caches).
FITS_FRACTION = 0.75


@dataclasses.dataclass(frozen=True)
class Location:
  workdir: str  # Holds config.json.
  checkpoints: str  # W/checkpoints.
  step: Optional[int]  # None: the latest.


def locate(path: PathLike, step: Optional[int]) -> Location:
  """A workdir, W/checkpoints or W/checkpoints/<step> -> where things are."""
  path = fs.absolute(path)
  if not fs.exists(path):
    raise FileNotFoundError(
        f'{path} does not exist: give a training workdir (with config.json '
        'and checkpoints/), its checkpoints/ folder or one checkpoints/<step>.')
  name, parent = fs.basename(path), fs.dirname(path)
  if fs.isdir(fs.join(path, 'checkpoints')):
    location = Location(path, fs.join(path, 'checkpoints'), step)
  elif name.isdigit() and fs.basename(parent) == 'checkpoints':
    if step is not None and step != int(name):
      raise ValueError(f'{path} is the checkpoint of step {name}, but '
                       f'step={step} was asked for.')
    location = Location(fs.dirname(parent), parent, int(name))
  elif name == 'checkpoints':
    location = Location(parent, path, step)
  elif fs.isfile(fs.join(path, 'config.json')):
    raise FileNotFoundError(
        f'No checkpoint in {path}: it has a config.json but no checkpoints/ '
        'folder (has the run saved its first checkpoint yet?).')
  else:
    raise FileNotFoundError(
        f'{path} is neither a training workdir (config.json and '
        'checkpoints/) nor a checkpoints/ folder nor a checkpoints/<step>.')
  return location


def read_config(location: Location) -> ml_collections.ConfigDict:
  path = fs.join(location.workdir, 'config.json')
  if not fs.isfile(path):
    raise FileNotFoundError(
        f'No config.json in {location.workdir}: load() reads the model config '
        'that training writes there (or pass config=...).')
  return ml_collections.ConfigDict(json.loads(fs.read_text(path)))


def param_bytes(params: hk.Params) -> int:
  return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(params))


def fits_one_device(num_bytes: int, device: jax.Device) -> bool:
  stats = device.memory_stats() if hasattr(device, 'memory_stats') else None
  limit = (stats or {}).get('bytes_limit')
  return limit is None or num_bytes <= FITS_FRACTION * limit


def inference_mesh(config: ml_collections.ConfigDict, fits: bool
                    ) -> jax.sharding.Mesh:
  """`config.mesh` over all devices; if the parameters do not fit one device
  and that mesh would replicate them, all devices on 'fsdp' (or 'model')."""
  mesh_config = [(str(name), int(size)) for name, size in config.get(
      'mesh', sharding_lib.DEFAULT_MESH)]
  names, sizes = sharding_lib.mesh_shape(mesh_config, jax.device_count())
  splitting = math.prod(s for n, s in zip(names, sizes)
                        if n in ('fsdp', 'model'))
  if not fits and splitting == 1:
    axis = 'fsdp' if 'fsdp' in names else ('model' if 'model' in names
                                            else None)
    if axis is not None:
      mesh_config = [(name, -1 if name == axis else 1) for name in names]
  return sharding_lib.make_mesh(mesh_config)


def load_tokenizer(config: ml_collections.ConfigDict,
                    tokenizer: Optional[PathLike | tokenizer_lib.Tokenizer]
                    ) -> tokenizer_lib.Tokenizer:
  if isinstance(tokenizer, tokenizer_lib.Tokenizer):
    return tokenizer
  if tokenizer is not None:
    return tokenizer_lib.Tokenizer.load(os.fspath(tokenizer))
  path = config.get('data', {}).get('tokenizer')
  if not path:
    raise ValueError('The config names no tokenizer (config.data.tokenizer); '
                     'pass tokenizer=PATH to load().')
  if not fs.isfile(path):
    raise FileNotFoundError(
        f'The tokenizer file {path} (config.data.tokenizer) does not exist. '
        'Training creates it (flamingo_jax.data.prepare.ensure_data); on '
        'another machine copy it there or pass tokenizer=PATH to load().')
  return tokenizer_lib.Tokenizer.load(path)


def context_length(config: ml_collections.ConfigDict) -> tuple[int, str]:
  """The longest prompt (tokens) and where that number comes from."""
  max_len = config.get('eval', {}).get('max_len')
  if max_len:
    return int(max_len), 'config.eval.max_len'
  lengths = {name: int(spec['seq_len'])
             for name, spec in config.get('data', {}).get('datasets',
                                                          {}).items()
             if 'seq_len' in spec}
  if not lengths:
    raise ValueError('The config has neither eval.max_len nor any '
                     'data.datasets.*.seq_len to bound the context with.')
  name = max(lengths, key=lengths.get)
  return lengths[name], f'config.data.datasets.{name}.seq_len'


def decoding_defaults(config: ml_collections.ConfigDict
                       ) -> tuple[dict[str, Any], str]:
  """The run's `config.eval.decoding` over `FALLBACK_DECODING`, checked, and
  where it comes from."""
  given = config.get('eval', {}).get('decoding') or {}
  unknown = sorted(set(given) - set(FALLBACK_DECODING))
  if unknown:
    logging.warning('config.eval.decoding: %s not used by the API (it uses '
                    '%s).', unknown, sorted(FALLBACK_DECODING))
  decoding = {key: given.get(key, value)
              for key, value in FALLBACK_DECODING.items()}
  source = ('config.eval.decoding' if set(given) & set(FALLBACK_DECODING)
            else 'FALLBACK_DECODING')
  try:
    decoding_options(decoding)
  except (TypeError, ValueError) as e:
    raise ValueError(f'{source} is not a valid decoding ({decoding}): '
                     f'{e}') from e
  return decoding, source


def decoding_options(decoding: Mapping[str, Any],
                      stop_ids: Sequence[int] = (),
                      banned_ids: Sequence[int] = ()
                      ) -> generate_lib.Options:
  return generate_lib.Options(
      max_new_tokens=int(decoding['max_new_tokens']),
      beam_size=int(decoding['beam_size']),
      length_penalty=float(decoding['length_penalty']),
      min_new_tokens=int(decoding['min_new_tokens']),
      stop_ids=tuple(stop_ids), banned_ids=tuple(banned_ids))  # Checks them.
