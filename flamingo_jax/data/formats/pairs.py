"""Image-text pairs (ALIGN/LTIP-like): `webdataset_pairs` and `table_pairs`.

`webdataset_pairs`: WebDataset tar shards (a directory of .tar, a glob, or
a brace range 'gs://b/laion-{00000..00099}.tar'), as img2dataset writes
them: consecutive members sharing a key (the member path up to the first
dot of its base name) form a sample, e.g.
  000017.jpg  000017.txt  000017.json
The image is the member with an image extension (.jpg, .jpeg, .png, .webp,
...); the caption is the .txt member, else the `caption_field` of the .json
member.

`table_pairs`: CSV (with a header) or JSONL (.gz) files, one pair a row,
with columns `image_key` (a path, relative to `image_dir`, default the
table's directory) and `caption_key`:
  image,caption                        {"image": "a.jpg", "caption": "..."}
  images/a.jpg,A dog on a beach.

The example has the world's pair features: `image` (encoded as it was, see
`common.load_image`) and `caption` (stripped).

Bad input (skipped and counted with on_error='skip', the default; an error
naming the shard:key or file:line with 'raise'): empty_caption (blank or
absent), missing_image (no image member, or no such file), corrupt_image.
A table without the configured columns, or a line that is not JSON, is an
error naming file:line.
"""

import dataclasses
import json
import os
import posixpath
import tarfile

import tensorflow as tf
import tensorflow_datasets as tfds

from flamingo_jax.data.formats import common
from flamingo_jax.data.formats import files

TABLE_EXTENSIONS = ('.csv', '.csv.gz', '.jsonl', '.jsonl.gz')


def _pair_features():
  return {'image': tfds.features.Image(shape=(None, None, 3)),
          'caption': tfds.features.Text()}


# --------------------------------------------------------- webdataset --


@dataclasses.dataclass(eq=False)
class WebDatasetConfig(common.FormatConfig):
  """WebDataset options.

  Attributes:
    caption_field: the caption's key in a sample's .json member, used when
      the sample has no .txt member.
  """
  caption_field: str = 'caption'


def split_key(name: str) -> tuple[str, str]:
  """WebDataset's rule: 'dir/000017.seg.png' -> ('dir/000017', 'seg.png')."""
  directory, base = posixpath.split(name)
  stem, _, extension = base.partition('.')
  return posixpath.join(directory, stem), extension.lower()


def read_samples(path: str):
  """(key, {extension: bytes}) of a tar shard, streamed in member order."""
  with tf.io.gfile.GFile(path, 'rb') as f:
    with tarfile.open(fileobj=f, mode='r|*') as tar:
      key, sample = None, {}
      for member in tar:
        if not member.isfile():
          continue
        member_key, extension = split_key(member.name)
        if member_key != key:
          if sample:
            yield key, sample
          key, sample = member_key, {}
        sample[extension] = tar.extractfile(member).read()
      if sample:
        yield key, sample


class WebDatasetPairs(common.FormatBuilder):
  """Image-text pairs from WebDataset tar shards."""

  name = 'webdataset_pairs'
  CONFIG_CLASS = WebDatasetConfig
  DESCRIPTION = 'Image-text pairs from WebDataset shards.'

  def features(self):
    return _pair_features()

  def split_records(self):
    return {split: self._records(source)
            for split, source in self.split_sources().items()}

  def _records(self, source):
    for path in files.list_files(source, ('.tar',)):
      for key, sample in read_samples(path):
        yield f'{path}:{key}', sample

  def make_example(self, record):
    where, sample = record
    images = [ext for ext in sample
              if f'.{ext}'.endswith(common.IMAGE_EXTENSIONS)]
    if not images:
      raise common.BadInput('missing_image', f'{where}: no image member '
                            f'(members: {sorted(sample)}).')
    if 'txt' in sample:
      caption = sample['txt'].decode('utf-8')
    elif 'json' in sample:
      try:
        caption = json.loads(sample['json']).get(
            self.builder_config.caption_field)
      except (json.JSONDecodeError, AttributeError) as e:
        raise ValueError(f'{where}.json: not a JSON object ({e}).') from e
    else:
      caption = None
    caption = common.caption_text(caption, where)
    image = common.load_image(sample[images[0]], f'{where}.{images[0]}',
                              self.builder_config.max_image_size)
    return where, {'image': image, 'caption': caption}


# -------------------------------------------------------------- table --


@dataclasses.dataclass(eq=False)
class TableConfig(common.FormatConfig):
  """CSV/JSONL options.

  Attributes:
    image_dir: base of relative image paths; None: the table's directory.
    image_key: the column (or JSON key) of the image path.
    caption_key: the column (or JSON key) of the caption.
  """
  image_dir: str | None = None
  image_key: str = 'image'
  caption_key: str = 'caption'


def table_records(source: str, keys: tuple[str, ...], base: str | None):
  """(file:line, {key: value}, base directory) of every row of the tables."""
  for path in files.list_files(source, TABLE_EXTENSIONS):
    for line, row in files.read_table(path):
      where = f'{path}:{line}'
      yield where, {key: files.field(row, key, where) for key in keys}, (
          base or os.path.dirname(path))


class TablePairs(common.FormatBuilder):
  """Image-text pairs from CSV/JSONL tables and an image folder."""

  name = 'table_pairs'
  CONFIG_CLASS = TableConfig
  DESCRIPTION = 'Image-text pairs from CSV/JSONL and image files.'

  def features(self):
    return _pair_features()

  def split_records(self):
    config = self.builder_config
    keys = (config.image_key, config.caption_key)
    return {split: table_records(source, keys, config.image_dir)
            for split, source in self.split_sources().items()}

  def make_example(self, record):
    where, row, base = record
    config = self.builder_config
    caption = common.caption_text(row[config.caption_key], where)
    path = files.resolve(str(row[config.image_key]), base)
    try:
      image = common.load_image_file(path, config.max_image_size)
    except common.BadInput as e:
      raise common.BadInput(e.reason, f'{where}: {e}') from e
    return where, {'image': image, 'caption': caption}
