"""Bursty nonce episodes (training): structure, fresh words, disjointness."""

import collections

import numpy as np
import pytest

from flamingo_jax.data import formatting
from flamingo_jax.data.world import nonce
from flamingo_jax.data.world import scenes
from flamingo_jax.data.world import tasks


def _rng(index, name='test_episodes'):
  return scenes.example_rng(name, 'train', index)


def _episodes(num):
  return [nonce.episode(_rng(i)) for i in range(num)]


def test_every_picture_is_named_by_the_word_of_its_value():
  for ep in _episodes(40):
    binding = ep.binding
    assert len(set(binding.words)) == len(binding.words)
    assert len(set(binding.values)) == len(binding.values)
    assert len(ep.order) == len(ep.scenes) == len(ep.texts())
    assert ep.template in nonce.TEMPLATES[binding.attribute]
    for way, scene, text in zip(ep.order, ep.scenes, ep.texts()):
      (obj,) = scene.objects
      assert getattr(obj, binding.attribute) == binding.values[way]
      assert text == ep.template.format(binding.words[way])


def test_episodes_are_bursty():
  sizes, ways = set(), set()
  for ep in _episodes(60):
    n, k = len(ep.order), len(ep.binding.words)
    sizes.add(n)
    ways.add(k)
    assert nonce.EPISODE_MIN_IMAGES <= n <= nonce.EPISODE_MAX_IMAGES
    counts = collections.Counter(ep.order)
    # Every word is shown, and shown again: after its first showing it can
    # only be predicted from the earlier picture of the same value.
    assert set(counts) == set(range(k))
    assert min(counts.values()) >= 2
  assert ways == set(nonce.EPISODE_WAYS)
  assert len(sizes) >= 4


def test_fresh_words_per_episode():
  words = [w for ep in _episodes(200) for w in ep.binding.words]
  assert len(set(words)) == len(words)


def test_training_and_evaluation_words_are_disjoint():
  train = {w for ep in _episodes(300) for w in ep.binding.words}
  evaluation = set()
  for i in range(300):
    episode = tasks.nonce_episode(scenes.example_rng('world_nonce', 'query',
                                                     i), 16)
    evaluation.update(episode['words'])
  assert {nonce.word_half(w) for w in train} == {'train'}
  assert {nonce.word_half(w) for w in evaluation} == {'eval'}
  assert not train & evaluation
  # The halves split the word space about evenly.
  rng = np.random.default_rng(0)
  halves = collections.Counter(nonce.word_half(nonce.word(rng))
                               for _ in range(400))
  assert 150 < halves['eval'] < 250


def test_episode_document_is_the_evaluation_format():
  """'<image>This is a dax.<EOC><image>...': the few-shot prompt's layout."""
  example = tasks.episode_example(_rng(3), 16)
  chunks = example['chunks']
  n = len(example['images'])
  assert example['images'].shape == (n, 16, 16, 3)
  assert [c.get('image') for c in chunks[::2]] == list(range(n))
  texts = [c['text'] for c in chunks[1::2]]
  assert len(texts) == n and all(t.endswith(('.', '!')) for t in texts)

  class Ids:  # A character tokenizer with the markers' ids.
    bos_id, eos_id, image_id, eoc_id, pad_id = 1, 2, 3, 4, 0

    def encode(self, text, parse_markers=False):
      del parse_markers
      return [100 + ord(c) for c in text]

  out = formatting.format_document(chunks, Ids(), seq_len=512, max_media=n)
  ids = out['tokens'][out['tokens'] > 0]
  assert ids[0] == Ids.bos_id and ids[1] == Ids.image_id
  assert (ids == Ids.image_id).sum() == n
  # Every image but the first follows an <EOC>.
  before = ids[np.nonzero(ids == Ids.image_id)[0][1:] - 1]
  assert (before == Ids.eoc_id).all()


def test_episode_text_puts_each_pictures_key_where_its_marker_sits():
  """'circle This is a dax.': a picture's line in the text starts with its
  key (the value its word is bound to), then the picture's own line."""
  attributes = set()
  for ep in _episodes(60):
    binding = ep.binding
    attributes.add(binding.attribute)
    lines = ep.keyed_texts()
    assert nonce.episode_text(ep) == ' '.join(lines)
    for line, plain, way in zip(lines, ep.texts(), ep.order):
      key, rest = line.split(' ', 1)
      assert key == binding.values[way] and rest == plain
      prompt = nonce.keyed_prompt(ep.template, key)
      assert line == f'{prompt} {binding.words[way]}' + line[-1]
  assert attributes == set(nonce.ATTRIBUTES)


def test_a_share_of_episode_text_keys_each_word_right_before_it():
  """'This is a circle dax.': the scaffold's lines are the pictures' lines
  with the key inserted before the word; about ADJACENT_SHARE of the
  examples are written so, the rest line-keyed."""
  for ep in _episodes(20):
    for line, plain, way in zip(ep.adjacent_texts(), ep.texts(), ep.order):
      word, key = ep.binding.words[way], ep.binding.values[way]
      assert line == plain.replace(word, f'{key} {word}')
    assert nonce.episode_text(ep, adjacent=True) == ' '.join(
        ep.adjacent_texts())
  kinds = []
  for seed in range(200):
    text = tasks.episode_text_example(_rng(seed))['text']
    ep = nonce.episode(_rng(seed))
    adjacent = text == nonce.episode_text(ep, adjacent=True)
    assert adjacent or text == nonce.episode_text(ep)
    kinds.append(adjacent)
  assert abs(np.mean(kinds) - nonce.ADJACENT_SHARE) < 0.1


def test_image_episodes_key_each_words_first_showing_in_words():
  """' circle This is a dax.' at a word's first picture, the evaluation's
  plain line at every later one, whose word the earlier keyed line names:
  the later picture's key is what binds it."""
  repeats = 0
  for ep in _episodes(40):
    keyed_by_word = {}
    for line, text, way in zip(ep.first_keyed_texts(), ep.texts(), ep.order):
      word, key = ep.binding.words[way], ep.binding.values[way]
      if word in keyed_by_word:
        assert line == text and key not in line.split()
        assert keyed_by_word[word] == f' {key} {text}'
        repeats += 1
      else:
        assert line == ' ' + nonce.keyed_line(ep.template, key, word)
        keyed_by_word[word] = line
  assert repeats > 40
  ep = nonce.episode(_rng(0))
  learned = tasks.episode_example(_rng(0), 16, learn_first_showings=True)
  assert [c['text'] for c in learned['chunks'][1::2]] == (
      ep.first_keyed_texts())
  assert all('supervised' not in c for c in learned['chunks'])
  # Not learned: a word's first line is read only, later ones are learned.
  lines = tasks.episode_example(_rng(0), 16, learn_first_showings=False)[
      'chunks'][1::2]
  assert [c['text'] for c in lines] == ep.first_keyed_texts()
  firsts = [way not in ep.order[:i] for i, way in enumerate(ep.order)]
  assert [c.get('supervised', True) for c in lines] == [
      not first for first in firsts]
  assert any(firsts) and not all(firsts)


def test_bad_episode_arguments_raise():
  with pytest.raises(ValueError, match='one picture per word'):
    nonce.episode(_rng(0), ways=3, num_images=2)
  with pytest.raises(ValueError, match='word half'):
    nonce.word(_rng(0), half='test')
