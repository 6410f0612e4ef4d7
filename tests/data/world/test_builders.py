"""TFDS builders: tiny datasets build, read back and match the generators."""

import os
import pathlib
import subprocess
import sys
import warnings

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from flamingo_jax.data import pipeline
from flamingo_jax.data.world import build
from flamingo_jax.data.world import builders
from flamingo_jax.data.world import scenes
from flamingo_jax.data.world import tasks

_REPO = pathlib.Path(__file__).resolve().parents[3]
_FINGERPRINT_FILE = pathlib.Path(__file__).parent / 'testdata' / (
    'fingerprint.txt')

# name -> (splits, feature keys) of every dataset.
EXPECTED = {
    'world_pairs': ({'train', 'validation'}, {'image', 'caption'}),
    'world_video_pairs': ({'train', 'validation'}, {'video', 'caption'}),
    'world_documents': ({'train', 'validation'}, {'images', 'chunks'}),
    'world_text': ({'train', 'validation'}, {'text'}),
    'world_episodes': ({'train', 'validation'}, {'images', 'chunks'}),
    'world_episode_text': ({'train', 'validation'}, {'text'}),
    'world_captions': ({'support', 'query'}, {'image', 'captions'}),
    'world_vqa': ({'support', 'query'},
                  {'image', 'question', 'answer', 'answers',
                   'question_type'}),
    'world_video_qa': ({'support', 'query'},
                       {'video', 'question', 'answer', 'question_type'}),
    'world_video_captions': ({'support', 'query'}, {'video', 'captions'}),
    'world_classification': ({'support', 'query'},
                             {'image', 'label', 'label_name'}),
    'world_nonce': ({'query'}, {'support', 'query', 'words', 'attribute',
                                'template'}),
}


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp('world')
  built = build.build_all(data_dir, 'tiny', num_workers=1,
                             log=lambda line: None)
  return data_dir, built


def test_every_dataset_builds_with_its_splits_and_features(tiny):
  data_dir, built = tiny
  assert set(built) == set(EXPECTED) == set(builders.DATASETS)
  for name, (splits, keys) in EXPECTED.items():
    builder = built[name]
    sizes = builders.builder_class(name).SPLITS['tiny']
    assert set(builder.info.splits) == splits == set(sizes)
    for split in splits:
      assert builder.info.splits[split].num_examples == sizes[split]
      source = build.make_builder(name, data_dir, 'tiny').as_data_source(
          split=split)
      examples = [source[i] for i in range(len(source))]
      assert len(examples) == sizes[split]
      assert set(examples[0]) == keys | {'id'}
      assert sorted(e['id'] for e in examples) == list(range(sizes[split]))


def test_feature_shapes(tiny):
  _, built = tiny

  def first(name, split):
    return built[name].as_data_source(split=split)[0]

  ex = first('world_pairs', 'train')
  assert ex['image'].shape == (64, 64, 3) and ex['image'].dtype == np.uint8
  assert ex['caption'].decode().endswith('.')
  ex = first('world_video_pairs', 'train')
  assert np.shape(ex['video']) == (8, 64, 64, 3)
  ex = first('world_documents', 'train')
  num_images = len(ex['images'])
  chunk_images = np.asarray(ex['chunks']['image'])
  image_chunks = chunk_images[chunk_images >= 0]
  assert list(image_chunks) == list(range(num_images))
  for text, image in zip(ex['chunks']['text'], ex['chunks']['image']):
    assert (text == b'') == (image >= 0)
  ex = first('world_text', 'train')
  assert ex['text'].decode().strip() and '<image>' not in ex['text'].decode()
  ex = first('world_vqa', 'query')
  assert np.shape(ex['answers']) == (tasks.NUM_ANSWERS,)
  ex = first('world_captions', 'query')
  assert np.shape(ex['captions']) == (tasks.NUM_CAPTIONS,)
  info = built['world_classification'].info
  assert info.features['label'].names == list(tasks.CLASS_NAMES)
  ex = first('world_nonce', 'query')
  assert np.shape(ex['support']['image']) == (
      tasks.NONCE_WAYS * tasks.NONCE_SHOTS, 64, 64, 3)
  assert np.shape(ex['query']['word']) == (tasks.NONCE_QUERIES,)


def _stored(built, name, split):
  """A built dataset's examples of one split, by their id."""
  source = built[name].as_data_source(split=split)
  return {int(e['id']): e for e in (source[i] for i in range(len(source)))}


def test_stored_examples_are_the_generated_ones(tiny):
  _, built = tiny
  stored = _stored(built, 'world_pairs', 'validation')
  for index in (0, 5):
    expected = tasks.pair_example(
        scenes.example_rng('world_pairs', 'validation', index), 64)
    np.testing.assert_array_equal(stored[index]['image'], expected['image'])
    assert stored[index]['caption'].decode() == expected['caption']


def test_stored_episodes_read_back_as_generated(tiny):
  """world_episodes stores which lines are learned; the pipeline's reader
  gives format_document the generated chunks."""
  _, built = tiny
  stored = _stored(built, 'world_episodes', 'train')
  for index in (0, 3):
    expected = tasks.episode_example(
        scenes.example_rng('world_episodes', 'train', index), 64)
    chunks, images = pipeline.read_document(stored[index])
    assert chunks == expected['chunks']
    np.testing.assert_array_equal(np.stack(images), expected['images'])


