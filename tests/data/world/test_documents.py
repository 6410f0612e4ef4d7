"""Documents: valid chunks, and text that describes the right image."""

import collections
import re

import pytest

from flamingo_jax.data.world import documents
from flamingo_jax.data.world import language
from flamingo_jax.data.world import questions
from flamingo_jax.data.world import scenes
from flamingo_jax.data.world import tasks


def _documents(num, kind=None):
  for index in range(num):
    yield documents.sample_document(
        scenes.example_rng('test_documents', 'train', index), kind=kind)


def _check_facts(sentence, scene):
  parsed = language.parse(sentence)
  assert parsed.phrases, sentence
  for phrase in parsed.phrases:
    assert phrase.count == phrase.desc.count(scene.objects), sentence


def test_chunks_reference_every_image_once_in_order():
  for doc in _documents(200):
    images = [c['image'] for c in doc.chunks if 'image' in c]
    assert images == list(range(len(doc.scenes)))
    for chunk in doc.chunks:
      assert set(chunk) in ({'text'}, {'image'}), chunk
      if 'text' in chunk:
        assert chunk['text'].strip()
    kinds = ['image' if 'image' in c else 'text' for c in doc.chunks]
    assert all(a != b or a == 'image' for a, b in zip(kinds, kinds[1:]))


def test_descriptions_sit_next_to_their_image_and_are_true():
  sides = collections.Counter()
  for doc in _documents(200, 'article'):
    image_chunk = {c['image']: k for k, c in enumerate(doc.chunks)
                   if 'image' in c}
    for i, (chunk, side, sentence) in enumerate(doc.references):
      expected = image_chunk[i] + (1 if side == 'above' else -1)
      assert chunk == expected
      assert sentence in doc.chunks[chunk]['text']
      words = sentence.lower()
      # 'above' may also be a relation inside the description.
      if side == 'above':
        assert not words.startswith(('the next', 'the following', 'below'))
      else:
        assert not words.startswith(('the picture above', 'above:'))
      _check_facts(sentence, doc.scenes[i])
      sides[side] += 1
  assert sides['above'] > 2 * sides['below'] > 0


def test_page_shapes_vary():
  docs = list(_documents(300, 'article'))
  counts = collections.Counter(len(d.scenes) for d in docs)
  assert set(range(1, 6)) <= set(counts)
  assert max(counts) <= documents.MAX_IMAGES_RARE
  assert sum(n for k, n in counts.items() if k > documents.MAX_IMAGES) > 3
  image_first = sum('image' in d.chunks[0] for d in docs)
  assert 10 < image_first < 60
  texts_after_image = [d.chunks[k + 1]['text'] for d in docs
                       for k, c in enumerate(d.chunks[:-1])
                       if 'image' in c and 'text' in d.chunks[k + 1]]
  spaced = sum(t.startswith(' ') for t in texts_after_image)
  assert 0.3 < spaced / len(texts_after_image) < 0.7


def test_articles_have_a_theme():
  for doc in _documents(50, 'article'):
    colours = set.intersection(*({o.colour for o in s.objects}
                                 for s in doc.scenes))
    shapes = set.intersection(*({o.shape for o in s.objects}
                                for s in doc.scenes))
    assert colours or shapes


def test_bad_arguments_raise():
  with pytest.raises(ValueError, match='num_images'):
    documents.sample_document(scenes.example_rng('x', 'y', 0), num_images=0)
  with pytest.raises(ValueError, match='Unknown page kind'):
    documents.sample_document(scenes.example_rng('x', 'y', 0), kind='blog')


@pytest.mark.parametrize('shares', [None, documents.TEXT_PAGE_KINDS])
def test_page_kinds_come_in_their_shares(shares):
  counts = collections.Counter(
      documents.sample_document(scenes.example_rng('shares', 'train', i),
                                shares=shares).kind for i in range(1000))
  shares = shares or documents.PAGE_KINDS
  assert set(counts) == set(shares)
  for kind, share in shares.items():
    assert abs(counts[kind] / 1000 - share) < 0.05, counts


