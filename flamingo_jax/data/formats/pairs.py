"""Image-text pairs (ALIGN/LTIP-like): `webdataset_pairs` and `table_pairs`.

`webdataset_pairs`: WebDataset tar shards (a directory of .tar, a glob, or
a brace range 'gs://b/laion-{00000..00099}.tar'), as img2dataset writes
them: consecutive members sharing a key (the member path up to the first
dot of its base name) form a sample, e.g.
  000017.jpg  000017.txt  000017.json
The image is the member with an image extension (.jpg, .jpeg, .png, .webp,
...); the caption is the .txt member, else the `caption_field` of the .json
member.

`table_pairs`: tables, one pair a row (CSV, TSV, JSONL, .jsonl.zip,
Parquet or a `datasets` save_to_disk folder, chosen by extension: see
`tables`), with columns `image_key` and `caption_key`:
  image,caption                        {"image": "a.jpg", "caption": "..."}
  images/a.jpg,A dog on a beach.
The image is a path (relative to `image_dir`, default the table's
directory), bytes, a `datasets` Image value, or a URL found in the
img2dataset output folder `img2dataset_dir` (URLs are never fetched: see
`img2dataset`). LAION's metadata: image_key='URL', caption_key='TEXT'.
CC3M's TSV has no header: columns=['caption', 'url'], image_key='url'.

The example has the world's pair features: `image` (encoded as it was, see
`common.load_image`) and `caption` (stripped).

Bad input (skipped and counted with on_error='skip', the default; an error
naming the shard:key or file:line with 'raise'):
  empty_caption    blank or absent;
  missing_image    no image member, no such file, or a URL not downloaded;
  corrupt_image    an image Pillow cannot decode (16-bit images are scaled
                   to 8 bits, see `data.images.to_rgb`);
  bad_json         a .json member that is not a UTF-8 JSON object;
  bad_text         a .txt member that is not UTF-8;
  truncated_tar    a shard that ends inside a member or header, or without
                   its end-of-archive blocks (a download cut on a 512-byte
                   boundary): counted once, naming the shard and member; its
                   samples before the break are read, the one it breaks in
                   and anything after it are lost;
  unreadable_tar   an empty or non-tar shard.
A table without the configured columns, or a line that is not JSON, is an
error naming file:line.
"""

import dataclasses
import json
import os
import posixpath

import tensorflow_datasets as tfds

from flamingo_jax.data.formats import common
from flamingo_jax.data.formats import files
from flamingo_jax.data.formats import img2dataset
from flamingo_jax.data.formats import tables


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
  """(key, {extension: bytes}) of a tar shard, streamed in member order.

  Raises:
    BadInput: see `common.tar_members`. A truncated shard raises after the
      samples before the break; the sample it breaks in (which may miss
      members) is not yielded.
  """
  key, sample, count = None, {}, 0
  try:
    for member, data in common.tar_members(path, read_data=True):
      member_key, extension = split_key(member.name)
      if member_key != key:
        if sample:
          yield key, sample
          count += 1
        key, sample = member_key, {}
      sample[extension] = data
  except common.TruncatedTar as e:
    cut_key = e.cut_member and split_key(e.cut_member)[0]
    if cut_key is not None and cut_key != key:
      if sample:  # Complete: the member cut short begins the next sample.
        yield key, sample
        count += 1
      key = cut_key
    raise common.BadInput(e.reason, f'{e} Kept the {count} sample(s) '
                          f'before it; skipped sample {key!r} (it may miss '
                          'members) and anything after it.') from e
  if sample:
    yield key, sample


class WebDatasetPairs(common.FormatBuilder):
  """Image-text pairs from WebDataset tar shards."""

  name = 'webdataset_pairs'
  CONFIG_CLASS = WebDatasetConfig
  DESCRIPTION = 'Image-text pairs from WebDataset shards.'

  def features(self):
    return _pair_features()

  def source_files(self, source):
    return files.list_files(source, ('.tar',))

  def source_records(self, source):
    for path in files.list_files(source, ('.tar',)):
      kind = None if path.endswith('.tar') else tables.sniff(path)
      if kind:
        raise ValueError(f'{path}: expected WebDataset .tar shards, but the '
                         f'file is {kind}; a table of URLs and captions is '
                         '--format table_pairs (with img2dataset_dir).')
      try:
        for key, sample in read_samples(path):
          yield f'{path}:{key}', sample
      except common.BadInput as e:
        yield e  # Counted by the base class; the next shard is read.

  def make_example(self, record):
    where, sample = record
    images = [ext for ext in sample
              if f'.{ext}'.endswith(common.IMAGE_EXTENSIONS)]
    if not images:
      raise common.BadInput('missing_image', f'{where}: no image member '
                            f'(members: {sorted(sample)}).')
    if 'txt' in sample:
      try:
        caption = sample['txt'].decode('utf-8')
      except UnicodeDecodeError as e:
        raise common.BadInput('bad_text', f'{where}.txt: not UTF-8 text '
                              f'({e}).') from e
    elif 'json' in sample:
      try:
        caption = json.loads(sample['json']).get(
            self.builder_config.caption_field)
      except (ValueError, AttributeError) as e:  # Not JSON, UTF-8, a dict.
        raise common.BadInput('bad_json', f'{where}.json: not a JSON '
                              f'object ({e}).') from e
    else:
      caption = None
    caption = common.caption_text(caption, where)
    image = common.load_image(sample[images[0]], f'{where}.{images[0]}',
                              self.builder_config.max_image_size)
    return where, {'image': image, 'caption': caption}


# -------------------------------------------------------------- table --


@dataclasses.dataclass(eq=False)
class TableConfig(common.FormatConfig):
  """Table options.

  Attributes:
    image_dir: base of relative image paths; None: the table's directory.
    image_key: the column (or JSON key) of the image.
    caption_key: the column (or JSON key) of the caption.
    columns: the column names of a CSV/TSV without a header row.
    img2dataset_dir: img2dataset's output folder, for image URLs.
  """
  image_dir: str | None = None
  image_key: str = 'image'
  caption_key: str = 'caption'
  columns: list[str] | None = None
  img2dataset_dir: str | None = None


def table_records(source: str, keys: tuple[str, ...], base: str | None,
                  columns: list[str] | None = None):
  """(file:row, {key: value}, base directory) of every row of the tables."""
  for path in tables.list_tables(source):
    for row_key, row in tables.read_rows(path, columns):
      where = f'{path}:{row_key}'
      yield where, {key: files.field(row, key, where) for key in keys}, (
          base or os.path.dirname(path))


class TablePairs(common.FormatBuilder):
  """Image-text pairs from tables and image files (or img2dataset)."""

  name = 'table_pairs'
  CONFIG_CLASS = TableConfig
  DESCRIPTION = 'Image-text pairs from tables and image files.'

  def __init__(self, **kwargs):
    super().__init__(**kwargs)
    self._resolver = img2dataset.ImageResolver(
        self.builder_config.img2dataset_dir,
        self.builder_config.max_image_size)

  def features(self):
    return _pair_features()

  def source_files(self, source):
    return tables.list_tables(source)

  def source_records(self, source):
    config = self.builder_config
    return table_records(source, (config.image_key, config.caption_key),
                         config.image_dir, config.columns)

  def make_example(self, record):
    where, row, base = record
    config = self.builder_config
    caption = common.caption_text(row[config.caption_key], where)
    try:
      image = self._resolver.load(row[config.image_key], base)
    except common.BadInput as e:
      raise common.BadInput(e.reason, f'{where}: {e}') from e
    return where, {'image': image, 'caption': caption}
