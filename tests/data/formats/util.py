"""Helpers of the format tests: tiny images and videos in true formats."""

import io
import os
import tarfile

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
