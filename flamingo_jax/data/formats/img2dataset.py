"""Image references: files, bytes, and URLs resolved through img2dataset.

Nothing is ever downloaded at build time. An image reference of a record is
  - a path (relative to the format's image directory unless absolute or
    gs://): the file;
  - bytes, or a dict {'bytes': ..., 'path': ...} (a Hugging Face `datasets`
    Image value): the bytes, else the path;
  - a URL (http://, https://, ftp://, data:): looked up in the output folder
    of img2dataset (`img2dataset_dir`), which names images by its own keys,
    not by URL. Its shards are named by number (00000); their sidecars
    map url -> key: the `<shard>.parquet` files (columns url, key,
    status), or without them the per-image `<key>.json` files. Its images
    are in `<shard>.tar` (output_format webdataset) or
    `<shard>/<key>.<ext>` (output_format files). A URL that is not there
    (not downloaded, failed, or no img2dataset_dir given) is a
    BadInput('missing_image') naming the URL and why.

The index of a folder (url -> where the bytes are) is built once per build,
in memory: about 330 bytes an image (measured with tracemalloc for 45-byte
URLs), so a few GB for ten million images; build a larger source in parts,
each with its own img2dataset folder.
"""

from collections.abc import Mapping
import json
import os
import threading
from typing import Any

from absl import logging
import tensorflow as tf

from flamingo_jax.data.formats import common
from flamingo_jax.data.formats import files

URL_SCHEMES = ('http://', 'https://', 'ftp://', 'data:')


def is_url(reference: Any) -> bool:
  return isinstance(reference, str) and reference.lower().startswith(
      URL_SCHEMES)


class Img2DatasetIndex:
  """url -> image bytes of an img2dataset output folder."""

  def __init__(self, folder: str):
    self.folder = folder
    found = sorted(tf.io.gfile.listdir(folder))
    # img2dataset names its shards by number: 00000.tar, 00000/, ...
    names = [n for n in found if n.split('.')[0].rstrip('/').isdigit()]
    parquets = [os.path.join(folder, n) for n in names
                if n.endswith('.parquet')]
    self._images = {}  # key -> (path, offset, size); offset None: a file.
    sidecars = {}  # key -> {url, key, status, ...}: the JSON sidecars.
    shards = 0
    for name in names:
      path = os.path.join(folder, name.rstrip('/'))
      if name.endswith('.tar'):
        shards += 1
        self._index_tar(path, None if parquets else sidecars)
      elif files.isdir(path):
        shards += 1
        self._index_dir(path, None if parquets else sidecars)
    if not shards:
      raise ValueError(
          f'{folder}: not an img2dataset output folder: expected <shard>.tar '
          'files (output_format webdataset) or <shard>/ folders (files), '
          f'named by number; found {found[:10]}.')
    self._urls, self._failed = {}, {}
    for row in _parquet_rows(parquets) if parquets else sidecars.values():
      url, key, status = row.get('url'), row.get('key'), row.get('status')
      if url is None:
        continue
      if status not in (None, 'success'):
        error = row.get('error_message')
        self._failed[url] = f'img2dataset status {status!r}' + (
            f': {error}' if error else '')
      elif key not in self._images:
        self._failed[url] = f'its key {key!r} has no image in the folder'
      else:
        self._urls[url] = key
    logging.info('%s: %d images, %d URLs found, %d failed.', folder,
                 len(self._images), len(self._urls), len(self._failed))

  def __len__(self) -> int:
    return len(self._urls)

  def _index_tar(self, path, sidecars):
    """Images by key; with `sidecars`, reads the JSON members too."""
    try:
      for member, data in common.tar_members(path,
                                             read_data=sidecars is not None):
        key, extension = _split(member.name)
        if f'.{extension}'.endswith(common.IMAGE_EXTENSIONS):
          self._images[key] = (path, member.offset_data, member.size)
        elif extension == 'json' and sidecars is not None:
          _add_sidecar(sidecars, key, data, f'{path}:{member.name}')
    except common.BadInput as e:
      logging.warning('%s Its images after that are missing.', e)

  def _index_dir(self, path, sidecars):
    for name in tf.io.gfile.listdir(path):
      key, extension = _split(name)
      file = os.path.join(path, name)
      if f'.{extension}'.endswith(common.IMAGE_EXTENSIONS):
        self._images[key] = (file, None, None)
      elif extension == 'json' and sidecars is not None:
        _add_sidecar(sidecars, key, files.read_bytes(file), file)

  def read(self, url: str) -> tuple[str, bytes]:
    """(where, bytes) of a URL's image.

    Raises:
      BadInput: 'missing_image' when the folder has no image of the URL.
    """
    key = self._urls.get(url)
    if key is None:
      why = self._failed.get(url, 'not in its url -> key sidecars')
      raise common.BadInput('missing_image', f'Image URL {url} is not in the '
                            f'img2dataset folder {self.folder} ({why}).')
    path, offset, size = self._images[key]
    with tf.io.gfile.GFile(path, 'rb') as f:
      if offset is None:
        return path, f.read()
      try:
        f.seek(offset)
        return f'{path}:{key}', f.read(size)
      except tf.errors.OutOfRangeError:
        return f'{path}:{key}', b''  # Counted as a corrupt image.


