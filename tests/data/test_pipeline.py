"""Input pipeline on the tiny embedded world: shapes, determinism, resume."""

import io

import ml_collections
import numpy as np
from PIL import Image
import pytest

from experiments import tiny
from flamingo_jax.data import pipeline
from flamingo_jax.data import prepare
from flamingo_jax.data import tokenizer as tokenizer_lib
from flamingo_jax.orchestration import recipe


@pytest.fixture(scope='module')
def config(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp('world')
  config = tiny.get_config('smoke')
  config.data.data_dir = str(data_dir)
  config.data.tokenizer = str(data_dir / 'tok.model')
  prepare.ensure_data(config)
  return config


def _batches(config, start, count):
  data = pipeline.make_train_data(config, start)
  return [next(data) for _ in range(count)], data


def test_batches_have_the_designed_shapes(config):
  (batches,), data = _batches(config, 0, 1)
  assert sorted(batches) == sorted(config.data.datasets)
  for name, batch in batches.items():
    spec = config.data.datasets[name]
    b, l, n = spec.batch_size, spec.seq_len, spec.max_media
    size = spec.image_size
    assert batch['tokens'].shape == (b, l) and batch['tokens'].dtype == np.int32
    assert batch['targets'].shape == (b, l)
    assert batch['loss_mask'].dtype == np.float32
    assert batch['media'].shape == (b, n, spec.frames, size, size, 3)
    assert batch['media'].dtype == np.uint8
    assert batch['media_mask'].shape == (b, n)
    assert batch['media_index'].max() <= n
    # Every referenced slot holds a real, non-blank medium.
    for row in range(b):
      for slot in np.unique(batch['media_index'][row]):
        if slot:
          assert batch['media_mask'][row, slot - 1]
          assert batch['media'][row, slot - 1].any()
  assert batches['video_pairs']['media'][:, 0, -1].any()  # Real last frames.
  assert data.stats() == {}


def test_lm_stage_reads_the_text_pages(config):
  stage = recipe.stage_config(config, 'lm')
  prepare.ensure_data(stage)
  (batches,), _ = _batches(stage, 0, 1)
  batch = batches['text']
  assert not batch['media_mask'].any() and not batch['media_index'].any()
  source = pipeline.open_source(stage.data.datasets.text, stage.data.data_dir,
                                stage.data.sizes)
  texts = [source[i]['text'].decode() for i in range(len(source))]
  tokenizer = tokenizer_lib.Tokenizer.load(config.data.tokenizer)
  for row in batch['tokens']:
    decoded = tokenizer.decode(row).replace(tokenizer_lib.EOC, '').strip()
    assert any(text.startswith(decoded[:60]) for text in texts), decoded


def test_resumed_iterator_gives_the_same_batches(config):
  straight, _ = _batches(config, 0, 3)
  resumed, data = _batches(config, 2, 1)
  for name in straight[2]:
    for key in pipeline.BATCH_KEYS:
      np.testing.assert_array_equal(straight[2][name][key],
                                    resumed[0][name][key])
  assert data.state() == {'next_step': 3}
  # Different steps really are different batches.
  assert not np.array_equal(straight[0]['pairs']['tokens'],
                            straight[1]['pairs']['tokens'])


def _png(array):
  out = io.BytesIO()
  Image.fromarray(array).save(out, format='PNG')
  return out.getvalue()


def test_corrupt_image_is_skipped_and_counted(config):
  tokenizer = tokenizer_lib.Tokenizer.load(config.data.tokenizer)
  spec = ml_collections.ConfigDict(dict(config.data.datasets.pairs.to_dict(),
                                        name='pairs'))
  good = {'image': _png(np.full([40, 64, 3], 200, np.uint8)),
          'caption': b'a red circle'}
  source = [good, {'image': b'not a png', 'caption': b'a blue square'},
            {'image': good['image'], 'caption': b'   '}]
  loader = pipeline.ExampleLoader(source, spec, tokenizer, seed=0,
                                  dataset_index=0)
  rows = [loader(i) for i in range(3 * 4)]
  skips = loader.skips()
  assert skips == {pipeline.CORRUPT_MEDIA: 4, 'empty_caption': 4}, skips
  kept = [r for r in rows if r['loss_mask'].any()]
  assert len(kept) == 4
  # Aspect kept: a 40x64 image fills 40 of 64 rows, the rest is padding.
  media = kept[0]['media'][0, 0]
  assert media[:40].min() == 200 and media[40:].max() == 0


def test_random_window_differs_by_step_and_resumes(config):
  tokenizer = tokenizer_lib.Tokenizer.load(config.data.tokenizer)
  spec = ml_collections.ConfigDict(dict(
      config.data.datasets.documents.to_dict(), name='documents',
      random_window=True, seq_len=16, max_media=2))
  texts, image = [], []
  for i in range(6):
    texts += ['', f' Part {i}: a red circle is next to a blue square.']
    image += [i, -1]
  document = {'chunks': {'text': texts, 'image': image},
              'images': [_png(np.full([8, 8, 3], 40 * i, np.uint8))
                         for i in range(6)]}
  loader = pipeline.ExampleLoader([document], spec, tokenizer, seed=0,
                                  dataset_index=0)
  # One example: position g (= step * B + row) is step g's read of it.
  rows = [loader(g) for g in range(8)]
  assert len({r['tokens'].tobytes() for r in rows}) > 4
  resumed = pipeline.ExampleLoader([document], spec, tokenizer, seed=0,
                                   dataset_index=0)
  for key in pipeline.BATCH_KEYS:
    np.testing.assert_array_equal(resumed(5)[key], rows[5][key])
  # The media follow the window: consecutive images of the document.
  for row in rows:
    values = [int(row['media'][slot, 0, 0, 0, 0])
              for slot in range(int(row['media_mask'].sum()))]
    assert values == list(range(values[0], values[0] + 40 * len(values),
                                40)) if values else True
  spec.random_window = False
  start = pipeline.ExampleLoader([document], spec, tokenizer, seed=0,
                                 dataset_index=0)
  assert len({start(g)['tokens'].tobytes() for g in range(4)}) == 1


def test_random_clip_differs_by_step_and_resumes(config):
  tokenizer = tokenizer_lib.Tokenizer.load(config.data.tokenizer)
  spec = ml_collections.ConfigDict(dict(
      config.data.datasets.video_pairs.to_dict(), name='video_pairs',
      random_clip=True))
  frames = [_png(np.full([8, 8, 3], 10 * i, np.uint8)) for i in range(12)]
  source = [{'video': frames, 'caption': b'a red circle moves'}]
  loader = pipeline.ExampleLoader(source, spec, tokenizer, seed=0,
                                  dataset_index=0)
  firsts = []
  for g in range(8):  # One example: position g is step g's read of it.
    clip = loader(g)['media'][0, :, 0, 0, 0]  # [T] each frame's value.
    np.testing.assert_array_equal(np.diff(clip.astype(int)), 10)  # In a row.
    firsts.append(int(clip[0]))
  assert len(set(firsts)) > 3
  resumed = pipeline.ExampleLoader(source, spec, tokenizer, seed=0,
                                   dataset_index=0)
  assert int(resumed(6)['media'][0, 0, 0, 0, 0]) == firsts[6]


def test_short_video_is_an_error():
  with pytest.raises(pipeline.MediaError, match='at least 4 frames; got 2'):
    pipeline.media_array(np.zeros([2, 8, 8, 3], np.uint8), 4, 8)


def test_a_document_reader_keeps_unsupervised_chunks():
  """A documents feature with 'supervised' (world_episodes) marks its
  unlearned text chunks; one without it (world_documents) learns all."""
  raw = {'images': ['a', 'b'],
         'chunks': {'text': [b'', b' red x.', b'', b'y.'],
                    'image': np.array([0, -1, 1, -1]),
                    'supervised': np.array([True, False, True, True])}}
  chunks, images = pipeline.read_document(raw)
  assert chunks == [{'image': 0}, {'text': ' red x.', 'supervised': False},
                    {'image': 1}, {'text': 'y.'}] and images == ['a', 'b']
  del raw['chunks']['supervised']
  chunks, _ = pipeline.read_document(raw)
  assert all('supervised' not in c for c in chunks)


def test_missing_dataset_names_the_command(tmp_path):
  config = tiny.get_config('smoke')
  spec = ml_collections.ConfigDict(dict(config.data.datasets.pairs.to_dict(),
                                        name='pairs'))
  with pytest.raises(FileNotFoundError, match='python -m flamingo_jax.data.world'):
    pipeline.open_source(spec, str(tmp_path), 'tiny')


class _LoggedPairs:
  """A pairs source of `size` one-pixel images that logs what is read."""

  def __init__(self, size):
    self.size, self.read = size, []

  def __len__(self):
    return self.size

  def __getitem__(self, index):
    self.read.append(index)
    return {'image': np.full([1, 1, 3], index, np.uint8), 'caption': b'x.'}


@pytest.mark.parametrize('in_memory', [True, False])
def test_each_epoch_reads_every_example_once_in_its_own_order(
    config, in_memory, monkeypatch):
  """The order is a pure function of (seed, dataset, epoch): two loaders
  read the same examples, each epoch a permutation, epochs differ; held in
  memory, or computed per index as for datasets too large for that."""
  if not in_memory:
    monkeypatch.setattr(pipeline, 'MAX_SHUFFLE_IN_MEMORY', 10)
  spec = pipeline.dataset_specs(config)['pairs']
  tokenizer = tokenizer_lib.Tokenizer.load(config.data.tokenizer)
  sources = [_LoggedPairs(50), _LoggedPairs(50)]
  loaders = [pipeline.ExampleLoader(s, spec, tokenizer, 0, 1) for s in sources]
  for position in range(100):
    loaders[0](position)
  for position in reversed(range(100)):  # Another order of the same calls.
    loaders[1](position)
  first, second = sources[0].read[:50], sources[0].read[50:]
  assert sorted(first) == sorted(second) == list(range(50))
  assert first != second
  assert sources[1].read[::-1] == sources[0].read