def test_text_pages_are_the_pages_text_alone():
  kinds = set()
  for index in range(20):
    text = tasks.text_example(scenes.example_rng('t', 'train', index))['text']
    doc = documents.sample_document(scenes.example_rng('t', 'train', index),
                                    shares=documents.TEXT_PAGE_KINDS)
    kinds.add(doc.kind)
    pieces = [c['text'].strip() for c in doc.chunks if 'text' in c]
    assert text == ' '.join(pieces)
    assert '  ' not in text and text == text.strip()
  assert kinds >= {'words', 'article'}


def _lines(doc):
  """The line right after each image, as the reference map records it."""
  image_chunk = {c['image']: k for k, c in enumerate(doc.chunks)
                 if 'image' in c}
  for i, (chunk, side, line) in enumerate(doc.references):
    assert side == 'above' and chunk == image_chunk[i] + 1
    assert doc.chunks[chunk]['text'].strip() == line  # Nothing else.
    yield doc.scenes[i], line


_QA = re.compile(r'Question: (.+?\?) Answer: ([a-z0-9]+(?: [a-z]+)?)'
                 r'(?= Question:|$)')
_ANSWERS = {a for space in questions._ANSWER_SPACES.values() for a in space}


def test_quiz_pages_ask_in_the_few_shot_format():
  asked = collections.Counter()
  for doc in _documents(60, 'quiz'):
    assert len(doc.scenes) >= 2
    for scene, line in _lines(doc):
      pairs = _QA.findall(line)
      assert 1 <= len(pairs) <= 2, line
      assert ' '.join(f'Question: {q} Answer: {a}' for q, a in pairs) == line
      for _, answer in pairs:
        assert answer.isdigit() or answer in _ANSWERS, line
        if answer.isdigit():
          assert int(answer) <= len(scene.objects), line
      asked[len(pairs)] += 1
  assert asked[1] > asked[2] > 0


def test_gallery_outputs_are_true():
  styles = collections.Counter()
  for doc in _documents(60, 'gallery'):
    for scene, line in _lines(doc):
      assert line.startswith('Output: '), line
      output = line.removeprefix('Output: ')
      focus = scene.objects[0]
      if output == f'{focus.colour} {focus.shape}':
        assert focus.size == 'large', line
        styles['label'] += 1
      else:
        _check_facts(output, scene)
        styles['caption'] += 1
  assert styles['label'] > 10 and styles['caption'] > 10


def test_words_pages_bind_fresh_words_and_reuse_them():
  all_words, listed = [], 0
  for doc in _documents(60, 'words'):
    binding = doc.binding
    # The words are often listed before the first picture.
    preface = doc.chunks[0]['text']
    listed += all(word in preface for word in binding.words)
    assert len(set(binding.words)) == len(binding.words) in documents.WORDS_WAYS
    word_of = dict(zip(binding.values, binding.words))
    used = []
    templates = set()
    for scene, line in _lines(doc):
      (obj,) = scene.objects
      value = getattr(obj, binding.attribute)
      word = word_of[value]  # Every picture shows a bound value ...
      assert line.count(word) == 1, line  # ... and names it with its word.
      templates.add(line.replace(word, '{}'))
      used.append(word)
    assert len(templates) == 1  # One template per page, as in an episode.
    assert templates <= set(documents.nonce.TEMPLATES[binding.attribute])
    # Each word is shown before any is reused, and some word comes back.
    first = used[:len(binding.words)]
    assert sorted(first) == sorted(binding.words)
    assert len(used) > len(binding.words)
    for word in binding.words:
      assert all(t[0] == 'word' for t in language.lex(word)), word
    all_words += binding.words
  # Fresh words on every page (short ones may come back, rarely).
  assert len(set(all_words)) > 0.95 * len(all_words)
  assert 0.5 < listed / 60 < 0.9