def _split(name: str) -> tuple[str, str]:
  base = os.path.basename(name)
  key, _, extension = base.partition('.')
  return key, extension.lower()


def _add_sidecar(sidecars, key, data, where):
  try:
    row = json.loads(data)
  except (ValueError, UnicodeDecodeError):
    logging.warning('%s: not a JSON sidecar; ignored.', where)
    return
  if isinstance(row, dict):
    sidecars[key] = {**row, 'key': str(row.get('key', key))}


def _parquet_rows(paths):
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  for path in paths:
    with files.open_binary(path) as f:
      table = pq.ParquetFile(f)
      wanted = [c for c in ('url', 'key', 'status', 'error_message')
                if c in table.schema_arrow.names]
      if 'url' not in wanted or 'key' not in wanted:
        raise ValueError(f'{path}: expected an img2dataset sidecar with '
                         f'columns url and key; it has '
                         f'{table.schema_arrow.names}.')
      for batch in table.iter_batches(columns=wanted):
        for row in batch.to_pylist():
          row['key'] = str(row['key'])
          yield row


class ImageResolver:
  """Reads a record's image reference (see the module docstring)."""

  def __init__(self, img2dataset_dir: str | None, max_size: int | None):
    self.img2dataset_dir = img2dataset_dir
    self.max_size = max_size
    self._lock = threading.Lock()
    self._index = None

  def index(self) -> Img2DatasetIndex:
    with self._lock:  # Built once, not by every thread.
      if self._index is None:
        self._index = Img2DatasetIndex(self.img2dataset_dir)
      return self._index

  def load(self, reference: Any, base: str) -> bytes:
    """The checked image (`common.load_image`) of a reference.

    Raises:
      BadInput: 'missing_image' or 'corrupt_image'.
    """
    if isinstance(reference, Mapping):  # A `datasets` Image value.
      if reference.get('bytes'):
        reference = reference['bytes']
      elif reference.get('path'):
        reference = reference['path']
      else:
        raise common.BadInput('missing_image', 'An image value with neither '
                              'bytes nor path.')
    if isinstance(reference, (bytes, bytearray)):
      return common.load_image(bytes(reference), 'image bytes', self.max_size)
    reference = str(reference)
    if is_url(reference):
      if not self.img2dataset_dir:
        raise common.BadInput(
            'missing_image', f'Image URL {reference}: URLs are never '
            'fetched; download them with img2dataset and give its output '
            'folder as img2dataset_dir.')
      where, data = self.index().read(reference)
      return common.load_image(data, f'{where} ({reference})', self.max_size)
    return common.load_image_file(files.resolve(reference, base),
                                  self.max_size)
