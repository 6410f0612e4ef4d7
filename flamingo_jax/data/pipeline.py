"""Input pipeline: datasets -> fixed-shape batches, deterministic and resumable.

Every dataset of the mixture is read by random access (a tensorflow-datasets
ArrayRecord data source), so that the example in row r of step s is a pure
function of (seed, dataset, s, r):

  global position g = s * B + r                     (B: global batch size)
  example index      = permutation_e(g mod n)       (e = g // n: the epoch;
                       held in memory up to MAX_SHUFFLE_IN_MEMORY examples,
                       computed per index beyond: index_shuffle.py)
  randomness         = default_rng([seed, dataset, g])  (p_next, space; crop
                       and flip, and a document's random window, when on,
                       from streams of their own)

Resuming at step s therefore only needs s (saved with the checkpoint), and
each process reads just its own rows [p * B/P, (p+1) * B/P) of every step.
Per process, a thread pool loads and preprocesses the rows of the next
steps ahead of time (decoding and resizing release the GIL) and assembles
them in order. (No tf.data here: its py-function threads deadlock against
the main thread at interpreter exit.)

Examples that cannot be used (an empty caption, a corrupt image, ...) become
all-padding rows with a zero loss mask and are counted per reason in
`TrainData.stats()`, which the training loop logs: never silently dropped,
never half-written.

Batch (per dataset, numpy, this process's rows):
  tokens, targets int32 [B, L]; loss_mask float32 [B, L];
  media uint8 [B, N, T, H, W, 3]; media_mask bool [B, N];
  media_index int32 [B, L].
"""

from collections.abc import Callable, Mapping, Sequence
import collections
import concurrent.futures
import functools
import io
import threading
from typing import Any, Optional

from absl import logging
import jax
import ml_collections
import numpy as np
from PIL import Image

from flamingo_jax.data import augment as augment_lib
from flamingo_jax.data import formatting
from flamingo_jax.data import images
from flamingo_jax.data import index_shuffle
from flamingo_jax.data import tokenizer as tokenizer_lib

BATCH_KEYS = ('tokens', 'targets', 'loss_mask', 'media', 'media_mask',
              'media_index')
CORRUPT_MEDIA = 'corrupt_media'
# Above this many examples an epoch's order is not held in memory (8 bytes
# an example per host) but computed per index (`index_shuffle.py`).
MAX_SHUFFLE_IN_MEMORY = 1 << 24


class MediaError(ValueError):
  """A medium that cannot be decoded or has the wrong shape."""


def decode_image(image: Any) -> np.ndarray:  # -> [h, w, 3] uint8
  """Encoded bytes (PNG/JPEG) or an array -> RGB uint8."""
  if isinstance(image, (bytes, np.bytes_)):
    try:
      with Image.open(io.BytesIO(bytes(image))) as pil:
        array = np.asarray(images.to_rgb(pil))
    except Exception as e:  # pylint: disable=broad-except  # PIL raises many.
      raise MediaError(f'Cannot decode image ({len(image)} bytes): {e}') from e
  else:
    array = np.asarray(image)
  if array.ndim != 3 or array.shape[-1] != 3 or array.dtype != np.uint8:
    raise MediaError(f'Images must be uint8 [h, w, 3]; got {array.dtype} '
                     f'{array.shape}.')
  return array


def fit_image(image: np.ndarray, size: int) -> np.ndarray:  # -> [size, size, 3]
  """Resizes keeping the aspect ratio (longer side = size), zero-pads."""
  height, width = image.shape[:2]
  scale = size / max(height, width)
  new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
  if (new_h, new_w) != (height, width):
    pil = Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR)
    image = np.asarray(pil)
  out = np.zeros([size, size, 3], np.uint8)
  out[:new_h, :new_w] = image
  return out


