"""Documents: valid chunks, and text that describes the right image."""

import collections

import pytest

from flamingo_jax.data.world import documents
from flamingo_jax.data.world import language
from flamingo_jax.data.world import scenes


def _documents(num):
  for index in range(num):
    yield documents.sample_document(
        scenes.example_rng('test_documents', 'train', index))


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
  for doc in _documents(200):
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
      parsed = language.parse(sentence)
      assert parsed.phrases, sentence
      for phrase in parsed.phrases:
        assert phrase.count == phrase.desc.count(doc.scenes[i].objects), (
            sentence)
      sides[side] += 1
  assert sides['above'] > 2 * sides['below'] > 0


def test_page_shapes_vary():
  docs = list(_documents(300))
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


def test_pages_have_a_theme():
  for doc in _documents(50):
    colours = set.intersection(*({o.colour for o in s.objects}
                                 for s in doc.scenes))
    shapes = set.intersection(*({o.shape for o in s.objects}
                                for s in doc.scenes))
    assert colours or shapes


def test_bad_num_images_raises():
  with pytest.raises(ValueError, match='num_images'):
    documents.sample_document(scenes.example_rng('x', 'y', 0), num_images=0)
