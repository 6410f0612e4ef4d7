"""Reads PyTorch `.pt`/`.pth`/`.bin` weight files without running their code.

Two backends (`backend=`):
  'torch'    `torch.load(weights_only=True, mmap=True)`: PyTorch's own
             restricted loader (what 'auto' uses when torch is importable);
  'builtin'  our `safe_pickle` allowlist, with no torch at all.
Either way a file whose pickle asks for any global beyond the tensor-rebuild
functions stops with `safe_pickle.RefusedGlobalError` naming it.

Formats the builtin reader understands:
  zip     (torch >= 1.6, the default): `<archive>/data.pkl` plus one entry
          `<archive>/data/<key>` per storage. Stored (uncompressed) entries
          are memory-mapped in place, so only touched tensors are read.
  legacy  (`_use_new_zipfile_serialization=False`, torch < 1.6): magic
          number, protocol, system info and the object pickle, then the
          storages back to back, each after an 8-byte element count; their
          offsets are found by seeking, and each is mapped when touched.
  TorchScript (`torch.jit.save`, e.g. OpenAI's original CLIP `.pt`): the
          zip format whose `data.pkl` is the module itself, objects of the
          archive's own `__torch__.*` classes; each becomes a
          `_ScriptModule` holding its attributes, and the tensors among
          them are the file's tensors under their attribute paths, the
          names of the module's `state_dict()`. The archive's `code/` is
          never compiled or run, so it is read by the builtin reader with
          either backend (`torch.load(weights_only=True)` refuses such
          archives, and `torch.jit.load` would compile their code).
Not read: the pre-1.0 tar format, quantized and sparse tensors, and
big-endian files.

Nested dicts (`{'state_dict': {...}}`, OpenFlamingo's `checkpoint.pt`) are
flattened with '.'; values that are not tensors (an epoch number, a config)
are left out.
"""

from collections.abc import Callable, Mapping
import functools
import io
import json
import os
import pickle
import struct
from typing import Any, Optional
import zipfile

import ml_dtypes
import numpy as np

from flamingo_jax.weights import safe_pickle
from flamingo_jax.weights import tensors as tensors_lib

_STORAGE_DTYPES = {
    'DoubleStorage': np.float64, 'FloatStorage': np.float32,
    'HalfStorage': np.float16, 'BFloat16Storage': ml_dtypes.bfloat16,
    'LongStorage': np.int64, 'IntStorage': np.int32,
    'ShortStorage': np.int16, 'CharStorage': np.int8,
    'ByteStorage': np.uint8, 'BoolStorage': np.bool_,
    'UntypedStorage': np.uint8,
    'Float8_e4m3fnStorage': ml_dtypes.float8_e4m3fn,
    'Float8_e5m2Storage': ml_dtypes.float8_e5m2,
}
_TORCH_DTYPES = {
    'float64': np.float64, 'float32': np.float32, 'float16': np.float16,
    'bfloat16': ml_dtypes.bfloat16, 'int64': np.int64, 'int32': np.int32,
    'int16': np.int16, 'int8': np.int8, 'uint8': np.uint8, 'bool': np.bool_,
    'float8_e4m3fn': ml_dtypes.float8_e4m3fn,
    'float8_e5m2': ml_dtypes.float8_e5m2,
}
_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
BACKENDS = ('auto', 'torch', 'builtin')


class _StorageType:
  """Stands for `torch.FloatStorage` etc.: just a dtype."""

  def __init__(self, name: str):
    self.name = name
    self.dtype = np.dtype(_STORAGE_DTYPES[name])


class _Storage:
  """A storage's key and dtype; its bytes stay in the file until read."""

  def __init__(self, key: str, dtype: np.dtype, numel: int):
    self.key, self.dtype, self.numel = key, dtype, numel
    self.view: Optional[tuple[int, int]] = None  # Legacy: (offset, size).


class _TensorRef:
  """A tensor as `_rebuild_tensor_v2` describes it: a strided view."""

  def __init__(self, storage, offset, shape, stride):
    if not isinstance(storage, _Storage):
      raise pickle.UnpicklingError('a tensor without a storage.')
    self.storage = storage
    self.offset = int(offset)
    self.shape = tuple(int(d) for d in shape)
    self.stride = tuple(int(s) for s in stride)


def _rebuild_tensor(storage, offset, shape, stride, *unused):
  del unused  # requires_grad, backward hooks, metadata.
  return _TensorRef(storage, offset, shape, stride)


