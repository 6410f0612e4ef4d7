"""What every format builder shares: images, statistics, the base class.

A builder turns its source into *records* (one per would-be example, cheap:
paths and text) and each record into an example with `make_example`, which
raises `BadInput(reason, message)` for data that cannot be used. The base
class runs `make_example` on a thread pool (reading files and decoding
images and videos release the GIL), keeps the source order, and either
raises (`on_error='raise'`) or skips the record and counts it under
`reason` (`on_error='skip'`). A source may also yield a `BadInput` as a
record, for damage found while listing records (a truncated tar shard: see
`tar_members`); it is counted (or raised) the same way. The first skips of
every reason are logged one by one, naming their file and record; the
counts of every split are logged, stored in the prepared dataset's metadata
(`builder.info.metadata['statistics']`, i.e. `metadata.json` next to the
records) and returned by `formats.build`.

Images are checked and stored as 8-bit RGB (`load_image`); images of more
than 8 bits per sample (16-bit PNG and TIFF, 32-bit integer or float) are
scaled to 8 bits by their depth, never clipped (`images.to_rgb`).
"""

from collections.abc import Callable, Iterable, Iterator, Mapping
import collections
import concurrent.futures
import dataclasses
import io
import os
import tarfile
import time
from typing import Any, ClassVar
import zlib

from absl import logging
from etils import epath
from PIL import Image
import tensorflow as tf
import tensorflow_datasets as tfds

from flamingo_jax.data import images
from flamingo_jax.data.formats import files

VERSION = tfds.core.Version('1.0.0')
RELEASE_NOTES = {'1.0.0': 'First release of the local-format builders.'}
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.webp', '.bmp', '.gif', '.tif',
                    '.tiff')
ON_ERROR = ('skip', 'raise')
MAX_WORKERS = 16
PROGRESS_SECONDS = 10.0
LOGGED_SKIPS = 20  # Per reason and split; further skips are only counted.
# Formats stored as they are; other images are re-encoded (see load_image).
_KEPT_FORMATS = {'JPEG': 'jpeg', 'PNG': 'png'}
_PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


class BadInput(Exception):
  """A record that cannot become an example; `reason` is its counter name.

  `counts` are further counters to add (e.g. the images a skipped document
  had dropped before it was skipped).
  """

  def __init__(self, reason: str, message: str,
               counts: Mapping[str, int] | None = None):
    super().__init__(message)
    self.reason = reason
    self.counts = dict(counts or {})

  def __reduce__(self):  # Records travel between Beam workers.
    return BadInput, (self.reason, str(self), self.counts)


# --------------------------------------------------------------- images --


def encode_image(image: Image.Image, image_format: str) -> bytes:
  buffer = io.BytesIO()
  if image_format == 'jpeg':
    image.save(buffer, format='JPEG', quality=95)
  else:
    image.save(buffer, format='PNG')
  return buffer.getvalue()


def _is_16_bit_png(data: bytes) -> bool:
  """Whether a PNG's samples have 16 bits (PIL shows their RGB as 8-bit)."""
  return data.startswith(_PNG_SIGNATURE) and data[24:25] == b'\x10'


def load_image(data: bytes, where: str, max_size: int | None = None) -> bytes:
  """Checks that `data` is a decodable image; returns what to store.

  8-bit JPEG and PNG images in RGB are stored as they are. Others (grey,
  CMYK, transparent, 16-bit, WebP, GIF, ...) are converted to 8-bit RGB by
  `images.to_rgb` (transparency over white, deep pixels scaled by their bit depth)
  and stored as PNG; with `max_size`, an image whose longer side exceeds it
  is shrunk to it (aspect kept) and stored as JPEG (quality 95) or PNG, as
  its source was.

  Raises:
    BadInput: 'corrupt_image' when Pillow cannot decode all of it.
  """
  try:
    with Image.open(io.BytesIO(data)) as image:
      image.load()  # Decodes everything: truncated files fail here.
      kept = _KEPT_FORMATS.get(image.format)
      too_big = max_size is not None and max(image.size) > max_size
      if (kept and image.mode == 'RGB' and not too_big
          and not _is_16_bit_png(data)):
        return data
      rgb = images.to_rgb(image)
  except Exception as e:  # pylint: disable=broad-except  # PIL raises many.
    raise BadInput('corrupt_image', f'{where}: cannot decode the image '
                   f'({len(data)} bytes): {e}') from e
  if too_big:
    scale = max_size / max(rgb.size)
    size = tuple(max(1, round(side * scale)) for side in rgb.size)
    rgb = rgb.resize(size, Image.BICUBIC)
  return encode_image(rgb, 'jpeg' if too_big and kept == 'jpeg' else 'png')


