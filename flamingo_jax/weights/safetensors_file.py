"""Reads `.safetensors` files, single or sharded, without the safetensors
package and without reading a tensor before it is asked for.

The format: an 8-byte little-endian header length N, N bytes of JSON
`{name: {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, ...,
"__metadata__": {..}}`, then the data (offsets relative to its start). Every
entry is checked against the file before anything is read: a damaged header
(bad length, JSON, dtype, shape or offsets) is a ValueError naming the file
and the entry. Each tensor is a read-only `np.memmap` of its own bytes, so
reading one touches only its pages and nothing stays mapped once the arrays
are dropped.

Sharded checkpoints (`model.safetensors.index.json`:
`{"weight_map": {name: shard file}}`) give one store over all shards,
iterated shard by shard; the index and the shards' headers must agree.
"""

import json
import os
import struct
from typing import Any

import numpy as np

from flamingo_jax.weights import tensors as tensors_lib

_MAX_HEADER_BYTES = 100_000_000  # The format's own limit.


class _Entry:
  __slots__ = ('dtype', 'shape', 'offset')

  def __init__(self, dtype: np.dtype, shape: tuple[int, ...], offset: int):
    self.dtype, self.shape, self.offset = dtype, shape, offset


def _damaged(path: str, detail: str) -> ValueError:
  return ValueError(f'{path}: damaged safetensors header: {detail}')


def read_header(path: str) -> tuple[dict[str, _Entry], dict[str, Any]]:
  """Parses and checks the header: name -> entry (absolute offsets), and
  the `__metadata__` dict."""
  size = os.path.getsize(path)
  with open(path, 'rb') as f:
    prefix = f.read(8)
    if len(prefix) < 8:
      raise _damaged(path, f'the file has {size} bytes, fewer than the '
                     '8-byte header length.')
    (length,) = struct.unpack('<Q', prefix)
    if length > min(size - 8, _MAX_HEADER_BYTES):
      raise _damaged(path, f'header length {length} does not fit the file '
                     f'of {size} bytes.')
    raw = f.read(length)
  try:
    header = json.loads(raw.decode('utf-8'))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise _damaged(path, f'the header is not JSON ({e}).') from e
  if not isinstance(header, dict):
    raise _damaged(path, 'the header is not a JSON object.')
  metadata = header.pop('__metadata__', None) or {}
  data_start, data_size = 8 + length, size - 8 - length
  entries = {}
  for name, spec in header.items():
    entries[name] = _entry(path, name, spec, data_start, data_size)
  return entries, metadata


def _entry(path: str, name: str, spec: Any, data_start: int,
           data_size: int) -> _Entry:
  if not isinstance(spec, dict) or not {'dtype', 'shape',
                                        'data_offsets'} <= set(spec):
    raise _damaged(path, f'entry {name!r} must have dtype, shape and '
                   f'data_offsets; got {spec!r}.')
  dtype = tensors_lib.SAFETENSORS_DTYPES.get(spec['dtype'])
  if dtype is None:
    raise _damaged(path, f'entry {name!r} has unknown dtype '
                   f'{spec["dtype"]!r}; known: '
                   f'{sorted(tensors_lib.SAFETENSORS_DTYPES)}.')
  shape, offsets = spec['shape'], spec['data_offsets']
  if not (isinstance(shape, list)
          and all(isinstance(d, int) and d >= 0 for d in shape)):
    raise _damaged(path, f'entry {name!r} has a bad shape {shape!r}.')
  if not (isinstance(offsets, list) and len(offsets) == 2
          and all(isinstance(o, int) for o in offsets)
          and 0 <= offsets[0] <= offsets[1] <= data_size):
    raise _damaged(path, f'entry {name!r} has data_offsets {offsets!r} '
                   f'outside the {data_size} data bytes.')
  expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  if offsets[1] - offsets[0] != expected:
    raise _damaged(path, f'entry {name!r} ({spec["dtype"]} {shape}) needs '
                   f'{expected} bytes but data_offsets {offsets} span '
                   f'{offsets[1] - offsets[0]}.')
  return _Entry(dtype, tuple(shape), data_start + offsets[0])


