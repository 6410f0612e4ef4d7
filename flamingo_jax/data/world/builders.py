"""TFDS builders of the embedded world, and `build_all`.

Every dataset is a `tfds.core.GeneratorBasedBuilder` whose examples come from
`tasks.py`; example i of split s is generated from
`scenes.example_rng(name, s, i, seed=config.seed)`, so it does not depend on
the other examples (the builder generates in parallel worker processes) and
a smaller split is a prefix of a larger one ('tiny' is a prefix of
'default').

Images are stored as PNG, encoded by Pillow here (`tfds.features.Image(
encoding_format='png')`): a reader that wants to decode in its own
preprocessing passes `decoders={'image': tfds.decode.SkipDecoding()}` (for
`images` and `video`, the same; they are then [N] or [T] tf.string tensors)
and calls `tf.io.decode_png`.

Versioning. All builders share `VERSION` (set in
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
import dataclasses
import functools
import hashlib
import io
import multiprocessing
import os
import sys
import tempfile
import time
from typing import Any, ClassVar

from etils import epath
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from flamingo_jax import fs
from flamingo_jax.data import prepare
from flamingo_jax.data.world import documents
from flamingo_jax.data.world import language
from flamingo_jax.data.world import nonce
from flamingo_jax.data.world import questions
from flamingo_jax.data.world import scenes
from flamingo_jax.data.world import tasks
from flamingo_jax.data.world import video as video_lib

VERSION = tfds.core.Version(prepare.WORLD_VERSION)  # Bump it there.
RELEASE_NOTES = {
    '1.0.0': 'First release of the embedded world.',
    '1.1.0': 'Documents: quiz, gallery and word-learning pages.',
    '1.2.0': 'world_text: text-only pages for the LM stage.',
    '1.3.0': ('world_episodes and world_episode_text: bursty nonce episodes '
              'for training; world_nonce draws its words from the eval half '
              'of the word space.'),
    '1.4.0': ("world_episode_text: each word right after its key, the value "
              "it is bound to ('This is a circle dax.')."),
}
SIZES = ('default', 'tiny')
DEFAULT_IMAGE_SIZE = scenes.DEFAULT_IMAGE_SIZE
MAX_WORKERS = 16


@dataclasses.dataclass(eq=False)
class WorldConfig(tfds.core.BuilderConfig):
  """How big and at which resolution to build a dataset.

  Attributes:
    sizes: 'default' or 'tiny': which table of split sizes to use.
    image_size: image (and frame) side, pixels.
    num_frames: frames per video (at `video.FPS` frames per second).
    seed: the world seed.
    split_sizes: per-split overrides of the sizes table, e.g. {'train': 10}.
  """
  sizes: str = 'default'
  image_size: int = DEFAULT_IMAGE_SIZE
  num_frames: int = video_lib.DEFAULT_NUM_FRAMES
  seed: int = scenes.WORLD_SEED
  split_sizes: Mapping[str, int] | None = None

  def __post_init__(self):
    if self.sizes not in SIZES:
      raise ValueError(f'Unknown sizes {self.sizes!r}; expected one of '
                       f'{SIZES}.')
    if self.image_size < scenes.MIN_IMAGE_SIZE:
      raise ValueError(f'image_size must be >= {scenes.MIN_IMAGE_SIZE}; got '
                       f'{self.image_size}.')
    if self.num_frames < video_lib.MIN_NUM_FRAMES:
      raise ValueError(f'num_frames must be >= {video_lib.MIN_NUM_FRAMES}; '
                       f'got {self.num_frames}.')
    for split, size in (self.split_sizes or {}).items():
      if not isinstance(size, (int, np.integer)) or size <= 0:
        raise ValueError(f'Split sizes must be positive integers; got '
                         f'{split}={size!r}.')


def config_name(sizes: str, image_size: int = DEFAULT_IMAGE_SIZE) -> str:
  """'default', 'tiny', or e.g. 'default_320px' for other resolutions."""
  return sizes if image_size == DEFAULT_IMAGE_SIZE else (
      f'{sizes}_{image_size}px')


BUILDER_CONFIGS = [
    WorldConfig(name=config_name(sizes, image_size), sizes=sizes,
                image_size=image_size,
                description=f'{sizes} split sizes, {image_size}x{image_size}')
    for sizes in SIZES for image_size in (DEFAULT_IMAGE_SIZE, 320)
]


def encode_png(image: np.ndarray) -> bytes:  # image: [H, W, 3] uint8
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format='PNG')
  return buffer.getvalue()


def _image_feature(config: WorldConfig) -> tfds.features.Image:
  size = config.image_size
  return tfds.features.Image(shape=(size, size, 3), encoding_format='png')


def _video_feature(config: WorldConfig) -> tfds.features.Video:
  size = config.image_size
  return tfds.features.Video(shape=(config.num_frames, size, size, 3),
                             encoding_format='png')


@dataclasses.dataclass(frozen=True)
class _Params:
  """What an example depends on besides its index (picklable)."""
  image_size: int
  num_frames: int
  seed: int


class WorldBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Common machinery: configs, split sizes, parallel generation."""

  VERSION = VERSION
  RELEASE_NOTES = RELEASE_NOTES
  BUILDER_CONFIGS = BUILDER_CONFIGS
  # sizes -> split -> number of examples.
  SPLITS: ClassVar[Mapping[str, Mapping[str, int]]] = {}
  DESCRIPTION: ClassVar[str] = ''
  # Splits smaller than this are generated in this process.
  PARALLEL_MIN_EXAMPLES: ClassVar[int] = 256

  # Worker processes for generation; None: the CPUs available, up to 16.
  num_workers: int | None = None

  # TFDS 4.9's own code_path imports the `importlib_resources` backport, which
  # it requires only on Python < 3.9; the builders' code is simply here.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)

  @property
  def split_sizes(self) -> dict[str, int]:
    """The number of examples of every split of this config."""
    config = self.builder_config
    sizes = dict(self.SPLITS[config.sizes])
    for split, size in (config.split_sizes or {}).items():
      if split not in sizes:
        raise ValueError(f'Unknown split {split!r} for {self.name}; expected '
                         f'one of {tuple(sizes)}.')
      sizes[split] = int(size)
    return sizes

  def features(self) -> dict[str, Any]:
    """The feature specs (besides 'id': the example's index in its split)."""
    raise NotImplementedError

  @staticmethod
  def make_example(rng: np.random.Generator, params: _Params
                   ) -> dict[str, Any]:
    """The encoded example from its generator."""
    raise NotImplementedError

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=(f'{self.DESCRIPTION} Part of the embedded world of '
                     'flamingo_jax (flamingo_jax.data.world).'),
        features=tfds.features.FeaturesDict(
            {**self.features(), 'id': np.int64}),
        metadata=tfds.core.MetadataDict(
            generation_fingerprint=generation_fingerprint()),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    return {split: self._generate_examples(split, size)
            for split, size in self.split_sizes.items()}

  def _params(self) -> _Params:
    config = self.builder_config
    return _Params(config.image_size, config.num_frames, config.seed)

  def _generate_examples(self, split: str, num_examples: int
                         ) -> Iterator[tuple[int, dict[str, Any]]]:
    make = functools.partial(_make_example, self.name, split, self._params())
    workers = _resolve_workers(self.num_workers)
    if workers <= 1 or num_examples < self.PARALLEL_MIN_EXAMPLES:
      for index in range(num_examples):
        yield index, make(index)
      return
    # Fork: workers inherit the imported modules (no TensorFlow re-import)
    # and touch only numpy and Pillow.
    with multiprocessing.get_context('fork').Pool(workers) as pool:
      yield from enumerate(pool.imap(make, range(num_examples),
                                     chunksize=32))


