"""Helpers of the format tests: tiny images and videos in true formats."""

import io
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