def test_images_are_stored_as_png(tiny):
  _, built = tiny
  feature = built['world_captions'].info.features['image']
  assert feature.encoding_format == 'png'
  png = feature.encode_example(np.zeros([64, 64, 3], np.uint8))
  np.testing.assert_array_equal(tf.io.decode_png(png), 0)


def test_metadata_records_the_fingerprint(tiny):
  data_dir, _ = tiny
  builder = tfds.builder('world_nonce/tiny', data_dir=data_dir)
  assert builder.info.metadata['generation_fingerprint'] == (
      builders.generation_fingerprint())


def test_other_resolution_and_custom_split_sizes(tmp_path):
  builder = build.make_builder('world_classification', tmp_path, 'tiny',
                                  image_size=32, split_sizes={'query': 3})
  builder.download_and_prepare()
  assert builder.info.splits['query'].num_examples == 3
  assert builder.info.splits['support'].num_examples == 8
  ex = next(iter(tfds.as_numpy(builder.as_dataset(split='query'))))  # tfrecord
  assert ex['image'].shape == (32, 32, 3)


def test_parallel_generation_matches_sequential(tmp_path):
  builder = build.make_builder('world_captions', tmp_path, 'tiny')
  generate = builder._generate_examples  # pylint: disable=protected-access
  sequential = list(generate('support', 6))
  builder.num_workers = 2
  builder.PARALLEL_MIN_EXAMPLES = 0
  with warnings.catch_warnings():
    # JAX (imported by conftest) warns at every fork; the workers never
    # touch JAX.
    warnings.simplefilter('ignore', RuntimeWarning)
    parallel = list(generate('support', 6))
  assert parallel == sequential


def test_version_pins_the_generation_fingerprint():
  pinned = _FINGERPRINT_FILE.read_text().split()
  current = [str(builders.VERSION), builders.generation_fingerprint()]
  assert current == pinned, (
      'Generation changed. If on purpose: bump prepare.WORLD_VERSION (and '
      f'base.RELEASE_NOTES) and write "{current[0]} {current[1]}" into '
      f'{_FINGERPRINT_FILE}.')


def test_fingerprint_sees_generation_constants(monkeypatch):
  before = builders.generation_fingerprint()
  monkeypatch.setitem(scenes.COLOURS, 'red', (200, 0, 0))
  builders.generation_fingerprint.cache_clear()
  try:
    assert builders.generation_fingerprint() != before
  finally:
    monkeypatch.undo()
    builders.generation_fingerprint.cache_clear()
  assert builders.generation_fingerprint() == before


@pytest.mark.parametrize('kwargs, match', [
    (dict(sizes='huge'), 'Unknown sizes'),
    (dict(datasets=['world_pears']), 'Unknown world dataset'),
    (dict(num_workers=0), 'num_workers'),
])
def test_build_all_rejects_bad_arguments(tmp_path, kwargs, match):
  with pytest.raises(ValueError, match=match):
    build.build_all(tmp_path, **{'sizes': 'tiny', **kwargs})


@pytest.mark.parametrize('kwargs, match', [
    (dict(split_sizes={'train': 0}), 'positive'),
    (dict(split_sizes={'train': -3}), 'positive'),
    (dict(image_size=8), 'image_size'),
    (dict(num_frames=1), 'num_frames'),
])
def test_config_rejects_bad_values(tmp_path, kwargs, match):
  with pytest.raises(ValueError, match=match):
    build.make_builder('world_pairs', tmp_path, 'tiny', **kwargs)


def test_unknown_split_override_raises(tmp_path):
  builder = build.make_builder('world_pairs', tmp_path, 'tiny',
                                  split_sizes={'test': 4})
  with pytest.raises(ValueError, match='Unknown split'):
    builder.download_and_prepare()


def test_command_line(tmp_path):
  env = dict(os.environ, PYTHONPATH=str(_REPO), JAX_PLATFORMS='cpu')
  result = subprocess.run(
      [sys.executable, '-m', 'flamingo_jax.data.world', '--data_dir',
       str(tmp_path), '--sizes', 'tiny', '--datasets', 'world_nonce'],
      cwd=_REPO, env=env, capture_output=True, text=True, timeout=120,
      check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  assert '[1/1] world_nonce/tiny (query 4)' in result.stdout
  assert (tmp_path / 'world_nonce' / 'tiny' / str(builders.VERSION) /
          'dataset_info.json').exists()


def test_a_build_waits_for_another_and_reads_its_dataset(tmp_path):
  """Runs that start together build a dataset once: a second build_all
  waits on the build lock while another builds (simulated here: this test
  holds the lock and builds), then reads that dataset instead of renaming
  its own onto it (before: FileExistsError)."""
  import threading  # pylint: disable=g-import-not-at-top
  other = build.make_builder('world_nonce', tmp_path, 'tiny')
  result = {}

  def second():
    try:
      result['built'] = build.build_all(
          tmp_path, 'tiny', datasets=['world_nonce'], num_workers=1,
          log=lambda line: None)
    except Exception as e:  # pylint: disable=broad-exception-caught
      result['error'] = e

  with build._build_lock(str(tmp_path), other):  # pylint: disable=protected-access
    thread = threading.Thread(target=second)
    thread.start()
    build._prepare(other)  # pylint: disable=protected-access
    thread.join(timeout=3)
    assert thread.is_alive()  # Waiting for the lock, not building.
  thread.join(timeout=60)
  assert 'error' not in result, result.get('error')
  builder = result['built']['world_nonce']
  assert builder.info.splits['query'].num_examples == 4