def media_array(medium: Any, frames: int, size: int,
                augment: Optional[augment_lib.Augment] = None,
                clip_rng: Optional[np.random.Generator] = None
                ) -> np.ndarray:
  """An image or a video (sequence of frames) -> [frames, size, size, 3].

  An image fills frame 0 (T=1 is the image case); a video must have at least
  `frames` frames, of which evenly spaced ones are taken, or with
  `clip_rng`, `frames` consecutive ones from a random start (a video stored
  at 1 FPS gives the paper's clips: 8 frames at 1 FPS from a random start).
  `augment` (see `augment.py`) transforms every decoded frame before it is
  fitted.
  """
  augment = augment or (lambda image: image)
  if isinstance(medium, (bytes, np.bytes_)) or np.ndim(medium) == 3:
    out = np.zeros([frames, size, size, 3], np.uint8)
    out[0] = fit_image(augment(decode_image(medium)), size)
    return out
  video = list(medium)
  if len(video) < frames:
    raise MediaError(f'A video needs at least {frames} frames; got '
                     f'{len(video)}.')
  if clip_rng is not None:
    start = int(clip_rng.integers(0, len(video) - frames + 1))
    picks = np.arange(start, start + frames)
  else:
    picks = np.linspace(0, len(video) - 1, frames).round().astype(int)
  return np.stack([fit_image(augment(decode_image(video[i])), size)
                   for i in picks])


# Readers: raw example (a dict of numpy values from the data source) ->
# (chunks, media) with chunks as in formatting.format_document.
def _text(value: Any) -> str:
  return value.decode('utf-8') if isinstance(value, (bytes, np.bytes_)) else str(value)


def read_pair(raw: Mapping[str, Any]):
  medium = raw['image'] if 'image' in raw else raw['video']
  return [{'image': 0}, {'text': _text(raw['caption'])}], [medium]


def read_document(raw: Mapping[str, Any]):
  """A document's chunks (with 'supervised' where its features have it)."""
  chunks = []
  fields = raw['chunks']
  supervised = fields.get('supervised', [True] * len(fields['image']))
  for text, image, learn in zip(fields['text'], fields['image'], supervised):
    image = int(image)
    if image >= 0:
      chunks.append({'image': image})
    else:
      chunks.append({'text': _text(text)} if learn else
                    {'text': _text(text), 'supervised': False})
  return chunks, list(raw['images'])


def read_document_text(raw: Mapping[str, Any]):
  """A document's text alone (a text dataset's 'text', or a document's text
  chunks): language-model pretraining data."""
  if 'text' in raw:
    return [{'text': _text(raw['text'])}], []
  chunks, _ = read_document(raw)
  return [c for c in chunks if 'text' in c], []


READERS: dict[str, Callable[[Mapping[str, Any]], tuple[list, list]]] = {
    'pairs': read_pair,
    'video_pairs': read_pair,
    'documents': read_document,
    'text': read_document_text,
}


