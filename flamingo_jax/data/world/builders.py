"""TFDS builders of the embedded world, their registry, and `build_all`.

Every dataset is a `base.WorldBuilder` (a `tfds.core.GeneratorBasedBuilder`;
configs, parallel generation and the features live in base.py) whose
examples come from `tasks.py`.

Images are stored as PNG, encoded by Pillow (`base.encode_png`;
`tfds.features.Image(encoding_format='png')`): a reader that wants to
decode in its own preprocessing passes
`decoders={'image': tfds.decode.SkipDecoding()}` (for `images` and `video`,
the same; they are then [N] or [T] tf.string tensors) and calls
`tf.io.decode_png`.

Versioning. All builders share `base.VERSION` (set in
`flamingo_jax.data.prepare.WORLD_VERSION`). Any change to what is generated
(a constant of the grammar, the renderer, a template, the sampling code)
must bump it, so that a prepared `data_dir` is never silently mixed with new
code. `generation_fingerprint()` hashes every module-level constant of the
generator modules and a few generated examples of every dataset;
`tests/data/world/test_builders.py` pins `VERSION` together with it, and
fails when the fingerprint moves without a version bump. The fingerprint is
also saved in each prepared dataset's metadata
(`builder.info.metadata['generation_fingerprint']`), and `build_all` warns
when a prepared dataset's fingerprint differs from the code's (e.g. another
Pillow version).
"""

from collections.abc import Callable, Iterator, Mapping, Sequence
import contextlib
import fcntl
import functools
import hashlib
import os
import tempfile
import time
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from flamingo_jax import fs
from flamingo_jax.data.world import base
from flamingo_jax.data.world import documents
from flamingo_jax.data.world import language
from flamingo_jax.data.world import nonce
from flamingo_jax.data.world import questions
from flamingo_jax.data.world import scenes
from flamingo_jax.data.world import tasks
from flamingo_jax.data.world import video as video_lib

# The package's names for what base.py defines.
VERSION = base.VERSION
SIZES = base.SIZES
DEFAULT_IMAGE_SIZE = base.DEFAULT_IMAGE_SIZE
WorldConfig = base.WorldConfig
WorldBuilder = base.WorldBuilder


# ------------------------------------------------------------- training --


class WorldPairs(WorldBuilder):
  """Image-text pairs (ALIGN/LTIP-like)."""
  name = 'world_pairs'
  DESCRIPTION = 'Images of the world, each with one caption.'
  SPLITS = {'default': {'train': 50_000, 'validation': 1_000},
            'tiny': {'train': 32, 'validation': 8}}

  def features(self):
    return {'image': base.image_feature(self.builder_config),
            'caption': tfds.features.Text()}

  @staticmethod
  def make_example(rng, params):
    ex = tasks.pair_example(rng, params.image_size)
    return {'image': base.encode_png(ex['image']), 'caption': ex['caption']}


class WorldVideoPairs(WorldBuilder):
  """Video-text pairs (VTP-like)."""
  name = 'world_video_pairs'
  DESCRIPTION = 'Videos of the world, each with one caption.'
  SPLITS = {'default': {'train': 10_000, 'validation': 500},
            'tiny': {'train': 16, 'validation': 4}}

  def features(self):
    return {'video': base.video_feature(self.builder_config),
            'caption': tfds.features.Text()}

  @staticmethod
  def make_example(rng, params):
    ex = tasks.video_pair_example(rng, params.image_size, params.num_frames)
    return {'video': [base.encode_png(f) for f in ex['video']],
            'caption': ex['caption']}


class WorldDocuments(WorldBuilder):
  """Interleaved image-text pages (M3W-like)."""
  name = 'world_documents'
  DESCRIPTION = ('Web-page-like documents: images and the text around them, '
                 'as chunks; a chunk is text (image = -1) or an image '
                 '(text = "", image = its index in `images`).')
  SPLITS = {'default': {'train': 20_000, 'validation': 500},
            'tiny': {'train': 16, 'validation': 4}}

  # Extra per-chunk features of a subclass: name -> dtype.
  CHUNK_FEATURES = {}

  def features(self):
    return {
        'images': tfds.features.Sequence(
            base.image_feature(self.builder_config)),
        'chunks': tfds.features.Sequence({'text': tfds.features.Text(),
                                          'image': np.int32,
                                          **self.CHUNK_FEATURES}),
    }

  @staticmethod
  def make_example(rng, params):
    ex = tasks.document_example(rng, params.image_size)
    return {'images': [base.encode_png(image) for image in ex['images']],
            'chunks': [{'text': c.get('text', ''), 'image': c.get('image', -1)}
                       for c in ex['chunks']]}


