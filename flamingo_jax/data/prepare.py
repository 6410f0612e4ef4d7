"""Makes a config's data exist: builds the embedded world, trains its tokenizer.

Called by the training recipe before it reads any data, so that one command
runs anywhere with no download. Datasets that are not the world's must be
prepared by their own builders; a missing one is reported, not guessed.
"""

from collections.abc import Iterator
import os

from absl import logging
import ml_collections
import numpy as np

from flamingo_jax import fs
from flamingo_jax.data import tokenizer as tokenizer_lib

# The embedded world's version (`world.builders.VERSION` is made from it).
# It lives here, importable without TensorFlow, because configs name the
# tokenizer file by it and the benchmark reads configs on machines without
# TensorFlow.
WORLD_VERSION = '1.7.0'
# Prompt words of the evaluation formats, so they tokenize compactly too.
PROMPT_TEXT = 'Output: Question: Answer: yes no This is a picture of'
CORPUS_SEED = 20221129  # Fixed: the tokenizer is part of the recipe.


def world_corpus(num_scenes: int = 5000, num_videos: int = 2000,
                 num_documents: int = 2000) -> Iterator[str]:
  """Text in the world's language, straight from its grammar (no images).

  Independent of which splits are built, so the 'tiny' world trains the same
  tokenizer as the 'default' one.
  """
  # pylint: disable=g-import-not-at-top
  from flamingo_jax.data.world import documents
  from flamingo_jax.data.world import language
  from flamingo_jax.data.world import questions
  from flamingo_jax.data.world import scenes
  from flamingo_jax.data.world import video
  # pylint: enable=g-import-not-at-top
  rng = np.random.default_rng(CORPUS_SEED)
  yield PROMPT_TEXT
  for _ in range(num_scenes):
    scene = scenes.sample_scene(rng)
    yield language.caption(scene, rng)
    qa = questions.question(scene, rng)
    yield f'Question: {qa.question} Answer: {qa.answer}'
  for _ in range(num_videos):
    yield video.caption(video.sample_video(rng), rng)
  for _ in range(num_documents):
    for chunk in documents.sample_document(rng).chunks:
      if 'text' in chunk:
        yield chunk['text']


def default_world_dir() -> str:
  """Where the embedded world's datasets go by default: ~/.cache/...world."""
  return os.path.join(os.path.expanduser('~'), '.cache', 'flamingo_jax',
                      'world')


def world_tokenizer_path(data_dir: str) -> str:
  """Where the world's tokenizer lives: one file per world version, since
  the corpus it is trained on changes with the world."""
  return fs.join(data_dir, f'tokenizer-{WORLD_VERSION}.model')


def _world_datasets(config: ml_collections.ConfigDict) -> dict[str, int]:
  """World builders the config reads -> their image size."""
  return {spec.builder: spec.image_size
          for spec in config.data.datasets.values()
          if spec.builder.startswith('world_')}


def ensure_data(config: ml_collections.ConfigDict) -> None:
  """Builds missing world datasets and trains a missing tokenizer."""
  from flamingo_jax.data import world  # pylint: disable=g-import-not-at-top
  data = config.data
  for name, image_size in sorted(_world_datasets(config).items()):
    if not world.make_builder(name, data.data_dir, data.sizes,
                              image_size).is_prepared():
      logging.info('Building the embedded world dataset %s (%s) in %s.',
                   name, data.sizes, data.data_dir)
      world.build_all(data.data_dir, data.sizes, datasets=[name],
                      image_size=image_size, log=logging.info)
  if not fs.exists(data.tokenizer):
    logging.info('Training a %d-piece tokenizer on the world corpus -> %s.',
                 data.vocab_size, data.tokenizer)
    fs.makedirs(fs.dirname(data.tokenizer) or '.')
    tokenizer_lib.Tokenizer.train(world_corpus(), data.vocab_size,
                                  path=data.tokenizer)