def load_image_file(path: str, max_size: int | None = None) -> bytes:
  """load_image of a file; BadInput('missing_image') when it is absent."""
  try:
    data = files.read_bytes(path)
  except (tf.errors.NotFoundError, FileNotFoundError) as e:
    raise BadInput('missing_image', f'Image file {path} does not exist.') from e
  except tf.errors.UnimplementedError as e:  # A scheme TF cannot read.
    raise BadInput('missing_image', f'Image {path}: cannot read this kind of '
                   f'path ({e.message}).') from e
  return load_image(data, path, max_size)


# ----------------------------------------------------------------- tars --


class _EndMarkingTarInfo(tarfile.TarInfo):
  """Marks its TarFile `complete` when it reads the end-of-archive block.

  tarfile ends its iteration silently there, but also at a header that is
  absent, cut short or invalid, so a file cut on a 512-byte block boundary
  would read as a shorter, complete archive.
  """

  @classmethod
  def fromtarfile(cls, tar):
    try:
      return super().fromtarfile(tar)
    except tarfile.EOFHeaderError:  # An all-zero block: the archive's end.
      tar.complete = True
      raise


class TruncatedTar(BadInput):
  """BadInput('truncated_tar'); `cut_member`: the member whose data is cut.

  `cut_member` is None when that is not known: the shard breaks off
  between members (at a header cut, missing or invalid), or inside data
  that was skipped rather than read.
  """

  def __init__(self, message: str, cut_member: str | None):
    super().__init__('truncated_tar', message)
    self.cut_member = cut_member

  def __reduce__(self):
    return TruncatedTar, (str(self), self.cut_member)


def tar_members(path: str, *, read_data: bool
                ) -> Iterator[tuple[tarfile.TarInfo, bytes | None]]:
  """(member, its bytes if read_data) of the regular files of a tar shard.

  With read_data, the shard is streamed (compressed ones too); without, it
  must be an uncompressed tar, read by seeking past the members' data.

  Raises:
    TruncatedTar: after yielding the members before the break, when the
      shard ends inside a member or header, or without its end-of-archive
      block; the message names the shard and the member it breaks off at.
    BadInput: 'unreadable_tar' when not even a first member can be read
      (an empty or non-tar file).
  """
  last = reading = None
  try:
    with tf.io.gfile.GFile(path, 'rb') as f, tarfile.open(
        fileobj=f, mode='r|*' if read_data else 'r:',
        tarinfo=_EndMarkingTarInfo) as tar:
      for member in tar:
        last = member.name
        if member.isfile():
          reading = member.name if read_data else None
          data = tar.extractfile(member).read() if read_data else None
          reading = None
          yield member, data
      if getattr(tar, 'complete', False):
        return
      error = 'no end-of-archive block'
  except (tarfile.TarError, EOFError, zlib.error,
          tf.errors.OutOfRangeError) as e:  # GFile: a seek past the end.
    error = str(e) or type(e).__name__
  if last is None:
    raise BadInput('unreadable_tar', f'{path}: not a readable tar file '
                   f'({error}).')
  # Unread data may be what is cut, so only streaming knows "after".
  where = (f'inside member {reading!r}' if reading else
           f'after member {last!r}' if read_data else f'at member {last!r}')
  raise TruncatedTar(f'{path}: the tar file breaks off {where} ({error}).',
                     reading)


def caption_text(value: Any, where: str) -> str:
  """A stripped caption; BadInput('empty_caption') when there is none."""
  text = '' if value is None else str(value).strip()
  if not text:
    raise BadInput('empty_caption', f'{where}: empty caption.')
  return text


# ---------------------------------------------------------- the builder --