def _rebuild_parameter(data, *unused):
  del unused  # requires_grad, hooks, state.
  return data


def _rebuild_from_type(func, new_type, args, state):
  del state  # A tensor subclass's Python attributes: not needed.
  if new_type is not _TENSOR_TYPE:
    raise pickle.UnpicklingError(f'refusing tensor subclass {new_type!r}.')
  return func(*args)


_TENSOR_TYPE = object()  # Stands for torch.Tensor / torch.nn.Parameter.


class _ScriptModule:
  """Stands for any class of a TorchScript archive (`__torch__.*`): it
  keeps the attributes the pickle BUILDs it with, and runs nothing."""

  def __setstate__(self, state):
    if not isinstance(state, dict):
      raise pickle.UnpicklingError(
          f'a TorchScript object with state of type {type(state).__name__}.')
    self.attributes = dict(state)


class _WithScriptClasses(Mapping):
  """`_ALLOWED`, plus `_ScriptModule` for the `__torch__.*` classes."""

  def __init__(self, allowed: Mapping[tuple[str, str], Any]):
    self._allowed = allowed

  def __getitem__(self, key: tuple[str, str]) -> Any:
    module = key[0]
    if module == '__torch__' or module.startswith('__torch__.'):
      return _ScriptModule
    return self._allowed[key]

  def __iter__(self):
    return iter(self._allowed)

  def __len__(self) -> int:
    return len(self._allowed)


def _torch_globals() -> dict[tuple[str, str], Any]:
  allowed = dict(safe_pickle.BUILTIN_GLOBALS)
  allowed.update(safe_pickle.NUMPY_GLOBALS)
  allowed.update({
      ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor,
      ('torch._utils', '_rebuild_tensor'): _rebuild_tensor,
      ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
      ('torch._utils', '_rebuild_parameter_with_state'): _rebuild_parameter,
      ('torch._tensor', '_rebuild_from_type_v2'): _rebuild_from_type,
      ('torch', 'Tensor'): _TENSOR_TYPE,
      ('torch.nn.parameter', 'Parameter'): _TENSOR_TYPE,
      ('torch', 'Size'): tuple,
      ('torch', 'device'): str,
  })
  for name in _STORAGE_DTYPES:
    allowed[('torch', name)] = _StorageType(name)
    allowed[('torch.storage', name)] = _StorageType(name)
  for name, dtype in _TORCH_DTYPES.items():
    allowed[('torch', name)] = np.dtype(dtype)
  return allowed


_ALLOWED = _torch_globals()


def read(path: str, *, backend: str = 'auto') -> tensors_lib.TensorStore:
  """The tensors of one PyTorch file (see the module docstring)."""
  path = os.fspath(path)
  if backend not in BACKENDS:
    raise ValueError(f'backend must be one of {BACKENDS}; got {backend!r}.')
  is_zip = zipfile.is_zipfile(path)
  if is_zip and is_torchscript(path):
    return _read_zip(path)  # Either backend.
  if backend == 'torch' or (backend == 'auto' and _torch_available()):
    return _read_with_torch(path)
  if is_zip:
    return _read_zip(path)
  return _read_legacy(path)


def is_torchscript(path: str) -> bool:
  """Whether the zip at `path` is a TorchScript archive (it has code/)."""
  with zipfile.ZipFile(path) as archive:
    return _has_code(archive.namelist())


def _has_code(names: list[str]) -> bool:
  """A zip's entry names hold `<archive>/code/...`: TorchScript."""
  return any(n.count('/') >= 2 and n.split('/')[1] == 'code' for n in names)


def read_index(path: str, *, backend: str = 'auto') -> tensors_lib.TensorStore:
  """A sharded `pytorch_model.bin.index.json`: its shards as one store."""
  # pylint: disable=g-import-not-at-top
  from flamingo_jax.weights import safetensors_file
  weight_map = safetensors_file.load_weight_map(path)
  directory = os.path.dirname(path)
  stores = []
  for shard in sorted(set(weight_map.values())):
    store = read(os.path.join(directory, shard), backend=backend)
    expected = {n for n, s in weight_map.items() if s == shard}
    if set(store) != expected:
      raise ValueError(
          f'{path} and {shard} disagree on the tensors in that shard: '
          f'missing {sorted(expected - set(store))[:5]}, unexpected '
          f'{sorted(set(store) - expected)[:5]}.')
    stores.append(store)
  return tensors_lib.merge(stores, source=path)


