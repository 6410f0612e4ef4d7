"""The lazy `{name: array}` that every checkpoint reader returns.

A `TensorStore` is a read-only mapping from tensor names to numpy arrays
that knows each tensor's shape, dtype and file (`info`) without reading it;
indexing reads that one tensor. Names iterate grouped by file (shard), in
file order, so that a converter going through them in order has one shard
open at a time: `release(group)` closes a shard's memory map once it is done.
`reads` counts the tensors actually read (a test checks the laziness).

Readers: `safetensors_file` (.safetensors and sharded index), `torch_file`
(PyTorch .pt/.bin), `haiku_pickle` (DeepMind's NFNet pickles); `open_path`
picks one from a path.
"""

import collections
from collections.abc import Callable, Iterator, Mapping
import dataclasses
import os
from typing import Optional

import ml_dtypes
import numpy as np

# Names of the dtypes as the file formats spell them.
SAFETENSORS_DTYPES = {
    'F64': np.dtype(np.float64), 'F32': np.dtype(np.float32),
    'F16': np.dtype(np.float16), 'BF16': np.dtype(ml_dtypes.bfloat16),
    'F8_E4M3': np.dtype(ml_dtypes.float8_e4m3fn),
    'F8_E5M2': np.dtype(ml_dtypes.float8_e5m2),
    'I64': np.dtype(np.int64), 'I32': np.dtype(np.int32),
    'I16': np.dtype(np.int16), 'I8': np.dtype(np.int8),
    'U64': np.dtype(np.uint64), 'U32': np.dtype(np.uint32),
    'U16': np.dtype(np.uint16), 'U8': np.dtype(np.uint8),
    'BOOL': np.dtype(np.bool_),
}


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  """What is known of a tensor before reading it."""
  shape: tuple[int, ...]
  dtype: np.dtype
  group: str  # The file (shard) that holds it.


class TensorStore(Mapping[str, np.ndarray]):
  """Tensors by name, each read when indexed (see the module docstring).

  Args:
    infos: name -> TensorInfo, in the order to iterate (grouped by file).
    loader: name -> the tensor as a numpy array.
    releasers: group -> a function freeing that group's resources.
    source: the path, for messages.
  """

  def __init__(self, infos: Mapping[str, TensorInfo],
               loader: Callable[[str], np.ndarray], *,
               releasers: Optional[Mapping[str, Callable[[], None]]] = None,
               source: str = '<memory>'):
    self._infos = dict(infos)
    self._loader = loader
    self._releasers = dict(releasers or {})
    self.source = source
    self.reads: collections.Counter[str] = collections.Counter()

  def info(self, name: str) -> TensorInfo:
    return self._infos[name]

  def __getitem__(self, name: str) -> np.ndarray:
    if name not in self._infos:
      raise KeyError(f'{self.source} has no tensor {name!r}.')
    array = self._loader(name)
    expected = self._infos[name]
    if tuple(array.shape) != expected.shape:
      raise ValueError(f'{self.source}: tensor {name} has shape '
                       f'{tuple(array.shape)}, its header says '
                       f'{expected.shape}.')
    self.reads[name] += 1
    return array

  def __iter__(self) -> Iterator[str]:
    return iter(self._infos)

  def __contains__(self, name: object) -> bool:
    return name in self._infos  # Mapping's default would read the tensor.

  def __len__(self) -> int:
    return len(self._infos)

  def groups(self) -> list[str]:
    return list(dict.fromkeys(i.group for i in self._infos.values()))

  def release(self, group: str) -> None:
    """Frees what reading `group` holds (a shard's memory map)."""
    releaser = self._releasers.get(group)
    if releaser is not None:
      releaser()

  def close(self) -> None:
    for group in self._releasers:
      self.release(group)

  def __enter__(self) -> 'TensorStore':
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def num_bytes(self) -> int:
    return sum(int(np.prod(i.shape)) * i.dtype.itemsize
               for i in self._infos.values())


def from_arrays(arrays: Mapping[str, np.ndarray], *,
                source: str = '<memory>') -> TensorStore:
  """A store over arrays already in memory (one group)."""
  arrays = {name: np.asarray(a) for name, a in arrays.items()}
  infos = {name: TensorInfo(tuple(a.shape), a.dtype, source)
           for name, a in arrays.items()}
  return TensorStore(infos, arrays.__getitem__, source=source)


def merge(stores: list[TensorStore], *, source: str) -> TensorStore:
  """One store over several (e.g. a vision tower file and an LM's shards).

  A name present in two stores is an error.
  """
  infos, owner = {}, {}
  for store in stores:
    for name in store:
      if name in owner:
        raise ValueError(f'Tensor {name} is in both {owner[name].source} and '
                         f'{store.source}.')
      infos[name], owner[name] = store.info(name), store
  releasers = {g: (lambda s=s, g=g: s.release(g))
               for s in stores for g in s.groups()}
  merged = TensorStore(infos, lambda name: owner[name][name],
                       releasers=releasers, source=source)
  return merged


def open_path(path: str, *, torch_backend: str = 'auto') -> TensorStore:
  """The reader for `path`, chosen by its name.

  Args:
    path: a `.safetensors` file, a `*.safetensors.index.json`, a PyTorch
      `.pt`/`.pth`/`.bin` file, a `*.bin.index.json`, a DeepMind NFNet
      `*_haiku.npz` pickle, or a directory holding one of
      `model.safetensors[.index.json]`,
      `pytorch_model.bin[.index.json]`, `open_clip_model.safetensors`,
      `open_clip_pytorch_model.bin`.
    torch_backend: for PyTorch files: 'auto' (torch when importable),
      'torch' or 'builtin' (our restricted unpickler).

  Returns:
    The TensorStore.
  """
  # pylint: disable=g-import-not-at-top  (readers import each other's names)
  from flamingo_jax.weights import haiku_pickle
  from flamingo_jax.weights import safetensors_file
  from flamingo_jax.weights import torch_file
  path = os.fspath(path)
  if os.path.isdir(path):
    path = _file_in_dir(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f'No checkpoint file at {path}.')
  name = os.path.basename(path)
  if name.endswith('.safetensors') or name.endswith('.safetensors.index.json'):
    return safetensors_file.read(path)
  if name.endswith('.bin.index.json'):
    return torch_file.read_index(path, backend=torch_backend)
  if name.endswith('.npz'):
    return haiku_pickle.read(path)
  if name.endswith(('.pt', '.pth', '.bin', '.ckpt')):
    return torch_file.read(path, backend=torch_backend)
  raise ValueError(
      f'Cannot tell the format of {path}: expected .safetensors, '
      '.safetensors.index.json, .pt/.pth/.bin/.ckpt (PyTorch), '
      '.bin.index.json, or a DeepMind *_haiku.npz pickle.')


# Files a directory may hold, in order of preference (safetensors first: no
# pickle at all).
_DIR_FILES = (
    'model.safetensors.index.json', 'model.safetensors',
    'open_clip_model.safetensors', 'pytorch_model.bin.index.json',
    'pytorch_model.bin', 'open_clip_pytorch_model.bin',
)


def _file_in_dir(directory: str) -> str:
  for name in _DIR_FILES:
    candidate = os.path.join(directory, name)
    if os.path.isfile(candidate):
      return candidate
  raise FileNotFoundError(
      f'{directory} holds none of {list(_DIR_FILES)}; give the weights file '
      'itself.')
