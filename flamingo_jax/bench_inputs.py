"""What `python -m flamingo_jax.bench train` times: the config cut to the
flags' datasets and shapes, the mesh it runs on, and random batches.

Kept apart from the CLI (bench.py) so that these pieces are plain functions
of their arguments, with no flags read.
"""

from typing import Optional

import ml_collections
import numpy as np

from flamingo_jax.training import sharding


class BenchFlagError(ValueError):
  """Flags that do not fit the config or the devices (reported in a line)."""


def shaped_config(config: ml_collections.ConfigDict,
                  datasets: Optional[list[str]] = None,
                  batch: Optional[int] = None, seq: Optional[int] = None,
                  images: Optional[int] = None,
                  image_size: Optional[int] = None
                  ) -> ml_collections.ConfigDict:
  """A copy of `config` with the mixture cut to `datasets` and reshaped.

  Raises:
    BenchFlagError: for a dataset name the config does not have.
  """
  config = ml_collections.ConfigDict(config.to_dict())
  available = sorted(config.data.datasets)
  if datasets:
    unknown = [name for name in datasets if name not in available]
    if unknown:
      raise BenchFlagError(f'--datasets {unknown}: the config has no such '
                       f'dataset; it has {available}.')
    config.data.datasets = {name: config.data.datasets[name].to_dict()
                            for name in datasets}
  overrides = dict(batch_size=batch, seq_len=seq, max_media=images,
                   image_size=image_size)
  for spec in config.data.datasets.values():
    for key, value in overrides.items():
      if value is not None:
        spec[key] = value
  return config


def parse_mesh(text: str) -> list[tuple[str, int]]:
  """'data:-1,model:2' (or 'data=-1,model=2') -> [('data', -1), ...]."""
  axes = []
  for part in filter(None, (p.strip() for p in text.split(','))):
    name, sep, size = part.replace('=', ':').partition(':')
    try:
      axes.append((name.strip(), int(size)))
    except ValueError:
      sep = ''
    if not sep or not name.strip():
      raise BenchFlagError(f"--mesh {text!r}: expected 'axis:size,...', e.g. "
                       "'data:-1,model:2'.")
  return axes


def choose_mesh(config: ml_collections.ConfigDict,
                mesh_flag: Optional[str],
                num_devices: int) -> tuple[list[tuple[str, int]], str]:
  """The mesh axes to use and a note on where they came from."""
  if mesh_flag:
    return parse_mesh(mesh_flag), '--mesh'
  axes = [tuple(axis) for axis in config.mesh]
  try:
    sharding.mesh_shape(axes, num_devices)
    return axes, 'config'
  except ValueError as e:
    fallback = [(name, -1 if name == 'data' else 1)
                for name, _ in sharding.DEFAULT_MESH]
    return fallback, f'all devices on data (config mesh: {e})'


def synthetic_batches(config: ml_collections.ConfigDict, seed: int = 0
                      ) -> dict[str, dict[str, np.ndarray]]:
  """Random global batches with the shapes of every dataset of the config;
  each example's tokens see its media slots in turn (phi)."""
  rng = np.random.default_rng(seed)
  vocab = config.model.lm.vocab_size
  batches = {}
  for name, spec in config.data.datasets.items():
    b, length, n = spec.batch_size, spec.seq_len, spec.max_media
    size = spec.get('image_size', None) or config.model.image_size
    batches[name] = dict(
        tokens=rng.integers(5, vocab, size=(b, length)).astype(np.int32),
        targets=rng.integers(5, vocab, size=(b, length)).astype(np.int32),
        loss_mask=np.ones([b, length], np.float32),
        media=rng.integers(0, 255, size=(b, n, spec.frames, size, size, 3),
                           dtype=np.uint8),
        media_mask=np.ones([b, n], bool),
        media_index=np.minimum(np.arange(length) // max(length // n, 1) + 1,
                               n)[None].repeat(b, 0).astype(np.int32))
  return batches


def check_batches(config: ml_collections.ConfigDict, mesh) -> None:
  """Refuses a batch that the mesh's data-parallel devices cannot split."""
  parallel = sharding.data_parallel_size(mesh)
  for name, spec in config.data.datasets.items():
    if spec.batch_size % parallel:
      raise BenchFlagError(
          f'Dataset {name}: batch size {spec.batch_size} is not divisible by '
          f'the {parallel} data-parallel devices of mesh {dict(mesh.shape)}; '
          'pass --batch or --mesh.')
