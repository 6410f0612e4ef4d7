"""Evaluation tasks: formats, and the nonce-word episodes' bindings."""

import numpy as np
import pytest

from flamingo_jax.data.world import language
from flamingo_jax.data.world import nonce
from flamingo_jax.data.world import questions
from flamingo_jax.data.world import scenes
from flamingo_jax.data.world import tasks


def _rng(index, split='query'):
  return scenes.example_rng('test_tasks', split, index)


def _episodes(num):
  return [tasks.nonce_episode(_rng(i), 32) for i in range(num)]


def _binding(episode):
  """word -> values it names, over support and query."""
  binding = {}
  for item in episode['support'] + episode['query']:
    binding.setdefault(item['word'], set()).add(item['value'])
  return binding


def test_nonce_words_bind_consistently_within_an_episode():
  for episode in _episodes(30):
    binding = _binding(episode)
    assert sorted(binding) == sorted(episode['words'])
    assert all(len(values) == 1 for values in binding.values())
    values = [v for vs in binding.values() for v in vs]
    assert len(set(values)) == len(values) == tasks.NONCE_WAYS
    assert set(values) <= set(scenes.VALUES[episode['attribute']])
    support_words = [item['word'] for item in episode['support']]
    for word in episode['words']:
      assert support_words.count(word) == tasks.NONCE_SHOTS
    for item in episode['support'] + episode['query']:
      assert item['text'] == episode['template'].format(item['word'])
      assert item['image'].shape == (32, 32, 3)
    assert len(episode['query']) == tasks.NONCE_QUERIES
    # Every query word was shown in the support: solvable in context.
    assert {item['word'] for item in episode['query']} <= set(support_words)


def test_nonce_bindings_change_across_episodes():
  episodes = _episodes(30)
  word_sets = {tuple(sorted(e['words'])) for e in episodes}
  assert len(word_sets) == len(episodes)
  values_of = {}
  for episode in episodes:
    for word, (value,) in _binding(episode).items():
      values_of.setdefault(word, set()).add(value)
  assert len(values_of) > 60  # Fresh words in (almost) every episode.
  assert {e['attribute'] for e in episodes} == set(nonce.ATTRIBUTES)


def test_nonce_words_are_not_vocabulary():
  rng = np.random.default_rng(0)
  for _ in range(500):
    word = nonce.word(rng)
    assert word.isalpha() and len(word) >= 3
    assert not language.parse(f'a {word}').phrases  # Not a shape noun.
    assert all(t[0] == 'word' for t in language.lex(word)), word


def test_nonce_colour_queries_show_their_colour():
  for episode in _episodes(30):
    if episode['attribute'] != 'colour':
      continue
    for item in episode['query']:
      # Only pixels within colour jitter of a named colour: not the
      # background, the darker pattern or anti-aliased edges.
      pixels = item['image'].reshape(-1, 1, 3).astype(float)
      table = np.array(list(scenes.COLOURS.values()), float)  # [8, 3]
      distance = np.linalg.norm(pixels - table[None], axis=-1)  # [P, 8]
      close = distance.min(-1) < 2 * scenes.COLOUR_JITTER
      names = np.array(scenes.COLOUR_NAMES)[distance.argmin(-1)[close]]
      assert close.any()
      values, counts = np.unique(names, return_counts=True)
      assert values[counts.argmax()] == item['value']


def test_classification_examples():
  assert len(set(tasks.CLASS_NAMES)) == len(scenes.SHAPES) * len(
      scenes.COLOUR_NAMES)
  labels = set()
  for i in range(40):
    ex = tasks.classification_example(_rng(i, 'cls'), 32)
    assert tasks.CLASS_NAMES[ex['label']] == ex['label_name']
    assert ex['image'].shape == (32, 32, 3)
    labels.add(ex['label'])
  assert len(labels) > 20


def test_caption_and_vqa_examples():
  ex = tasks.caption_example(_rng(0), 32)
  assert len(ex['captions']) == tasks.NUM_CAPTIONS
  assert all(isinstance(c, str) and c.endswith('.') for c in ex['captions'])
  ex = tasks.vqa_example(_rng(1), 32)
  assert len(ex['answers']) == tasks.NUM_ANSWERS
  assert ex['answers'].count(ex['answer']) >= 3
  assert ex['question'].endswith('?')
  assert ex['question_type'] in questions.QUESTION_TYPES


def test_video_and_document_examples():
  ex = tasks.video_qa_example(_rng(2), 32, num_frames=4)
  assert ex['video'].shape == (4, 32, 32, 3)
  ex = tasks.document_example(_rng(3), 32)
  num_images = ex['images'].shape[0]
  assert ex['images'].shape[1:] == (32, 32, 3)
  assert sorted(c['image'] for c in ex['chunks'] if 'image' in c) == list(
      range(num_images))


def test_bad_episode_arguments_raise():
  with pytest.raises(ValueError, match='ways'):
    tasks.nonce_episode(_rng(0), 32, ways=0)
  with pytest.raises(ValueError, match='shots'):
    tasks.nonce_episode(_rng(0), 32, shots=0)