def _torch_available() -> bool:
  try:
    import torch  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return False
  return True


def flatten(tree: Any, is_tensor: Callable[[Any], bool],
            prefix: str = '') -> dict[str, Any]:
  """Nested dicts/lists (and TorchScript modules' attributes) ->
  {'a.b.0': tensor}; other leaves are dropped."""
  if is_tensor(tree):
    return {prefix: tree}
  if isinstance(tree, _ScriptModule):
    tree = tree.attributes
  if isinstance(tree, dict):
    items = tree.items()
  elif isinstance(tree, (list, tuple)):
    items = enumerate(tree)
  else:
    return {}
  out = {}
  for key, value in items:
    out.update(flatten(value, is_tensor,
                       f'{prefix}.{key}' if prefix else str(key)))
  return out


# -- The zip format ------------------------------------------------------------


def _read_zip(path: str) -> tensors_lib.TensorStore:
  with zipfile.ZipFile(path) as archive:
    names = archive.namelist()
    pickles = [n for n in names if n.endswith('/data.pkl') and
               n.count('/') == 1]
    if len(pickles) != 1:
      raise ValueError(f'{path} is a zip file but not a PyTorch checkpoint: '
                       f'expected one <archive>/data.pkl, found '
                       f'{pickles}.')
    root = pickles[0][:-len('data.pkl')]
    if f'{root}byteorder' in names:
      order = archive.read(f'{root}byteorder').decode().strip()
      if order != 'little':
        raise ValueError(f'{path} was written {order}-endian; only '
                         'little-endian files are read.')
    storages: dict[str, _Storage] = {}

    def persistent_load(pid):
      return _storage_from_pid(pid, storages, path)

    allowed = _WithScriptClasses(_ALLOWED) if _has_code(names) else _ALLOWED
    with archive.open(pickles[0]) as f:
      tree = safe_pickle.load(io.BytesIO(f.read()), allowed,
                              what=path, persistent_load=persistent_load)
    locations = {key: _zip_location(archive, f'{root}data/{key}', path)
                 for key in storages}
  refs = flatten(tree, lambda x: isinstance(x, _TensorRef))
  return _store(path, refs, locations)


def _storage_from_pid(pid: Any, storages: dict[str, _Storage],
                      path: str) -> _Storage:
  if not (isinstance(pid, tuple) and pid and pid[0] == 'storage'):
    raise pickle.UnpicklingError(f'{path}: unexpected persistent id {pid!r}.')
  storage_type, key, numel = pid[1], str(pid[2]), int(pid[4])
  if not isinstance(storage_type, _StorageType):
    raise pickle.UnpicklingError(f'{path}: unknown storage type '
                                 f'{storage_type!r}.')
  if key not in storages:
    storages[key] = _Storage(key, storage_type.dtype, numel)
  storage = storages[key]
  if len(pid) > 5 and pid[5] is not None:  # Legacy view of a storage.
    _, view_offset, view_size = pid[5]
    view = _Storage(key, storage.dtype, numel)
    view.view = (int(view_offset), int(view_size))
    return view
  return storage


def _zip_location(archive: zipfile.ZipFile, name: str,
                  path: str) -> tuple[str, Any]:
  """('mmap', byte offset) for a stored entry, else ('zip', name)."""
  try:
    info = archive.getinfo(name)
  except KeyError:
    raise ValueError(f'{path} lacks the storage entry {name}.') from None
  if info.compress_type != zipfile.ZIP_STORED:
    return ('zip', name)
  with open(path, 'rb') as f:
    f.seek(info.header_offset)
    local = f.read(30)
  if local[:4] != b'PK\x03\x04':
    raise ValueError(f'{path}: damaged zip entry {name}.')
  name_length, extra_length = struct.unpack('<HH', local[26:30])
  return ('mmap', info.header_offset + 30 + name_length + extra_length)


# -- The legacy format ---------------------------------------------------------


