"""Interleaved image-text documents (M3W-like): `interleaved_jsonl`.

One document per row of JSONL (.jsonl, .gz, MMC4's .jsonl.zip), Parquet
(OBELICS as distributed) or a Hugging Face `datasets` save_to_disk folder,
chosen by extension (see `tables`), in either of two shapes:

  OBELICS-like (the documented one): aligned lists, each position holding
  exactly one of a text and an image reference:
    {"texts": ["Pets!", null, "My dog."], "images": [null, "dog.jpg", null]}
  MMC4: sentences, and images placed before the sentence they match:
    {"text_list": ["Pets!", "My dog."],
     "image_info": [{"image_name": "dog.jpg", "matched_text_index": 1}]}

Other fields (url, metadata, similarity scores, ...) are ignored. Image
references are looked up, in order, (1) as member names (full, then the
base name) of the tar shards given by `image_shards` (a glob), or else of
the uncompressed tar next to the table with its stem (`docs-0001.jsonl` ->
`docs-0001.tar`) if there is one; (2) as files, relative to `image_dir`
(default: the table's directory) unless absolute or gs://; (3) URLs
(OBELICS' images; MMC4's `raw_url` when its `image_name` is not found) in
the img2dataset output folder `img2dataset_dir`: never fetched (see
`img2dataset`). Images may also be bytes or `datasets` Image values.

The example has the embedded world's document features: `images` (encoded
as they were, see `common.load_image`) and `chunks` [{'text', 'image'}]
with image = -1 for text, text = '' for an image. Consecutive texts are
joined with `text_separator`, stripped, and a text after an image starts
with one space (as the world's documents do).

Missing and bad images: by default (on_bad_image='drop_image') a
document keeps its text and the images that were found, up to
`max_images` (the first ones); each image left out is counted as
'dropped_image/<reason>' (missing_image, corrupt_image, too_many_images).
Strict (on_bad_image='skip_document'): the document is skipped at its
first missing or corrupt image, or when it refers to more than
`max_images` images.

Bad input (counted under 'skipped/<reason>' with on_error='skip', the
default; an error naming file:line with 'raise'):
  too_many_images  (strict) more than `max_images` image references;
  too_few_images   fewer than `min_images` (default 1) usable images;
  no_text          no non-blank text;
  missing_image, corrupt_image  (strict) an image that is absent (a URL
                   not in img2dataset_dir counts so) or cannot be decoded.
An image shard cut short (inside a member, or without its end-of-archive
blocks) is logged by shard and member; its lost images count as
missing_image. A row that is not JSON or fits neither shape is always an
error naming file:line: it means a wrong file or schema, not a dirty record.
"""

import collections
import dataclasses
import functools
import os
import posixpath
import re
import threading
from typing import Any

from absl import logging
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from flamingo_jax.data.formats import common
from flamingo_jax.data.formats import files
from flamingo_jax.data.formats import img2dataset
from flamingo_jax.data.formats import tables

ON_BAD_IMAGE = ('drop_image', 'skip_document')


@dataclasses.dataclass(eq=False)
class DocumentsConfig(common.FormatConfig):
  """Interleaved document options (see the module docstring).

  Attributes:
    image_dir: base of relative image paths; None: each table's directory.
    image_shards: glob of uncompressed tar shards holding the images.
    img2dataset_dir: img2dataset's output folder, for image URLs.
    max_images: images kept per document (strict: more skip it).
    min_images: documents with fewer usable images are skipped.
    on_bad_image: 'drop_image' (keep the document and its found images) or
      'skip_document' (strict).
    text_separator: joins consecutive texts.
  """
  image_dir: str | None = None
  image_shards: str | None = None
  img2dataset_dir: str | None = None
  max_images: int = 32
  min_images: int = 1
  on_bad_image: str = 'drop_image'
  text_separator: str = ' '

  def __post_init__(self):
    super().__post_init__()
    if self.on_bad_image not in ON_BAD_IMAGE:
      raise ValueError(f'on_bad_image must be one of {ON_BAD_IMAGE}; got '
                       f'{self.on_bad_image!r}.')
    if not 0 <= self.min_images <= self.max_images:
      raise ValueError(f'Need 0 <= min_images <= max_images; got '
                       f'{self.min_images} and {self.max_images}.')