class WorldText(WorldBuilder):
  """Text-only pages (MassiveText's role: the LM stage's pretraining text)."""
  name = 'world_text'
  DESCRIPTION = ('The text of web-page-like documents, without their images: '
                 'mostly word-learning pages (documents.TEXT_PAGE_KINDS).')
  SPLITS = {'default': {'train': 50_000, 'validation': 500},
            'tiny': {'train': 16, 'validation': 4}}
  PARALLEL_MIN_EXAMPLES = 4096  # Text is quick: not worth the workers below.

  def features(self):
    return {'text': tfds.features.Text()}

  @staticmethod
  def make_example(rng, params):
    del params  # No media.
    return tasks.text_example(rng)


class WorldEpisodes(WorldBuilder):
  """Bursty nonce episodes as documents (in-context binding to learn)."""
  name = 'world_episodes'
  DESCRIPTION = ('Documents of one-object pictures, each named by a made-up '
                 'word fresh for the document and shown again later '
                 '(nonce.episode); chunks as world_documents.')
  SPLITS = {'default': {'train': 20_000, 'validation': 500},
            'tiny': {'train': 16, 'validation': 4}}

  # world_documents' chunks, and whether a text chunk is learned
  # (`tasks.LEARN_FIRST_SHOWINGS`).
  CHUNK_FEATURES = {'supervised': np.bool_}
  features = WorldDocuments.features

  @staticmethod
  def make_example(rng, params):
    ex = tasks.episode_example(rng, params.image_size)
    return {'images': [base.encode_png(image) for image in ex['images']],
            'chunks': [{'text': c.get('text', ''), 'image': c.get('image', -1),
                        'supervised': c.get('supervised', True)}
                       for c in ex['chunks']]}


class WorldEpisodeText(WorldBuilder):
  """Bursty nonce episodes in words alone, for the LM stage."""
  name = 'world_episode_text'
  DESCRIPTION = ('Bursty nonce episodes with each picture replaced by the '
                 'words of what it shows (nonce.episode_text).')
  SPLITS = {'default': {'train': 50_000, 'validation': 500},
            'tiny': {'train': 16, 'validation': 4}}
  PARALLEL_MIN_EXAMPLES = 4096

  features = WorldText.features

  @staticmethod
  def make_example(rng, params):
    del params  # No media.
    return tasks.episode_text_example(rng)


# ----------------------------------------------------------- evaluation --


class WorldCaptions(WorldBuilder):
  """Captioning with 5 references per image (COCO-like)."""
  name = 'world_captions'
  DESCRIPTION = f'Images with {tasks.NUM_CAPTIONS} reference captions.'
  SPLITS = {'default': {'support': 2_000, 'query': 500},
            'tiny': {'support': 8, 'query': 4}}

  def features(self):
    return {'image': base.image_feature(self.builder_config),
            'captions': tfds.features.Sequence(tfds.features.Text(),
                                               length=tasks.NUM_CAPTIONS)}

  @staticmethod
  def make_example(rng, params):
    ex = tasks.caption_example(rng, params.image_size)
    return {'image': base.encode_png(ex['image']), 'captions': ex['captions']}


class WorldVqa(WorldBuilder):
  """Open-ended VQA with 10 annotator answers (VQAv2-like)."""
  name = 'world_vqa'
  DESCRIPTION = (f'Images with a question, its answer and '
                 f'{tasks.NUM_ANSWERS} annotator answers.')
  SPLITS = {'default': {'support': 5_000, 'query': 1_000},
            'tiny': {'support': 8, 'query': 4}}

  def features(self):
    return {'image': base.image_feature(self.builder_config),
            'question': tfds.features.Text(),
            'answer': tfds.features.Text(),
            'answers': tfds.features.Sequence(tfds.features.Text(),
                                              length=tasks.NUM_ANSWERS),
            'question_type': tfds.features.Text()}

  @staticmethod
  def make_example(rng, params):
    ex = tasks.vqa_example(rng, params.image_size)
    ex['image'] = base.encode_png(ex['image'])
    return ex