def _resolve_workers(num_workers: int | None) -> int:
  if num_workers is not None:
    return num_workers
  if not sys.platform.startswith('linux'):
    return 1  # Forking is only safe enough on Linux.
  return min(MAX_WORKERS, len(os.sched_getaffinity(0)))


def _make_example(name: str, split: str, params: _Params,
                  index: int) -> dict[str, Any]:
  rng = scenes.example_rng(name, split, index, seed=params.seed)
  return {**_BUILDERS[name].make_example(rng, params), 'id': index}


# ------------------------------------------------------------- training --


class WorldPairs(WorldBuilder):
  """Image-text pairs (ALIGN/LTIP-like)."""
  name = 'world_pairs'
  DESCRIPTION = 'Images of the world, each with one caption.'
  SPLITS = {'default': {'train': 50_000, 'validation': 1_000},
            'tiny': {'train': 32, 'validation': 8}}

  def features(self):
    return {'image': _image_feature(self.builder_config),
            'caption': tfds.features.Text()}

  @staticmethod
  def make_example(rng, params):
    ex = tasks.pair_example(rng, params.image_size)
    return {'image': encode_png(ex['image']), 'caption': ex['caption']}


class WorldVideoPairs(WorldBuilder):
  """Video-text pairs (VTP-like)."""
  name = 'world_video_pairs'
  DESCRIPTION = 'Videos of the world, each with one caption.'
  SPLITS = {'default': {'train': 10_000, 'validation': 500},
            'tiny': {'train': 16, 'validation': 4}}

  def features(self):
    return {'video': _video_feature(self.builder_config),
            'caption': tfds.features.Text()}

  @staticmethod
  def make_example(rng, params):
    ex = tasks.video_pair_example(rng, params.image_size, params.num_frames)
    return {'video': [encode_png(f) for f in ex['video']],
            'caption': ex['caption']}