def parse_document(row: dict[str, Any], where: str) -> list[tuple[str, str]]:
  """A JSONL record -> [('text', str) | ('image', reference)] in order."""
  if 'texts' in row or 'images' in row:
    texts = files.field(row, 'texts', where)
    images = files.field(row, 'images', where)
    if (not isinstance(texts, list) or not isinstance(images, list)
        or len(texts) != len(images)):
      raise ValueError(f'{where}: "texts" and "images" must be lists of the '
                       f'same length; got {_length(texts)} and '
                       f'{_length(images)}.')
    items = []
    for position, (text, image) in enumerate(zip(texts, images)):
      if (text is None) == (image is None):
        raise ValueError(f'{where}: position {position} must hold exactly '
                         f'one of a text and an image; got text={text!r}, '
                         f'image={image!r}.')
      items.append(('text', str(text)) if image is None
                   else ('image', _reference(image)))
    return items
  if 'text_list' in row:
    texts = files.field(row, 'text_list', where)
    before = collections.defaultdict(list)
    for info in row.get('image_info') or []:
      name = files.field(info, 'image_name', where)
      index = files.field(info, 'matched_text_index', where)
      if not isinstance(index, int) or not 0 <= index < len(texts):
        raise ValueError(f'{where}: matched_text_index {index!r} of '
                         f'{name!r} is not an index of the {len(texts)} '
                         'texts.')
      url = info.get('raw_url')
      before[index].append((str(name), str(url)) if url else str(name))
    items = []
    for index, text in enumerate(texts):
      items.extend(('image', name) for name in before[index])
      items.append(('text', str(text)))
    return items
  raise ValueError(f'{where}: expected "texts" and "images" (OBELICS-like) '
                   f'or "text_list" and "image_info" (MMC4); the record has '
                   f'{sorted(row)}.')


def _reference(image: Any) -> Any:
  """A path or URL as str; bytes and `datasets` Image dicts as they are."""
  return image if isinstance(image, (bytes, dict)) else str(image)


def _length(value: Any) -> Any:
  return len(value) if isinstance(value, list) else type(value).__name__


class TarIndex:
  """Member name (and base name) -> where its bytes are, in tar shards."""

  def __init__(self, paths: list[str]):
    self._members = {}
    for path in paths:
      found = 0
      try:
        for member, _ in common.tar_members(path, read_data=False):
          entry = (path, member.offset_data, member.size)
          self._members[member.name] = entry
          self._members.setdefault(posixpath.basename(member.name), entry)
          found += 1
      except common.BadInput as e:
        if not found:
          raise ValueError(f'{path}: not an uncompressed tar file ({e}); '
                           'image shards must be plain .tar.') from e
        # The documents of its lost images count as missing_image (or
        # corrupt_image for the one cut short).
        logging.warning('%s Its images after that are missing.', e)

  def read(self, reference: str) -> tuple[str, bytes] | None:
    """(tar:member, bytes), or None when no shard has the reference."""
    entry = (self._members.get(reference)
             or self._members.get(posixpath.basename(reference)))
    if entry is None:
      return None
    path, offset, size = entry
    with tf.io.gfile.GFile(path, 'rb') as f:
      try:
        f.seek(offset)
        data = f.read(size)
      except tf.errors.OutOfRangeError:  # A shard cut before the member.
        data = b''
    return f'{path}:{reference}', data


