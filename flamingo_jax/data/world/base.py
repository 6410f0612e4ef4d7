"""The machinery every TFDS builder of the embedded world shares.

`WorldConfig` (split sizes, resolution, frames, seed), the predefined
configs, the PNG features, and `WorldBuilder`, whose example i of split s is
generated from `scenes.example_rng(name, s, i, seed=config.seed)`: it does
not depend on the other examples (the builder generates in parallel worker
processes) and a smaller split is a prefix of a larger one ('tiny' is a
prefix of 'default'). The datasets themselves, their registry, versioning
and `build_all` are in `builders.py`.
"""

from collections.abc import Iterator, Mapping
import dataclasses
import functools
import io
import multiprocessing
import os
import sys
from typing import Any, ClassVar

from etils import epath
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from flamingo_jax.data import prepare
from flamingo_jax.data.world import scenes
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
    '1.5.0': ("world_episode_text: each picture's key at the start of its "
              "line, where <image> sits ('circle This is a dax.')."),
    '1.6.0': ("world_episode_text: half of the episodes with each key right "
              "before its word ('This is a circle dax.'), a scaffold for "
              "the line-keyed half."),
    '1.7.0': ("world_episodes: each word's first showing after its key in "
              "words ('<image> circle This is a dax.'), later showings "
              "plain; chunks have a 'supervised' feature."),
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


def image_feature(config: WorldConfig) -> tfds.features.Image:
  size = config.image_size
  return tfds.features.Image(shape=(size, size, 3), encoding_format='png')


def video_feature(config: WorldConfig) -> tfds.features.Video:
  size = config.image_size
  return tfds.features.Video(shape=(config.num_frames, size, size, 3),
                             encoding_format='png')


@dataclasses.dataclass(frozen=True)
class Params:
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
  def make_example(rng: np.random.Generator, params: Params
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
            generation_fingerprint=_fingerprint()),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    return {split: self._generate_examples(split, size)
            for split, size in self.split_sizes.items()}

  def _params(self) -> Params:
    config = self.builder_config
    return Params(config.image_size, config.num_frames, config.seed)

  def _generate_examples(self, split: str, num_examples: int
                         ) -> Iterator[tuple[int, dict[str, Any]]]:
    make = functools.partial(make_indexed_example, type(self), split,
                             self._params())
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


def make_indexed_example(cls: type[WorldBuilder], split: str, params: Params,
                         index: int) -> dict[str, Any]:
  """Example `index` of `split` of dataset `cls`, with its 'id'."""
  rng = scenes.example_rng(cls.name, split, index, seed=params.seed)
  return {**cls.make_example(rng, params), 'id': index}


def _fingerprint() -> str:
  # The fingerprint covers every dataset, so it lives with their registry
  # (a cycle of imports, hence imported here).
  from flamingo_jax.data.world import builders  # pylint: disable=g-import-not-at-top,line-too-long
  return builders.generation_fingerprint()
