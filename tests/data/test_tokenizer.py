"""Tokenizer: training, special ids, markers, round trips, loading, errors."""

import pickle
import random
import sys

import numpy as np
import pytest
import sentencepiece as spm

from flamingo_jax.data import tokenizer as tokenizer_lib
from tests import fake_gcs

VOCAB_SIZE = 512


def make_corpus(num_texts: int = 2000, seed: int = 0) -> list[str]:
  """Sentences of the test vocabulary and ~300 made-up words (seeded)."""
  rng = random.Random(seed)
  syllables = ['ka', 'lo', 'mi', 'ten', 'ra', 'su', 've', 'dor', 'pin', 'gal',
               'bu', 'ne', 'tor', 'is', 'an', 'el']
  words = ('this is a picture of my dog cat puppy sitting in the grass cute '
           'pics pets output question answer what colour').split()
  words += [''.join(rng.choice(syllables) for _ in range(rng.randint(1, 3)))
            for _ in range(300)]
  return [' '.join(rng.choice(words) for _ in range(rng.randint(4, 15)))
          .capitalize() + '.' for _ in range(num_texts)]


def train_tiny_tokenizer(path: str | None = None) -> tokenizer_lib.Tokenizer:
  return tokenizer_lib.Tokenizer.train(make_corpus(), VOCAB_SIZE, path=path)


@pytest.fixture(scope='module')
def model_path(tmp_path_factory) -> str:
  path = str(tmp_path_factory.mktemp('tokenizer') / 'sub' / 'tiny.model')
  train_tiny_tokenizer(path)
  return path


@pytest.fixture(scope='module')
def tok(model_path) -> tokenizer_lib.Tokenizer:
  return tokenizer_lib.Tokenizer.load(model_path)


def test_special_ids(tok):
  assert tok.vocab_size == VOCAB_SIZE
  assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id, tok.image_id) == (
      0, 1, 2, 3, 4)
  assert tok.eoc_id == VOCAB_SIZE == tok.vocab_size
  assert tok.id_to_piece(tok.image_id) == '<image>'
  assert tok.id_to_piece(tok.eoc_id) == '<EOC>'


def test_eoc_is_not_a_sentencepiece_piece(tok):
  sp = spm.SentencePieceProcessor(model_proto=tok.serialized_model)
  assert sp.vocab_size() == tok.eoc_id  # Ids 0..vocab_size-1 only.
  assert sp.piece_to_id('<EOC>') == sp.unk_id()


def test_image_is_one_plain_token(tok):
  assert tok.encode('<image>') == [tok.image_id]
  ids = tok.encode('my dog<image>my cat')
  assert ids == tok.encode('my dog') + [tok.image_id] + tok.encode('my cat')


def test_eoc_in_text_becomes_eoc_id(tok):
  ids = tok.encode('my dog<EOC>my cat<EOC>')
  assert ids == tok.encode('my dog') + [512] + tok.encode('my cat') + [512]
  assert tok.decode(ids) == 'my dog<EOC>my cat<EOC>'


@pytest.mark.parametrize('text', [
    'This is a picture of my dog.',
    ' leading space, double  spaces and trailing ',
    'line one\nline two\ttab',
    'ünïcödé and emoji 🐶, digits 12345',
    '<image>Output: a cute puppy.<EOC><image>Output:',
    '',
])
def test_round_trip(tok, text):
  ids = tok.encode(text)
  assert all(0 <= i <= tok.eoc_id for i in ids)
  assert tok.unk_id not in ids  # Byte fallback covers any character.
  assert tok.decode(ids) == text


def test_whitespace_is_significant(tok):
  assert tok.encode(' my dog') != tok.encode('my dog')
  assert tok.decode(tok.encode(' my dog')) == ' my dog'


def test_plain_mode_never_makes_markers(tok):
  text = 'a literal <image> and a literal <EOC> in a web page'
  ids = tok.encode(text, parse_markers=False)
  assert tok.image_id not in ids and tok.eoc_id not in ids
  assert tok.decode(ids) == text