class ExampleLoader:
  """Loads and formats the example at a global position of one dataset."""

  def __init__(self, source: Sequence[Mapping[str, Any]],
               spec: ml_collections.ConfigDict,
               tokenizer: tokenizer_lib.Tokenizer, seed: int,
               dataset_index: int):
    if spec.kind not in READERS:
      raise ValueError(f'Unknown dataset kind {spec.kind!r}; expected one of '
                       f'{sorted(READERS)}.')
    if len(source) == 0:  # pylint: disable=g-explicit-length-test
      raise ValueError(f'Dataset {spec.name!r} split {spec.split!r} is empty.')
    self._source, self._spec = source, spec
    self._tokenizer, self._seed, self._index = tokenizer, seed, dataset_index
    self._size = len(source)
    # The optional fields, read once: a ConfigDict lookup of a missing key
    # builds a did-you-mean message (difflib) every time.
    self._random_window = bool(spec.get('random_window', False))
    self._random_clip = bool(spec.get('random_clip', False))
    self._crop_min_area = spec.get('crop_min_area', 1.0)
    self._flip_p = spec.get('flip_p', 0.0)
    # The current epoch's order (and the next one's, near the boundary), not
    # one shuffle of the whole dataset per example.
    self._epoch_order = functools.lru_cache(maxsize=2)(self._shuffle)
    self._skips = collections.Counter()
    self._lock = threading.Lock()

  def _shuffle(self, epoch: int) -> np.ndarray | index_shuffle.IndexShuffle:
    key = [self._seed, self._index, epoch]
    if self._size > MAX_SHUFFLE_IN_MEMORY:  # One index at a time instead.
      return index_shuffle.IndexShuffle(self._size, key)
    return np.random.default_rng(key).permutation(self._size)  # [size] int

  def _example_index(self, position: int) -> int:
    epoch, offset = divmod(position, self._size)
    return int(self._epoch_order(epoch)[offset])

  def __call__(self, position: int) -> dict[str, np.ndarray]:
    spec = self._spec
    rng = np.random.default_rng([self._seed, self._index, position, 1])
    raw = self._source[self._example_index(position)]
    chunks, media = READERS[spec.kind](raw)
    try:
      example = self._format(chunks, rng, position)
      if isinstance(example, formatting.Skip):
        return self._skip(example.reason)
      media_out = self._empty_media()  # [N, T, H, W, 3]
      # Its own stream, so that turning augmentation on changes nothing else.
      augment_rng = np.random.default_rng([self._seed, self._index, position,
                                           2])
      clip_rng = (np.random.default_rng([self._seed, self._index, position, 4])
                  if self._random_clip else None)
      for slot, source_index in enumerate(example['kept_media']):
        if source_index >= 0:
          augment = augment_lib.make_augment(
              augment_rng, crop_min_area=self._crop_min_area,
              flip_p=self._flip_p)
          media_out[slot] = media_array(media[source_index], spec.frames,
                                        spec.image_size, augment, clip_rng)
    except MediaError as e:
      logging.log_every_n(logging.WARNING, 'Skipping an example of %s: %s',
                          100, spec.name, e)
      return self._skip(CORRUPT_MEDIA)
    return self._batch_row(example, media_out)

  def _format(self, chunks, rng, position):
    spec = self._spec
    if spec.kind in ('documents', 'text'):
      # App. A.3: a random window of seq_len tokens of the document.
      window_rng = (np.random.default_rng(
          [self._seed, self._index, position, 3])
                    if self._random_window else None)
      return formatting.format_document(
          chunks, self._tokenizer, seq_len=spec.seq_len,
          max_media=spec.max_media, p_next=spec.p_next, rng=rng,
          window_rng=window_rng)
    return formatting.format_pair(
        _text(chunks[1]['text']), self._tokenizer, seq_len=spec.seq_len,
        rng=rng)

  def _batch_row(self, example, media) -> dict[str, np.ndarray]:
    spec = self._spec
    media_mask = np.zeros([spec.max_media], bool)
    media_mask[:len(example['media_mask'])] = example['media_mask']
    return dict(tokens=example['tokens'], targets=example['targets'],
                loss_mask=example['loss_mask'], media=media,
                media_mask=media_mask, media_index=example['media_index'])

  def _skip(self, reason: str) -> dict[str, np.ndarray]:
    with self._lock:
      self._skips[reason] += 1
    empty = formatting.empty_example(self._spec.seq_len, self._spec.max_media)
    return self._batch_row(empty, self._empty_media())

  def _empty_media(self) -> np.ndarray:  # [N, T, H, W, 3] uint8 zeros
    spec = self._spec
    return np.zeros([spec.max_media, spec.frames, spec.image_size,
                     spec.image_size, 3], np.uint8)

  def skips(self) -> dict[str, int]:
    with self._lock:
      return dict(self._skips)


def _local_batch_size(spec: ml_collections.ConfigDict) -> int:
  processes = jax.process_count()
  if spec.batch_size % processes:
    raise ValueError(f'Dataset {spec.name!r}: batch_size {spec.batch_size} is '
                     f'not divisible by the {processes} processes.')
  return spec.batch_size // processes