class WorldVideoQa(WorldBuilder):
  """Open-ended video QA, one answer (MSRVTT-QA-like)."""
  name = 'world_video_qa'
  DESCRIPTION = 'Videos with a question that needs several frames.'
  SPLITS = {'default': {'support': 1_000, 'query': 500},
            'tiny': {'support': 8, 'query': 4}}

  def features(self):
    return {'video': base.video_feature(self.builder_config),
            'question': tfds.features.Text(),
            'answer': tfds.features.Text(),
            'question_type': tfds.features.Text()}

  @staticmethod
  def make_example(rng, params):
    ex = tasks.video_qa_example(rng, params.image_size, params.num_frames)
    ex['video'] = [base.encode_png(f) for f in ex['video']]
    return ex


class WorldVideoCaptions(WorldBuilder):
  """Video captioning with 5 references (VATEX-like)."""
  name = 'world_video_captions'
  DESCRIPTION = f'Videos with {tasks.NUM_CAPTIONS} reference captions.'
  SPLITS = {'default': {'support': 1_000, 'query': 500},
            'tiny': {'support': 8, 'query': 4}}

  def features(self):
    return {'video': base.video_feature(self.builder_config),
            'captions': tfds.features.Sequence(tfds.features.Text(),
                                               length=tasks.NUM_CAPTIONS)}

  @staticmethod
  def make_example(rng, params):
    ex = tasks.video_caption_example(rng, params.image_size,
                                     params.num_frames)
    return {'video': [base.encode_png(f) for f in ex['video']],
            'captions': ex['captions']}


class WorldClassification(WorldBuilder):
  """Classification among CLASS_NAMES (ImageNet-like)."""
  name = 'world_classification'
  DESCRIPTION = (f'Images whose label is the colour and shape of their one '
                 f'large object, among {len(tasks.CLASS_NAMES)} class names.')
  SPLITS = {'default': {'support': 3_200, 'query': 1_000},
            'tiny': {'support': 8, 'query': 4}}

  def features(self):
    return {'image': base.image_feature(self.builder_config),
            'label': tfds.features.ClassLabel(names=tasks.CLASS_NAMES),
            'label_name': tfds.features.Text()}

  @staticmethod
  def make_example(rng, params):
    ex = tasks.classification_example(rng, params.image_size)
    ex['image'] = base.encode_png(ex['image'])
    return ex


class WorldNonce(WorldBuilder):
  """Nonce-word episodes: bindings only the episode's support reveals."""
  name = 'world_nonce'
  DESCRIPTION = (f'Episodes binding {tasks.NONCE_WAYS} made-up words to '
                 f'shapes or colours through {tasks.NONCE_SHOTS} support '
                 f'images each; {tasks.NONCE_QUERIES} queries per episode.')
  SPLITS = {'default': {'query': 500}, 'tiny': {'query': 4}}

  def features(self):
    item = {'image': base.image_feature(self.builder_config),
            'word': tfds.features.Text(), 'text': tfds.features.Text(),
            'value': tfds.features.Text()}
    num_support = tasks.NONCE_WAYS * tasks.NONCE_SHOTS
    return {'support': tfds.features.Sequence(item, length=num_support),
            'query': tfds.features.Sequence(dict(item),
                                            length=tasks.NONCE_QUERIES),
            'words': tfds.features.Sequence(tfds.features.Text(),
                                            length=tasks.NONCE_WAYS),
            'attribute': tfds.features.Text(),
            'template': tfds.features.Text()}

  @staticmethod
  def make_example(rng, params):
    ex = tasks.nonce_episode(rng, params.image_size)
    for part in ('support', 'query'):
      ex[part] = [dict(item, image=base.encode_png(item['image']))
                  for item in ex[part]]
    return ex