def test_decode_stops_at_nothing(tok):
  dog, cat = tok.encode('my dog'), tok.encode('my cat')
  ids = [tok.bos_id, *dog, tok.eoc_id, tok.eos_id, *cat, tok.pad_id]
  assert tok.decode(np.array(ids, np.int32)) == 'my dog<EOC>my cat'


def test_decode_rejects_unknown_ids(tok):
  with pytest.raises(ValueError, match='513 is outside'):
    tok.decode([2, 513])


def test_save_load_and_pickle(tok, tmp_path):
  path = str(tmp_path / 'copy.model')
  tok.save(path)
  for other in (tokenizer_lib.Tokenizer.load(path),
                pickle.loads(pickle.dumps(tok))):
    assert other.serialized_model == tok.serialized_model
    assert other.encode('my dog<EOC>') == tok.encode('my dog<EOC>')


def test_training_is_deterministic(tok):
  assert train_tiny_tokenizer().serialized_model == tok.serialized_model


def test_missing_file_names_the_path(tmp_path):
  path = str(tmp_path / 'nowhere' / 'missing.model')
  with pytest.raises(FileNotFoundError, match='nowhere/missing.model'):
    tokenizer_lib.Tokenizer.load(path)


def test_not_a_model_names_the_path(tmp_path):
  path = tmp_path / 'junk.model'
  path.write_bytes(b'not a sentencepiece model')
  with pytest.raises(ValueError, match='junk.model is not a valid'):
    tokenizer_lib.Tokenizer.load(str(path))


def test_remote_paths_go_through_the_filesystem_layer(tok):
  # flamingo_jax.fs -> etils.epath; its gs:// backend (tf.io.gfile on a pod)
  # is tests/fake_gcs.py's in-memory bucket here.
  fake = fake_gcs.FakeGcs()
  try:
    with fake_gcs.install_epath_backend(fake.backend):
      tok.save('gs://bucket/tok/tiny.model')
      assert fake.store.get('bucket', 'tok/tiny.model')[0] == (
          tok.serialized_model)
      loaded = tokenizer_lib.Tokenizer.load('gs://bucket/tok/tiny.model')
      assert loaded.encode('my dog') == tok.encode('my dog')
      with pytest.raises(FileNotFoundError,
                         match='gs://bucket/tok/other.model'):
        tokenizer_lib.Tokenizer.load('gs://bucket/tok/other.model')
  finally:
    fake.close()


def test_remote_path_without_tensorflow(monkeypatch):
  monkeypatch.setitem(sys.modules, 'tensorflow', None)  # import fails.
  with pytest.raises(ImportError, match='gs://bucket/tiny.model'):
    tokenizer_lib.Tokenizer.load('gs://bucket/tiny.model')


def test_vocab_too_small_for_corpus():
  with pytest.raises(ValueError, match='vocab_size=200 is too small'):
    tokenizer_lib.Tokenizer.train(make_corpus(200), 200)


def test_vocab_too_large_for_corpus():
  with pytest.raises(ValueError, match='vocab_size=4000 is too large'):
    tokenizer_lib.Tokenizer.train(make_corpus(200), 4000)


def test_no_training_text():
  with pytest.raises(ValueError, match='no training text'):
    tokenizer_lib.Tokenizer.train([], VOCAB_SIZE)


def test_fixed_options_cannot_be_overridden():
  with pytest.raises(ValueError, match=r"\['pad_id'\] are fixed"):
    tokenizer_lib.Tokenizer.train(make_corpus(), VOCAB_SIZE, pad_id=5)


def test_model_without_image_piece_is_rejected(tmp_path):
  path = str(tmp_path / 'plain')
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(make_corpus()), model_prefix=path,
      vocab_size=300, pad_id=0, unk_id=1, bos_id=2, eos_id=3, minloglevel=2)
  with pytest.raises(ValueError, match='no user-defined <image> piece'):
    tokenizer_lib.Tokenizer.load(path + '.model')
