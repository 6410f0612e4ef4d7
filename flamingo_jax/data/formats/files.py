"""Reading sources with tf.io.gfile, so every path may be local or gs://."""

from collections.abc import Mapping
import contextlib
import io
import json
import os
import re
from typing import Any

import tensorflow as tf


def exists(path: str) -> bool:
  return tf.io.gfile.exists(path)


def isdir(path: str) -> bool:
  return tf.io.gfile.isdir(path)


def size(path: str) -> int:
  return tf.io.gfile.stat(path).length


def read_bytes(path: str) -> bytes:
  with tf.io.gfile.GFile(path, 'rb') as f:
    return f.read()


class _RawFile(io.RawIOBase):
  """A GFile as a seekable raw stream (io, zipfile and pyarrow read it)."""

  def __init__(self, f):
    super().__init__()
    self._f = f

  def readable(self):
    return True

  def seekable(self):
    return True

  def readinto(self, buffer):
    data = self._f.read(len(buffer))
    buffer[:len(data)] = data
    return len(data)

  def seek(self, offset, whence=io.SEEK_SET):
    if whence == io.SEEK_END:
      offset, whence = self._f.size() + offset, io.SEEK_SET
    self._f.seek(offset, whence)
    return self._f.tell()

  def tell(self):
    return self._f.tell()


@contextlib.contextmanager
def open_binary(path: str):
  """A buffered, seekable binary stream of a local or gs:// file."""
  with tf.io.gfile.GFile(path, 'rb') as f:
    yield io.BufferedReader(_RawFile(f), buffer_size=1 << 20)


def read_json(path: str) -> Any:
  """A JSON file, or a FileNotFoundError / ValueError naming it."""
  if not exists(path):
    raise FileNotFoundError(f'Annotation file {path} does not exist.')
  try:
    return json.loads(read_bytes(path))
  except json.JSONDecodeError as e:
    raise ValueError(f'{path} is not valid JSON: {e}') from e


def resolve(path: str, base: str) -> str:
  """`path` if absolute (or gs://...), else joined to `base`."""
  if os.path.isabs(path) or '://' in path:
    return path
  return os.path.join(base, path)


def _expand_braces(pattern: str) -> list[str]:
  """WebDataset's shard ranges: 'a-{000..002}.tar' -> three names."""
  match = re.search(r'\{(\d+)\.\.(\d+)\}', pattern)
  if not match:
    return [pattern]
  first, last = match.groups()
  head, tail = pattern[:match.start()], pattern[match.end():]
  return [name for n in range(int(first), int(last) + 1)
          for name in _expand_braces(f'{head}{n:0{len(first)}d}{tail}')]


def list_files(source: str, extensions: tuple[str, ...]) -> list[str]:
  """The files of a source: a file, a directory, a glob or a {a..b} range.

  A directory gives its files (not recursively) whose name ends with one of
  `extensions`. Raises FileNotFoundError when nothing matches.
  """
  if isdir(source):
    files = [os.path.join(source, n) for n in tf.io.gfile.listdir(source)
             if n.lower().endswith(extensions)]
  else:
    files = []
    for pattern in _expand_braces(source):
      files.extend(tf.io.gfile.glob(pattern) if re.search(r'[*?\[]', pattern)
                   else [pattern] if exists(pattern) else [])
  if not files:
    raise FileNotFoundError(f'No {"/".join(extensions)} files at {source}.')
  return sorted(files)


def field(row: Mapping[str, Any], key: str, where: str) -> Any:
  """row[key], or a ValueError naming the record and the keys it has."""
  if key not in row:
    raise ValueError(f'{where}: no {key!r} field; the record has '
                     f'{sorted(row)}.')
  return row[key]