class InterleavedJsonl(common.FormatBuilder):
  """Interleaved documents from OBELICS-like or MMC4 tables."""

  name = 'interleaved_jsonl'
  CONFIG_CLASS = DocumentsConfig
  DESCRIPTION = 'Interleaved image-text documents (M3W-like).'

  def __init__(self, **kwargs):
    super().__init__(**kwargs)
    self._lock = threading.Lock()
    self._shards = None
    self._resolver = img2dataset.ImageResolver(
        self.builder_config.img2dataset_dir,
        self.builder_config.max_image_size)

  def features(self):
    return {
        'images': tfds.features.Sequence(
            tfds.features.Image(shape=(None, None, 3))),
        'chunks': tfds.features.Sequence({'text': tfds.features.Text(),
                                          'image': np.int32}),
    }

  def source_files(self, source):
    return tables.list_tables(source)

  def source_records(self, source):
    for path in tables.list_tables(source):
      for row_key, row in tables.read_rows(path):
        yield path, row_key, parse_document(row, f'{path}:{row_key}')

  def _index(self, table_path: str) -> TarIndex | None:
    shards = self.builder_config.image_shards
    if shards:
      with self._lock:
        if self._shards is None:
          self._shards = TarIndex(files.list_files(shards, ('.tar',)))
      return self._shards
    tar = _STEM.sub('.tar', table_path)
    if tar == table_path or not files.exists(tar):
      return None
    with self._lock:  # Each shard is indexed once, not by every thread.
      return _stem_index(tar)

  def _image(self, reference: Any, table_path: str) -> bytes:
    """The image of a reference, or of the first of its alternatives found."""
    alternatives = reference if isinstance(reference, tuple) else (reference,)
    first_error = None
    for candidate in alternatives:
      if img2dataset.is_url(candidate) and first_error is not None and (
          not self.builder_config.img2dataset_dir):
        continue  # MMC4's raw_url, with no folder to find it in.
      try:
        return self._one_image(candidate, table_path)
      except common.BadInput as e:
        if e.reason != 'missing_image':
          raise
        first_error = first_error or e
    raise first_error

  def _one_image(self, reference: Any, table_path: str) -> bytes:
    config = self.builder_config
    if isinstance(reference, str) and not img2dataset.is_url(reference):
      index = self._index(table_path)
      found = index.read(reference) if index else None
      if found is not None:
        return common.load_image(found[1], found[0], config.max_image_size)
    return self._resolver.load(
        reference, config.image_dir or os.path.dirname(table_path))

  def make_example(self, record):
    path, row_key, items = record
    config, where = self.builder_config, f'{path}:{row_key}'
    strict = config.on_bad_image == 'skip_document'
    num_images = sum(kind == 'image' for kind, _ in items)
    if strict and num_images > config.max_images:
      raise common.BadInput(
          'too_many_images', f'{where}: {num_images} images, more than '
          f'max_images={config.max_images}.')
    images, chunks, pending, counts = [], [], [], collections.Counter()

    def flush():
      if pending:
        text = config.text_separator.join(pending)
        chunks.append({'text': ' ' + text if chunks else text, 'image': -1})
        pending.clear()

    for kind, value in items:
      if kind == 'text':
        if value.strip():
          pending.append(value.strip())
        continue
      if len(images) == config.max_images:
        counts['dropped_image/too_many_images'] += 1
        continue
      try:
        image = self._image(value, path)
      except common.BadInput as e:
        if strict:
          raise common.BadInput(e.reason, f'{where}: {e}') from e
        counts[f'dropped_image/{e.reason}'] += 1
        continue
      flush()
      chunks.append({'text': '', 'image': len(images)})
      images.append(image)
    flush()
    if len(images) < config.min_images:
      raise common.BadInput(
          'too_few_images', f'{where}: {len(images)} usable images, fewer '
          f'than min_images={config.min_images}.', counts)
    if not any(c['image'] < 0 for c in chunks):
      raise common.BadInput('no_text', f'{where}: no text.', counts)
    return where, {'images': images, 'chunks': chunks, '_counts': counts}


# A table's extension, for the image tar next to it with its stem.
_STEM = re.compile(r'(\.jsonl(\.gz|\.zip)?|\.parquet|\.[ct]sv(\.gz)?)$')


@functools.lru_cache(maxsize=4)
def _stem_index(tar_path: str) -> TarIndex:
  return TarIndex([tar_path])
