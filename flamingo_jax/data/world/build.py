"""Preparing the embedded world's datasets on disk: `make_builder`, `build_all`.

A dataset is built once per data directory: runs that start together wait on
its build lock (`_build_lock`) and read what the first one built. A gs://
data directory is built locally and copied up (ArrayRecord writes only local
files). A prepared dataset whose generation fingerprint (builders.py) differs
from the code's is reported, not rebuilt.
"""

from collections.abc import Callable, Iterator, Sequence
import contextlib
import fcntl
import hashlib
import os
import tempfile
import time

import tensorflow_datasets as tfds

from flamingo_jax import fs
from flamingo_jax.data.world import base
from flamingo_jax.data.world import builders

SIZES = base.SIZES
DEFAULT_IMAGE_SIZE = base.DEFAULT_IMAGE_SIZE
WorldBuilder = base.WorldBuilder


def make_builder(name: str, data_dir: str | os.PathLike, sizes: str = 'default',
                 image_size: int = DEFAULT_IMAGE_SIZE, **config_kwargs
                 ) -> WorldBuilder:
  """The builder of dataset `name` for `sizes` and `image_size` in data_dir.

  Args:
    name: one of builders.DATASETS.
    data_dir: the TFDS data directory.
    sizes: one of SIZES.
    image_size: image side; 64 and 320 are predefined configs
      ('default_320px'), others get a config of their own.
    **config_kwargs: further `WorldConfig` fields (then the config is named
      'custom_<sizes>_<image_size>px_<hash of the fields>' unless `name` is
      given in them, so that different fields never share a directory).

  Returns:
    The (not yet prepared) builder.
  """
  cls = builders.builder_class(name)
  if sizes not in SIZES:
    raise ValueError(f'Unknown sizes {sizes!r}; expected one of {SIZES}.')
  predefined = {c.name: c for c in base.BUILDER_CONFIGS}
  cfg_name = base.config_name(sizes, image_size)
  if cfg_name in predefined and not config_kwargs:
    return cls(config=cfg_name, data_dir=os.fspath(data_dir))
  fields = repr(sorted(builders.canonical(config_kwargs).items())).encode()
  config_kwargs.setdefault(
      'name', f'custom_{sizes}_{image_size}px_'
      f'{hashlib.sha256(fields).hexdigest()[:8]}')
  config = base.WorldConfig(sizes=sizes, image_size=image_size, **config_kwargs)
  return cls(config=config, data_dir=os.fspath(data_dir))


def build_all(data_dir: str | os.PathLike, sizes: str = 'default', *,
              datasets: Sequence[str] | None = None,
              image_size: int = DEFAULT_IMAGE_SIZE,
              num_workers: int | None = None,
              log: Callable[[str], None] = print,
              ) -> dict[str, WorldBuilder]:
  """Prepares the world's datasets in `data_dir`.

  Args:
    data_dir: the TFDS data directory (created if needed), local or gs://.
    sizes: 'default' or 'tiny'.
    datasets: names to build (default: all of builders.DATASETS).
    image_size: image side in pixels.
    num_workers: generator processes; None: the CPUs available, up to 16.
    log: where progress lines go.

  Returns:
    name -> the prepared builder (`builder.as_dataset(split=...)`).
  """
  if sizes not in SIZES:
    raise ValueError(f'Unknown sizes {sizes!r}; expected one of {SIZES}.')
  names = list(builders.DATASETS if datasets is None else datasets)
  for name in names:
    builders.builder_class(name)  # Fails early on an unknown name.
  if num_workers is not None and num_workers < 1:
    raise ValueError(f'num_workers must be >= 1; got {num_workers}.')
  built = {}
  start_all = time.perf_counter()
  for k, name in enumerate(names):
    builder = make_builder(name, data_dir, sizes, image_size)
    builder.num_workers = num_workers
    counts = ', '.join(f'{s} {n}' for s, n in builder.split_sizes.items())
    log(f'[{k + 1}/{len(names)}] {name}/{builder.builder_config.name} '
        f'({counts})')
    start = time.perf_counter()
    _check_fingerprint(builder, log)
    if not builder.is_prepared():
      builder = _build(name, builder, data_dir, sizes, image_size,
                       num_workers)
    log(f'    done in {time.perf_counter() - start:.1f} s: '
        f'{builder.data_dir}')
    built[name] = builder
  log(f'Built {len(names)} datasets in {time.perf_counter() - start_all:.1f} '
      f's into {os.fspath(data_dir)}.')
  return built


def _build(name: str, builder: WorldBuilder, data_dir: str | os.PathLike,
           sizes: str, image_size: int,
           num_workers: int | None) -> WorldBuilder:
  """Prepares a missing dataset; returns its builder, reopened if another
  process built it while this one waited for the lock."""
  if fs.is_url(data_dir):
    _prepare_and_upload(name, builder, sizes, image_size, num_workers)
    return builder
  with _build_lock(os.fspath(data_dir), builder):
    if builder.is_prepared():
      return make_builder(name, data_dir, sizes, image_size)
    _prepare(builder)
  return builder


@contextlib.contextmanager
def _build_lock(data_dir: str, builder: WorldBuilder) -> Iterator[None]:
  """Holds one dataset's build lock in `data_dir` (flock, released by the
  kernel if its holder dies): runs that start together (`ablate --jobs`,
  evaluations at their end) build it once, the others wait, and none finds
  the dataset renamed into place under it."""
  os.makedirs(data_dir, exist_ok=True)
  name = f'{builder.name}-{builder.builder_config.name}-{builder.version}'
  with open(os.path.join(data_dir, f'.{name}.lock'), 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


def _prepare(builder: WorldBuilder) -> None:
  # ArrayRecord: random access, so the pipeline reads any example by index.
  builder.download_and_prepare(
      file_format='array_record',
      download_config=tfds.download.DownloadConfig(
          compute_stats=tfds.download.ComputeStatsMode.SKIP))


def _prepare_and_upload(name: str, builder: WorldBuilder, sizes: str,
                        image_size: int, num_workers: int | None) -> None:
  """Prepares `builder` (on gs://...) in a local directory, then copies it
  up: ArrayRecord's writer only writes local files (its reader does read
  gs://)."""
  with tempfile.TemporaryDirectory() as local_dir:
    local = make_builder(name, local_dir, sizes, image_size)
    local.num_workers = num_workers
    _prepare(local)
    fs.copy_tree(os.fspath(local.data_dir), os.fspath(builder.data_dir))


def _check_fingerprint(builder: WorldBuilder,
                       log: Callable[[str], None]) -> None:
  """Warns if a prepared dataset was generated by different code."""
  if not fs.exists(fs.join(os.fspath(builder.data_dir),
                           'dataset_info.json')):
    return
  stored = (builder.info.metadata or {}).get('generation_fingerprint')
  if stored != builders.generation_fingerprint():
    log(f'    WARNING: {builder.name} in {builder.data_dir} was generated '
        f'with fingerprint {stored}, the code now gives '
        f'{builders.generation_fingerprint()}: bump prepare.WORLD_VERSION if '
        'generation changed, or delete the directory.')