class _Prefetcher:
  """Batches of one dataset from `start_step` on, made ahead on threads.

  Rows are loaded in parallel (decoding and resizing release the GIL) and
  assembled in order, so the output does not depend on thread timing.
  """

  def __init__(self, loader: ExampleLoader, spec: ml_collections.ConfigDict,
               start_step: int, *, workers: int = 4, prefetch: int = 2):
    self._loader, self._spec = loader, spec
    self._local = _local_batch_size(spec)
    self._offset = jax.process_index() * self._local
    self._pool = concurrent.futures.ThreadPoolExecutor(workers)
    self._queue = collections.deque()
    self._next_step, self._prefetch = start_step, prefetch

  def _submit(self) -> None:
    step = self._next_step
    first = step * self._spec.batch_size + self._offset
    self._queue.append([self._pool.submit(self._loader, first + row)
                        for row in range(self._local)])
    self._next_step += 1

  def __next__(self) -> dict[str, np.ndarray]:
    while len(self._queue) <= self._prefetch:
      self._submit()
    rows = [future.result() for future in self._queue.popleft()]
    return {key: np.stack([row[key] for row in rows]) for key in BATCH_KEYS}

  def close(self) -> None:
    for futures in self._queue:
      for future in futures:
        future.cancel()
    self._pool.shutdown(wait=True)


class TrainData:
  """{dataset name: batch} per step, for this process; resumable by step."""

  def __init__(self, loaders: Mapping[str, ExampleLoader],
               specs: Mapping[str, ml_collections.ConfigDict],
               start_step: int):
    self._loaders = dict(loaders)
    self._iterators = {name: _Prefetcher(loader, specs[name], start_step)
                       for name, loader in self._loaders.items()}
    self.next_step = start_step

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, dict[str, np.ndarray]]:
    batches = {name: next(it) for name, it in self._iterators.items()}
    self.next_step += 1
    return batches

  def state(self) -> dict[str, int]:
    return {'next_step': self.next_step}

  def stats(self) -> dict[str, int]:
    """Skipped examples so far, as {'data/skipped/<dataset>/<reason>': n}."""
    return {f'data/skipped/{name}/{reason}': count
            for name, loader in self._loaders.items()
            for reason, count in loader.skips().items()}

  def close(self) -> None:
    for iterator in self._iterators.values():
      iterator.close()


def dataset_specs(config: ml_collections.ConfigDict
                  ) -> dict[str, ml_collections.ConfigDict]:
  """config.data.datasets with each spec's `name` filled in."""
  specs = {}
  for name in sorted(config.data.datasets):
    spec = ml_collections.ConfigDict(config.data.datasets[name].to_dict())
    spec.name = name
    specs[name] = spec
  return specs


def open_source(spec: ml_collections.ConfigDict, data_dir: str,
                sizes: str = 'default'):
  """A random-access data source for `spec.builder`/`spec.split`.

  A builder that is not the embedded world's ('world_...') is a dataset
  prepared by `flamingo_jax.data.formats` ('<format>/<name>'), read from
  `spec.data_dir` when the spec has one, else from `data_dir`.
  """
  # pylint: disable=g-import-not-at-top
  if not spec.builder.startswith('world_'):
    from flamingo_jax.data import formats
    return formats.open_source(spec.builder, spec.get('data_dir') or data_dir,
                               spec.split)
  from flamingo_jax.data import world
  # pylint: enable=g-import-not-at-top
  builder = world.make_builder(spec.builder, data_dir, sizes, spec.image_size)
  if not builder.is_prepared():
    raise FileNotFoundError(
        f'Dataset {spec.builder!r} ({sizes}) is not built in {data_dir!r}: '
        f'run `python -m flamingo_jax.data.world --data_dir {data_dir} '
        f'--sizes {sizes}` (the training recipe does it for you).')
  return builder.as_data_source(split=spec.split)


def make_train_data(config: ml_collections.ConfigDict, start_step: int,
                    tokenizer: Optional[tokenizer_lib.Tokenizer] = None
                    ) -> TrainData:
  """The training mixture of `config.data`, starting at `start_step`."""
  tokenizer = tokenizer or tokenizer_lib.Tokenizer.load(config.data.tokenizer)
  specs = dataset_specs(config)
  loaders = {
      name: ExampleLoader(
          open_source(spec, config.data.data_dir, config.data.sizes), spec,
          tokenizer, config.seed, index)
      for index, (name, spec) in enumerate(specs.items())}
  return TrainData(loaders, specs, start_step)