_BUILDERS: dict[str, type[WorldBuilder]] = {
    cls.name: cls for cls in (WorldPairs, WorldVideoPairs, WorldDocuments,
                              WorldText, WorldEpisodes, WorldEpisodeText,
                              WorldCaptions, WorldVqa, WorldVideoQa,
                              WorldVideoCaptions, WorldClassification,
                              WorldNonce)}
DATASETS = tuple(_BUILDERS)


def builder_class(name: str) -> type[WorldBuilder]:
  """The builder class of dataset `name` (e.g. 'world_pairs')."""
  if name not in _BUILDERS:
    raise ValueError(f'Unknown world dataset {name!r}; expected one of '
                     f'{DATASETS}.')
  return _BUILDERS[name]


# ---------------------------------------------------------- fingerprint --


def _canonical(value: Any) -> Any:
  """`value` with sets sorted, so that its repr does not depend on hashing."""
  if isinstance(value, (set, frozenset)):
    return sorted(_canonical(v) for v in value)
  if isinstance(value, Mapping):
    return {k: _canonical(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return type(value)(_canonical(v) for v in value)
  return value


def _constant_names(module) -> list[str]:
  return sorted(n for n in vars(module) if n.lstrip('_').isupper())


@functools.cache
def generation_fingerprint() -> str:
  """A hash of everything that determines the generated data.

  Hashes the module-level constants of the generator modules (scenes,
  language, questions, nonce, video, documents, tasks) and two examples of
  every dataset at a small size, so that code changes are caught too.

  Returns:
    16 hex digits.
  """
  digest = hashlib.sha256()
  for module in (scenes, language, questions, nonce, video_lib, documents,
                 tasks):
    for name in _constant_names(module):
      value = _canonical(getattr(module, name))
      digest.update(f'{module.__name__}.{name}={value!r}\n'.encode())
  params = base.Params(image_size=32, num_frames=4, seed=scenes.WORLD_SEED)
  for name in DATASETS:
    for index in range(2):
      example = base.make_indexed_example(_BUILDERS[name], 'fingerprint',
                                          params, index)
      digest.update(repr(_canonical(example)).encode())
  return digest.hexdigest()[:16]


# ------------------------------------------------------------ build_all --


def make_builder(name: str, data_dir: str | os.PathLike, sizes: str = 'default',
                 image_size: int = DEFAULT_IMAGE_SIZE, **config_kwargs
                 ) -> WorldBuilder:
  """The builder of dataset `name` for `sizes` and `image_size` in data_dir.

  Args:
    name: one of DATASETS.
    data_dir: the TFDS data directory.
    sizes: one of SIZES.
    image_size: image side; 64 and 320 are predefined configs
      ('default_320px'), others get a config of their own.
    **config_kwargs: further `WorldConfig` fields (then the config is named
      'custom_<sizes>_<image_size>px_<hash of the fields>' unless `name` is
      given in them, so that different fields never share a directory).

  Returns:
    The (not yet prepared) builder.
  """
  cls = builder_class(name)
  if sizes not in SIZES:
    raise ValueError(f'Unknown sizes {sizes!r}; expected one of {SIZES}.')
  predefined = {c.name: c for c in base.BUILDER_CONFIGS}
  cfg_name = base.config_name(sizes, image_size)
  if cfg_name in predefined and not config_kwargs:
    return cls(config=cfg_name, data_dir=os.fspath(data_dir))
  fields = repr(sorted(_canonical(config_kwargs).items())).encode()
  config_kwargs.setdefault(
      'name', f'custom_{sizes}_{image_size}px_'
      f'{hashlib.sha256(fields).hexdigest()[:8]}')
  config = WorldConfig(sizes=sizes, image_size=image_size, **config_kwargs)
  return cls(config=config, data_dir=os.fspath(data_dir))


def build_all(data_dir: str | os.PathLike, sizes: str = 'default', *,
              datasets: Sequence[str] | None = None,
              image_size: int = DEFAULT_IMAGE_SIZE,
              num_workers: int | None = None,
              log: Callable[[str], None] = print,
              ) -> dict[str, WorldBuilder]:
  """Prepares the world's datasets in `data_dir`.

  Args:
    data_dir: the TFDS data directory (created if needed), local or gs://.
    sizes: 'default' or 'tiny'.
    datasets: names to build (default: all of DATASETS).
    image_size: image side in pixels.
    num_workers: generator processes; None: the CPUs available, up to 16.
    log: where progress lines go.

  Returns:
    name -> the prepared builder (`builder.as_dataset(split=...)`).
  """
  if sizes not in SIZES:
    raise ValueError(f'Unknown sizes {sizes!r}; expected one of {SIZES}.')
  names = list(DATASETS if datasets is None else datasets)
  for name in names:
    builder_class(name)  # Fails early on an unknown name.
  if num_workers is not None and num_workers < 1:
    raise ValueError(f'num_workers must be >= 1; got {num_workers}.')
  builders = {}
  start_all = time.perf_counter()
  for k, name in enumerate(names):
    builder = make_builder(name, data_dir, sizes, image_size)
    builder.num_workers = num_workers
    counts = ', '.join(f'{s} {n}' for s, n in builder.split_sizes.items())
    log(f'[{k + 1}/{len(names)}] {name}/{builder.builder_config.name} '
        f'({counts})')
    start = time.perf_counter()
    _check_fingerprint(builder, log)
    if not builder.is_prepared():
      builder = _build(name, builder, data_dir, sizes, image_size,
                       num_workers)
    log(f'    done in {time.perf_counter() - start:.1f} s: '
        f'{builder.data_dir}')
    builders[name] = builder
  log(f'Built {len(names)} datasets in {time.perf_counter() - start_all:.1f} '
      f's into {os.fspath(data_dir)}.')
  return builders


def _build(name: str, builder: WorldBuilder, data_dir: str | os.PathLike,
           sizes: str, image_size: int,
           num_workers: int | None) -> WorldBuilder:
  """Prepares a missing dataset; returns its builder, reopened if another
  process built it while this one waited for the lock."""
  if fs.is_url(data_dir):
    _prepare_and_upload(name, builder, sizes, image_size, num_workers)
    return builder
  with _build_lock(os.fspath(data_dir), builder):
    if builder.is_prepared():
      return make_builder(name, data_dir, sizes, image_size)
    _prepare(builder)
  return builder


@contextlib.contextmanager
def _build_lock(data_dir: str, builder: WorldBuilder) -> Iterator[None]:
  """Holds one dataset's build lock in `data_dir` (flock, released by the
  kernel if its holder dies): runs that start together (`ablate --jobs`,
  evaluations at their end) build it once, the others wait, and none finds
  the dataset renamed into place under it."""
  os.makedirs(data_dir, exist_ok=True)
  name = f'{builder.name}-{builder.builder_config.name}-{builder.version}'
  with open(os.path.join(data_dir, f'.{name}.lock'), 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


def _prepare(builder: WorldBuilder) -> None:
  # ArrayRecord: random access, so the pipeline reads any example by index.
  builder.download_and_prepare(
      file_format='array_record',
      download_config=tfds.download.DownloadConfig(
          compute_stats=tfds.download.ComputeStatsMode.SKIP))


def _prepare_and_upload(name: str, builder: WorldBuilder, sizes: str,
                        image_size: int, num_workers: int | None) -> None:
  """Prepares `builder` (on gs://...) in a local directory, then copies it
  up: ArrayRecord's writer only writes local files (its reader does read
  gs://)."""
  with tempfile.TemporaryDirectory() as local_dir:
    local = make_builder(name, local_dir, sizes, image_size)
    local.num_workers = num_workers
    _prepare(local)
    fs.copy_tree(os.fspath(local.data_dir), os.fspath(builder.data_dir))


def _check_fingerprint(builder: WorldBuilder,
                       log: Callable[[str], None]) -> None:
  """Warns if a prepared dataset was generated by different code."""
  if not fs.exists(fs.join(os.fspath(builder.data_dir),
                           'dataset_info.json')):
    return
  stored = (builder.info.metadata or {}).get('generation_fingerprint')
  if stored != generation_fingerprint():
    log(f'    WARNING: {builder.name} in {builder.data_dir} was generated '
        f'with fingerprint {stored}, the code now gives '
        f'{generation_fingerprint()}: bump prepare.WORLD_VERSION if '
        'generation changed, or delete the directory.')
