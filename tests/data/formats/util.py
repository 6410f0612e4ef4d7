"""Helpers of the format tests: tiny images and videos in true formats."""

import io
import json
import os
import struct
import tarfile
import zlib

import numpy as np
from PIL import Image

from flamingo_jax.data import formats


def image(seed: int, height: int = 16, width: int = 24) -> np.ndarray:
  """A distinct random [height, width, 3] uint8 image."""
  return np.random.default_rng(seed).integers(
      0, 256, [height, width, 3], dtype=np.uint8)


def encode(array: np.ndarray, image_format: str = 'PNG') -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format=image_format)
  return buffer.getvalue()


def decode(data: bytes) -> np.ndarray:
  with Image.open(io.BytesIO(data)) as pil:
    return np.asarray(pil.convert('RGB'))


def write(path, data: bytes | str) -> str:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'wb') as f:
    f.write(data.encode() if isinstance(data, str) else data)
  return str(path)


def write_tar(path, members: dict[str, bytes]) -> str:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with tarfile.open(path, 'w') as tar:
    for name, data in members.items():
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  return str(path)


def png_16_bit(array: np.ndarray) -> bytes:
  """A 16-bit PNG of uint16 [h, w, c], c = 1 (grey), 2 (+alpha), 3, 4.

  Written by hand: Pillow writes 16-bit greyscale only.
  """
  height, width, channels = array.shape
  color_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
  rows = b''.join(b'\x00' + row.astype('>u2').tobytes() for row in array)

  def chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack('>I', len(data)) + kind + data +
            struct.pack('>I', zlib.crc32(kind + data)))

  header = struct.pack('>IIBBBBB', width, height, 16, color_type, 0, 0, 0)
  return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header) +
          chunk(b'IDAT', zlib.compress(rows)) + chunk(b'IEND', b''))


def tar_layout(path) -> dict[str, tuple[int, int, int]]:
  """{member name: (header offset, data offset, data size)} of a tar."""
  with tarfile.open(path) as tar:
    return {m.name: (m.offset, m.offset_data, m.size) for m in tar}


def cut(path, size: int) -> str:
  """Truncates a file to its first `size` bytes (a download cut short)."""
  with open(path, 'r+b') as f:
    f.truncate(size)
  return str(path)


def write_video(path, frames: list[np.ndarray], fps: int = 4) -> str:
  """A lossless video (PNG frames in a QuickTime container), with PyAV."""
  import av  # pylint: disable=g-import-not-at-top
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with av.open(str(path), 'w') as out:
    stream = out.add_stream('png', rate=fps)
    stream.height, stream.width = frames[0].shape[:2]
    stream.pix_fmt = 'rgb24'
    for frame in frames:
      out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format='rgb24')))
    out.mux(stream.encode())
  return str(path)


def build(format_name, source, data_dir, **options):
  """formats.build with two threads, quietly; returns (builder, statistics)."""
  builder = formats.build(format_name, source, str(data_dir), num_workers=2,
                          log=lambda line: None, **options)
  return builder, formats.statistics(builder)


def by_source(data_source) -> dict[str, dict]:
  """{source key: example} of a split (TFDS shuffles the stored order)."""
  examples = [data_source[i] for i in range(len(data_source))]
  return {e['source'].decode(): e for e in examples}


def text(value) -> str:
  return value.decode() if isinstance(value, bytes) else str(value)


def ml_collections_spec(builder: str, split: str, data_dir) -> 'object':
  """A pipeline dataset spec reading a prepared format dataset."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  return ml_collections.ConfigDict(dict(builder=builder, split=split,
                                        data_dir=str(data_dir)))


def write_parquet(path, columns: dict[str, list], types: dict | None = None
                  ) -> str:
  """A Parquet file of {column: values} (pyarrow infers unless typed)."""
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  os.makedirs(os.path.dirname(path), exist_ok=True)
  types = types or {}
  table = pa.table({name: pa.array(values, type=types.get(name))
                    for name, values in columns.items()})
  pq.write_table(table, str(path))
  return str(path)


def write_img2dataset(folder, samples: list[tuple[str, np.ndarray | None]],
                      output_format: str = 'files', per_shard: int = 2,
                      parquet_sidecars: bool = True) -> dict[str, str]:
  """An img2dataset output folder of (url, image or None: a failed one).

  As img2dataset writes it: keys '<shard:05d><index:04d>'; per shard the
  images with their .txt and .json (url, key, status, ...) in
  `<shard>/` (output_format 'files') or `<shard>.tar` ('webdataset'), the
  `<shard>.parquet` sidecar (key, url, caption, status, error_message,
  width, height) and `<shard>_stats.json`. Failed downloads have a sidecar
  row and no files. Returns {url: key}.
  """
  keys = {}
  for shard in range(0, len(samples), per_shard):
    rows, members = [], {}
    for index, (url, array) in enumerate(samples[shard:shard + per_shard]):
      key = f'{shard // per_shard:05d}{index:04d}'
      keys[url] = key
      status = 'success' if array is not None else 'failed_to_download'
      row = dict(key=key, url=url, caption=f'caption of {key}', status=status,
                 error_message=None if array is not None else 'HTTP 404',
                 width=None if array is None else array.shape[1],
                 height=None if array is None else array.shape[0])
      rows.append(row)
      if array is not None:
        members[f'{key}.jpg'] = encode(array, 'PNG')  # Lossless for tests.
        members[f'{key}.txt'] = row['caption'].encode()
        members[f'{key}.json'] = json.dumps(row).encode()
    name = f'{shard // per_shard:05d}'
    if output_format == 'webdataset':
      write_tar(os.path.join(folder, f'{name}.tar'), members)
    else:
      os.makedirs(os.path.join(folder, name), exist_ok=True)
      for member, data in members.items():
        write(os.path.join(folder, name, member), data)
    if parquet_sidecars:
      write_parquet(os.path.join(folder, f'{name}.parquet'),
                    {k: [r[k] for r in rows] for k in rows[0]})
    write(os.path.join(folder, f'{name}_stats.json'), json.dumps(
        {'count': len(rows), 'successes': len(members) // 3}))
  return keys


def write_hf_dataset(folder, columns: dict[str, list], types: dict | None = None
                     ) -> str:
  """A `datasets.Dataset.save_to_disk` folder, written with pyarrow alone.

  Its layout: data-00000-of-00001.arrow (an Arrow IPC stream),
  dataset_info.json and state.json (listing the data files).
  """
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  os.makedirs(folder, exist_ok=True)
  types = types or {}
  table = pa.table({name: pa.array(values, type=types.get(name))
                    for name, values in columns.items()})
  name = 'data-00000-of-00001.arrow'
  with pa.OSFile(os.path.join(folder, name), 'wb') as sink:
    with pa.ipc.new_stream(sink, table.schema) as writer:
      writer.write_table(table)
  write(os.path.join(folder, 'dataset_info.json'), json.dumps(
      {'citation': '', 'description': '', 'features': {}}))
  write(os.path.join(folder, 'state.json'), json.dumps({
      '_data_files': [{'filename': name}], '_fingerprint': '0' * 16,
      '_format_columns': None, '_format_kwargs': {}, '_format_type': None,
      '_output_all_columns': False, '_split': None}))
  return str(folder)