def _load(path: str, entry: _Entry) -> np.ndarray:
  if not entry.shape or 0 in entry.shape:
    # np.memmap cannot map zero bytes; a scalar is read directly.
    with open(path, 'rb') as f:
      f.seek(entry.offset)
      data = f.read(int(np.prod(entry.shape)) * entry.dtype.itemsize)
    return np.frombuffer(data, entry.dtype).reshape(entry.shape)
  return np.memmap(path, dtype=entry.dtype, mode='r', offset=entry.offset,
                   shape=entry.shape)


def _store(files: dict[str, dict[str, _Entry]],
           source: str) -> tensors_lib.TensorStore:
  infos, where = {}, {}
  for path, entries in files.items():
    for name, entry in sorted(entries.items(), key=lambda e: e[1].offset):
      infos[name] = tensors_lib.TensorInfo(entry.shape, entry.dtype, path)
      where[name] = (path, entry)
  return tensors_lib.TensorStore(infos, lambda name: _load(*where[name]),
                                 source=source)


def read(path: str) -> tensors_lib.TensorStore:
  """A `.safetensors` file or a sharded `*.safetensors.index.json`."""
  path = os.fspath(path)
  if path.endswith('.index.json'):
    return read_index(path)
  entries, _ = read_header(path)
  return _store({path: entries}, path)


def read_index(path: str) -> tensors_lib.TensorStore:
  """The shards named by an index's `weight_map`, as one store."""
  weight_map = load_weight_map(path)
  directory = os.path.dirname(path)
  shards: dict[str, set[str]] = {}
  for name, shard in weight_map.items():
    shards.setdefault(shard, set()).add(name)
  files = {}
  for shard in sorted(shards):
    shard_path = os.path.join(directory, shard)
    if not os.path.isfile(shard_path):
      raise FileNotFoundError(f'{path} names the shard {shard}, which is not '
                              f'in {directory}.')
    entries, _ = read_header(shard_path)
    missing = sorted(shards[shard] - set(entries))
    extra = sorted(set(entries) - shards[shard])
    if missing or extra:
      raise ValueError(
          f'{path} and the header of {shard} disagree: the index puts '
          f'{missing[:5]} there but the shard lacks them; the shard also '
          f'holds {extra[:5]} that the index maps elsewhere or not at all.')
    files[shard_path] = entries
  return _store(files, path)


def load_weight_map(path: str) -> dict[str, str]:
  """The `weight_map` of a sharded checkpoint's index JSON."""
  try:
    with open(path) as f:
      index = json.load(f)
    weight_map = index['weight_map']
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ValueError(f'{path} is not a sharded-checkpoint index (a JSON '
                     f'object with a "weight_map"): {e}') from e
  if not isinstance(weight_map, dict) or not all(
      isinstance(v, str) for v in weight_map.values()):
    raise ValueError(f'{path}: weight_map must map tensor names to shard '
                     'file names.')
  return weight_map


def write(path: str, arrays: dict[str, np.ndarray],
          metadata: dict[str, str] | None = None) -> None:
  """Writes arrays as one `.safetensors` file (tests and fixtures use it)."""
  names = {dtype: name for name, dtype in
           tensors_lib.SAFETENSORS_DTYPES.items()}
  header: dict[str, Any] = {}
  offset = 0
  blobs = []
  for name, array in arrays.items():
    array = np.asarray(array)
    blob = array.tobytes()  # C order, whatever the strides.
    header[name] = {'dtype': names[array.dtype], 'shape': list(array.shape),
                    'data_offsets': [offset, offset + len(blob)]}
    offset += len(blob)
    blobs.append(blob)
  if metadata:
    header['__metadata__'] = metadata
  raw = json.dumps(header, separators=(',', ':')).encode('utf-8')
  raw += b' ' * (-len(raw) % 8)  # Aligns the data, as the format advises.
  with open(path, 'wb') as f:
    f.write(struct.pack('<Q', len(raw)))
    f.write(raw)
    for blob in blobs:
      f.write(blob)
