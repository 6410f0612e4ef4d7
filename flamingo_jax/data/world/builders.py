"""TFDS builders of the embedded world, their registry, and their fingerprint.

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
(`builder.info.metadata['generation_fingerprint']`), and `build.build_all`
warns when a prepared dataset's fingerprint differs from the code's (e.g.
another Pillow version).
"""

from collections.abc import Mapping
import functools
import hashlib
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

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


def canonical(value: Any) -> Any:
  """`value` with sets sorted, so that its repr does not depend on hashing."""
  if isinstance(value, (set, frozenset)):
    return sorted(canonical(v) for v in value)
  if isinstance(value, Mapping):
    return {k: canonical(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return type(value)(canonical(v) for v in value)
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
      value = canonical(getattr(module, name))
      digest.update(f'{module.__name__}.{name}={value!r}\n'.encode())
  params = base.Params(image_size=32, num_frames=4, seed=scenes.WORLD_SEED)
  for name in DATASETS:
    for index in range(2):
      example = base.make_indexed_example(_BUILDERS[name], 'fingerprint',
                                          params, index)
      digest.update(repr(canonical(example)).encode())
  return digest.hexdigest()[:16]