def _read_legacy(path: str) -> tensors_lib.TensorStore:
  storages: dict[str, _Storage] = {}
  with open(path, 'rb') as f:
    try:
      magic = safe_pickle.load(f, {}, what=path)
    except ValueError:
      magic = None
    if magic != _LEGACY_MAGIC:
      raise ValueError(f'{path} is not a PyTorch checkpoint (neither the zip '
                       'format nor the legacy one).')
    safe_pickle.load(f, {}, what=path)  # Protocol version.
    info = safe_pickle.load(f, {}, what=path)
    if isinstance(info, dict) and not info.get('little_endian', True):
      raise ValueError(f'{path} was written big-endian; not supported.')
    tree = safe_pickle.load(
        f, _ALLOWED, what=path,
        persistent_load=lambda pid: _storage_from_pid(pid, storages, path))
    keys = safe_pickle.load(f, {}, what=path)
    locations = {}
    size = os.path.getsize(path)
    for key in keys:
      key = str(key)
      if key not in storages:
        raise ValueError(f'{path}: storage {key} has no tensor.')
      (numel,) = struct.unpack('<q', f.read(8))
      start = f.tell()
      end = start + numel * storages[key].dtype.itemsize
      if numel != storages[key].numel or end > size:
        raise ValueError(f'{path}: storage {key} is truncated or damaged.')
      locations[key] = ('mmap', start)
      f.seek(end)
  refs = flatten(tree, lambda x: isinstance(x, _TensorRef))
  return _store(path, refs, locations)


# -- Both builtin formats ------------------------------------------------------


def _store(path: str, refs: dict[str, _TensorRef],
           locations: dict[str, tuple[str, Any]]) -> tensors_lib.TensorStore:
  infos = {name: tensors_lib.TensorInfo(ref.shape, ref.storage.dtype, path)
           for name, ref in refs.items()}
  return tensors_lib.TensorStore(
      infos, functools.partial(_load, path, refs, locations), source=path)


def _load(path: str, refs: dict[str, _TensorRef],
          locations: dict[str, tuple[str, Any]], name: str) -> np.ndarray:
  ref = refs[name]
  storage = ref.storage
  base, count = 0, storage.numel
  if storage.view is not None:
    base, count = storage.view
  kind, where = locations[storage.key]
  if kind == 'mmap':
    flat = (np.memmap(path, dtype=storage.dtype, mode='r', offset=where,
                      shape=(storage.numel,))
            if storage.numel else np.zeros([0], storage.dtype))
  else:
    with zipfile.ZipFile(path) as archive:
      flat = np.frombuffer(archive.read(where), storage.dtype)
  flat = flat[base:base + count]
  numel = int(np.prod(ref.shape))
  if numel == 0:
    return np.zeros(ref.shape, storage.dtype)
  last = ref.offset + sum((d - 1) * s for d, s in zip(ref.shape, ref.stride))
  if ref.offset < 0 or last >= len(flat):
    raise ValueError(f'{path}: tensor {name} reaches past its storage.')
  item = storage.dtype.itemsize
  return np.lib.stride_tricks.as_strided(
      flat[ref.offset:], shape=ref.shape,
      strides=tuple(s * item for s in ref.stride), writeable=False)


# -- The torch backend ---------------------------------------------------------


def _read_with_torch(path: str) -> tensors_lib.TensorStore:
  import torch  # pylint: disable=g-import-not-at-top
  mmap = zipfile.is_zipfile(path)
  try:
    tree = torch.load(path, map_location='cpu', weights_only=True, mmap=mmap)
  except pickle.UnpicklingError as e:
    raise safe_pickle.RefusedGlobalError(
        f'{path}: torch.load(weights_only=True) refused it: {e}') from e
  tensors = flatten(tree, lambda x: isinstance(x, torch.Tensor))
  infos = {name: tensors_lib.TensorInfo(
      tuple(t.shape), np.dtype(_TORCH_DTYPES[str(t.dtype).split('.')[-1]]),
      path) for name, t in tensors.items()}
  return tensors_lib.TensorStore(
      infos, lambda name: _torch_to_numpy(tensors[name]), source=path)


def _torch_to_numpy(tensor) -> np.ndarray:
  import torch  # pylint: disable=g-import-not-at-top
  tensor = tensor.detach().contiguous()
  if tensor.dtype == torch.bfloat16:
    return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  if tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
    dtype = _TORCH_DTYPES[str(tensor.dtype).split('.')[-1]]
    return tensor.view(torch.uint8).numpy().view(dtype)
  return tensor.numpy()


def describe(store: tensors_lib.TensorStore) -> str:
  """A JSON listing of names, shapes and dtypes (for --list)."""
  return json.dumps({name: [list(store.info(name).shape),
                            str(store.info(name).dtype)] for name in store},
                    indent=1)