class WorldDocuments(WorldBuilder):
  """Interleaved image-text pages (M3W-like)."""
  name = 'world_documents'
  DESCRIPTION = ('Web-page-like documents: images and the text around them, '
                 'as chunks; a chunk is text (image = -1) or an image '
                 '(text = "", image = its index in `images`).')
  SPLITS = {'default': {'train': 20_000, 'validation': 500},
            'tiny': {'train': 16, 'validation': 4}}

  def features(self):
    return {
        'images': tfds.features.Sequence(_image_feature(self.builder_config)),
        'chunks': tfds.features.Sequence({'text': tfds.features.Text(),
                                          'image': np.int32}),
    }

  @staticmethod
  def make_example(rng, params):
    ex = tasks.document_example(rng, params.image_size)
    return {'images': [encode_png(image) for image in ex['images']],
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

  features = WorldDocuments.features

  @staticmethod
  def make_example(rng, params):
    ex = tasks.episode_example(rng, params.image_size)
    return {'images': [encode_png(image) for image in ex['images']],
            'chunks': [{'text': c.get('text', ''), 'image': c.get('image', -1)}
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
    return {'image': _image_feature(self.builder_config),
            'captions': tfds.features.Sequence(tfds.features.Text(),
                                               length=tasks.NUM_CAPTIONS)}

  @staticmethod
  def make_example(rng, params):
    ex = tasks.caption_example(rng, params.image_size)
    return {'image': encode_png(ex['image']), 'captions': ex['captions']}


class WorldVqa(WorldBuilder):
  """Open-ended VQA with 10 annotator answers (VQAv2-like)."""
  name = 'world_vqa'
  DESCRIPTION = (f'Images with a question, its answer and '
                 f'{tasks.NUM_ANSWERS} annotator answers.')
  SPLITS = {'default': {'support': 5_000, 'query': 1_000},
            'tiny': {'support': 8, 'query': 4}}

  def features(self):
    return {'image': _image_feature(self.builder_config),
            'question': tfds.features.Text(),
            'answer': tfds.features.Text(),
            'answers': tfds.features.Sequence(tfds.features.Text(),
                                              length=tasks.NUM_ANSWERS),
            'question_type': tfds.features.Text()}

  @staticmethod
  def make_example(rng, params):
    ex = tasks.vqa_example(rng, params.image_size)
    ex['image'] = encode_png(ex['image'])
    return ex


class WorldVideoQa(WorldBuilder):
  """Open-ended video QA, one answer (MSRVTT-QA-like)."""
  name = 'world_video_qa'
  DESCRIPTION = 'Videos with a question that needs several frames.'
  SPLITS = {'default': {'support': 1_000, 'query': 500},
            'tiny': {'support': 8, 'query': 4}}

  def features(self):
    return {'video': _video_feature(self.builder_config),
            'question': tfds.features.Text(),
            'answer': tfds.features.Text(),
            'question_type': tfds.features.Text()}

  @staticmethod
  def make_example(rng, params):
    ex = tasks.video_qa_example(rng, params.image_size, params.num_frames)
    ex['video'] = [encode_png(f) for f in ex['video']]
    return ex


class WorldVideoCaptions(WorldBuilder):
  """Video captioning with 5 references (VATEX-like)."""
  name = 'world_video_captions'
  DESCRIPTION = f'Videos with {tasks.NUM_CAPTIONS} reference captions.'
  SPLITS = {'default': {'support': 1_000, 'query': 500},
            'tiny': {'support': 8, 'query': 4}}

  def features(self):
    return {'video': _video_feature(self.builder_config),
            'captions': tfds.features.Sequence(tfds.features.Text(),
                                               length=tasks.NUM_CAPTIONS)}

  @staticmethod
  def make_example(rng, params):
    ex = tasks.video_caption_example(rng, params.image_size,
                                     params.num_frames)
    return {'video': [encode_png(f) for f in ex['video']],
            'captions': ex['captions']}


class WorldClassification(WorldBuilder):
  """Classification among CLASS_NAMES (ImageNet-like)."""
  name = 'world_classification'
  DESCRIPTION = (f'Images whose label is the colour and shape of their one '
                 f'large object, among {len(tasks.CLASS_NAMES)} class names.')
  SPLITS = {'default': {'support': 3_200, 'query': 1_000},
            'tiny': {'support': 8, 'query': 4}}

  def features(self):
    return {'image': _image_feature(self.builder_config),
            'label': tfds.features.ClassLabel(names=tasks.CLASS_NAMES),
            'label_name': tfds.features.Text()}

  @staticmethod
  def make_example(rng, params):
    ex = tasks.classification_example(rng, params.image_size)
    ex['image'] = encode_png(ex['image'])
    return ex


class WorldNonce(WorldBuilder):
  """Nonce-word episodes: bindings only the episode's support reveals."""
  name = 'world_nonce'
  DESCRIPTION = (f'Episodes binding {tasks.NONCE_WAYS} made-up words to '
                 f'shapes or colours through {tasks.NONCE_SHOTS} support '
                 f'images each; {tasks.NONCE_QUERIES} queries per episode.')
  SPLITS = {'default': {'query': 500}, 'tiny': {'query': 4}}

  def features(self):
    item = {'image': _image_feature(self.builder_config),
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
      ex[part] = [dict(item, image=encode_png(item['image']))
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
  params = _Params(image_size=32, num_frames=4, seed=scenes.WORLD_SEED)
  for name in DATASETS:
    for index in range(2):
      example = _make_example(name, 'fingerprint', params, index)
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
  predefined = {c.name: c for c in BUILDER_CONFIGS}
  cfg_name = config_name(sizes, image_size)
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
    if fs.is_url(data_dir) and not builder.is_prepared():
      _prepare_and_upload(name, builder, sizes, image_size, num_workers)
    else:
      _prepare(builder)
    log(f'    done in {time.perf_counter() - start:.1f} s: '
        f'{builder.data_dir}')
    builders[name] = builder
  log(f'Built {len(names)} datasets in {time.perf_counter() - start_all:.1f} '
      f's into {os.fspath(data_dir)}.')
  return builders


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
        f'{generation_fingerprint()}: bump builders.VERSION if generation '
        'changed, or delete the directory.')