@dataclasses.dataclass(eq=False)
class FormatConfig(tfds.core.BuilderConfig):
  """Where the data is and how to read it: one prepared dataset per config.

  Attributes:
    source: the input: a path (a file, a directory or a glob; local or
      gs://) or, for the training formats, {split: path}.
    on_error: 'skip' (count unusable records, log and store the counts) or
      'raise' (stop at the first, naming its file).
    max_image_size: shrink stored images (and frames) whose longer side is
      larger; None keeps their size.
  """
  source: Any = None
  on_error: str = 'skip'
  max_image_size: int | None = None

  def __post_init__(self):
    if not self.source:
      raise ValueError('A source path is required.')
    if self.on_error not in ON_ERROR:
      raise ValueError(f'on_error must be one of {ON_ERROR}; got '
                       f'{self.on_error!r}.')

  def options(self) -> dict[str, Any]:
    """The fields that determine the data (stored in the metadata)."""
    base = {f.name for f in dataclasses.fields(tfds.core.BuilderConfig)}
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
            if f.name not in base}


class FormatBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Records -> examples, in parallel and in order, with statistics."""

  VERSION = VERSION
  RELEASE_NOTES = RELEASE_NOTES
  CONFIG_CLASS: ClassVar[type[FormatConfig]] = FormatConfig
  DESCRIPTION: ClassVar[str] = ''

  num_workers: int | None = None  # Threads; None: the CPUs, up to 16.
  beam: bool = False  # Build with Apache Beam (download_config's runner).
  log: Callable[[str], None] = staticmethod(logging.info)

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:  # TFDS' own needs importlib_resources.
    return epath.Path(__file__)

  def features(self) -> dict[str, Any]:
    """The feature specs besides 'id' (int64) and 'source' (text)."""
    raise NotImplementedError

  def split_records(self) -> Mapping[str, Iterable[Any]]:
    """{split: records}; records are cheap (paths, text), made lazily.

    A record may be a BadInput (damage found while listing, e.g. a
    truncated shard): it is counted, or raised, like make_example's.
    Default: `source_records` of each of `split_sources`.
    """
    return {split: self.source_records(source)
            for split, source in self.split_sources().items()}

  def source_files(self, source: str) -> list[str] | None:
    """The files of a training source, which a distributed build reads in
    parallel; None: a split is read as one part (the evaluation sets)."""
    del source
    return None

  def source_records(self, source: str) -> Iterable[Any]:
    """The records of a source, or of one of its `source_files`."""
    raise NotImplementedError

  def split_units(self) -> dict[str, list[Any]]:
    """{split: parts read in parallel}: files, or [None] (the whole split)."""
    if type(self).source_files is FormatBuilder.source_files:
      return {split: [None] for split in self.split_records()}
    return {split: self.source_files(source)
            for split, source in self.split_sources().items()}

  def unit_records(self, split: str, unit: Any) -> Iterable[Any]:
    """The records of one of `split_units`, in order."""
    if unit is None:
      return self.split_records()[split]
    return self.source_records(unit)

  def make_example(self, record: Any) -> tuple[str, dict[str, Any]]:
    """(unique source key, example) or raises BadInput.

    The example may set 'id' (default: the record's position) and
    '_counts' ({counter: n} added to the split's statistics).
    """
    raise NotImplementedError

  def metadata(self) -> dict[str, Any]:
    """Further metadata to store with the dataset."""
    return {}

  def split_sources(self) -> dict[str, str]:
    """{split: path} of a training format: a plain source is 'train'."""
    source = self.builder_config.source
    if isinstance(source, Mapping):
      return {str(split): str(path) for split, path in source.items()}
    return {'train': str(source)}

  def _info(self) -> tfds.core.DatasetInfo:
    config = self.builder_config
    return tfds.core.DatasetInfo(
        builder=self,
        description=f'{self.DESCRIPTION} Read from {config.source} by '
                    'flamingo_jax.data.formats.',
        features=tfds.features.FeaturesDict(
            {**self.features(), 'id': tf.int64,
             'source': tfds.features.Text()}),
        metadata=tfds.core.MetadataDict(
            format=self.name, options=jsonable(config.options()),
            statistics={}, **self.metadata()),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything is local (or on gs://).
    if self.beam:  # pylint: disable=g-import-not-at-top
      from flamingo_jax.data.formats import distributed
      return {split: distributed.examples(self, split, units)
              for split, units in self.split_units().items()}
    return {split: self._generate_examples(split, records)
            for split, records in self.split_records().items()}

  def _process_pipeline_result(self, pipeline_result):
    from flamingo_jax.data.formats import distributed  # pylint: disable=g-import-not-at-top
    for split, counts in distributed.statistics(pipeline_result).items():
      self.log(f'{self.name}/{self.builder_config.name} {split} (Beam): ' +
               ', '.join(f'{k} {v}' for k, v in sorted(counts.items())))
      if not counts.get('examples'):
        raise ValueError(f'Split {split!r} of {self.name} from '
                         f'{self.builder_config.source} has no usable '
                         f'example (statistics: {counts}).')
      self.info.metadata['statistics'][split] = counts

  def _generate_examples(self, split: str, records: Iterable[Any]):
    counts = collections.Counter()
    start = last_log = time.perf_counter()
    workers = self.num_workers or min(MAX_WORKERS, os.cpu_count() or 1)
    for index, (_, result) in enumerate(
        ordered_map(self._make_example, records, workers)):
      try:
        key, example = result.result()
      except BadInput as e:
        if self.builder_config.on_error == 'raise':
          raise ValueError(f'{e} (on_error="raise"; pass on_error="skip" '
                           'to skip and count such records).') from e
        counts[f'skipped/{e.reason}'] += 1
        counts.update(e.counts)
        self._log_skip(e, counts[f'skipped/{e.reason}'])
        continue
      counts['examples'] += 1
      counts.update(example.pop('_counts', None) or {})
      yield key, {**example, 'id': example.get('id', index), 'source': key}
      if time.perf_counter() - last_log > PROGRESS_SECONDS:
        last_log = time.perf_counter()
        self._log_progress(split, counts, last_log - start)
    self._log_progress(split, counts, time.perf_counter() - start)
    if not counts['examples']:
      raise ValueError(f'Split {split!r} of {self.name} from '
                       f'{self.builder_config.source} has no usable example '
                       f'(statistics: {dict(counts)}).')
    self.info.metadata['statistics'][split] = dict(counts)

  def _make_example(self, record):
    if isinstance(record, BadInput):  # Damage the source found itself.
      raise record
    return self.make_example(record)

  def example_or_skip(self, index: int, record: Any
                      ) -> tuple[str | None, dict[str, Any] | None,
                                 dict[str, int]]:
    """(key, example, counts) of a record, or (None, None, counts) when it
    is skipped (on_error='skip'); the counts are the statistics it adds."""
    try:
      key, example = self._make_example(record)
    except BadInput as e:
      if self.builder_config.on_error == 'raise':
        raise ValueError(f'{e} (on_error="raise"; pass on_error="skip" '
                         'to skip and count such records).') from e
      logging.warning('Skipping (%s): %s', e.reason, e)
      return None, None, {f'skipped/{e.reason}': 1, **e.counts}
    counts = {'examples': 1, **(example.pop('_counts', None) or {})}
    return key, {**example, 'id': example.get('id', index),
                 'source': key}, counts

  def _log_skip(self, error: BadInput, count: int):
    if count <= LOGGED_SKIPS:
      logging.warning('Skipping (%s): %s', error.reason, error)
    if count == LOGGED_SKIPS:
      logging.warning('Further %r skips are counted, not logged.',
                      error.reason)

  def _log_progress(self, split, counts, seconds):
    others = ''.join(f', {k} {v}' for k, v in sorted(counts.items())
                     if k != 'examples')
    self.log(f'{self.name}/{self.builder_config.name} {split}: '
             f'{counts["examples"]} examples{others} ({seconds:.0f} s)')


def ordered_map(fn: Callable[[Any], Any], items: Iterable[Any], workers: int
                ) -> Iterator[tuple[Any, concurrent.futures.Future]]:
  """(item, future of fn(item)) in the order of `items`, `workers` at a time."""
  with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
    pending = collections.deque()
    for item in items:
      pending.append((item, pool.submit(fn, item)))
      if len(pending) >= 4 * workers:
        yield pending.popleft()
    while pending:
      yield pending.popleft()


def jsonable(value: Any) -> Any:
  """Options as JSON values (tuples -> lists, mappings -> dicts)."""
  if isinstance(value, Mapping):
    return {str(k): jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [jsonable(v) for v in value]
  return value
