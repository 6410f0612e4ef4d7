"""Formatting: exact layouts, shifted targets, masks, phi, truncation, skips."""

import numpy as np
import pytest

from flamingo_jax.data import formatting
from tests.data import test_tokenizer

BOS, EOS, PAD, IMAGE, EOC = 2, 3, 0, 4, 512  # The tiny tokenizer's ids.
DOG = 'This is a picture of my dog.'
CAT = 'This is a picture of my cat.'
FIG7 = [{'image': 0}, {'text': DOG}, {'image': 1}, {'text': CAT}]


@pytest.fixture(scope='module')
def tok():
  tokenizer = test_tokenizer.train_tiny_tokenizer()
  assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id,
          tokenizer.image_id, tokenizer.eoc_id) == (BOS, EOS, PAD, IMAGE, EOC)
  return tokenizer


def _valid(tokens: np.ndarray) -> np.ndarray:
  return tokens[tokens != PAD]  # Text never encodes to <pad>.


def test_fig7_document_exact(tok):
  dog, cat = tok.encode(DOG), tok.encode(CAT)
  stream = [BOS, IMAGE, *dog, EOC, IMAGE, *cat, EOC, EOS]
  seq_len = len(stream) + 2  # Two ids of padding.
  ex = formatting.format_document(FIG7, tok, seq_len=seq_len)

  np.testing.assert_array_equal(ex['tokens'], stream[:-1] + [PAD] * 3)
  np.testing.assert_array_equal(ex['targets'], stream[1:] + [PAD] * 3)
  assert tok.decode(ex['tokens']) == f'<image>{DOG}<EOC><image>{CAT}<EOC>'
  mask = [0] + [1] * (len(dog) + 1) + [0] + [1] * (len(cat) + 2) + [0] * 3
  np.testing.assert_array_equal(ex['loss_mask'], mask)
  phi = [0] + [1] * (len(dog) + 2) + [2] * (len(cat) + 2) + [0] * 3
  np.testing.assert_array_equal(ex['media_index'], phi)
  assert ex['num_media'] == 2
  np.testing.assert_array_equal(ex['kept_media'], [0, 1, -1, -1, -1])
  np.testing.assert_array_equal(ex['media_mask'], [1, 1, 0, 0, 0])
  for key, dtype in [('tokens', np.int32), ('targets', np.int32),
                     ('loss_mask', np.float32), ('media_index', np.int32),
                     ('num_media', np.int32), ('kept_media', np.int32),
                     ('media_mask', bool)]:
    assert ex[key].dtype == dtype, key


def test_fig7_document_next_image_mode(tok):
  dog, cat = tok.encode(DOG), tok.encode(CAT)
  ex = formatting.format_document(FIG7, tok, seq_len=40, p_next=1.0)
  n = len(dog) + len(cat) + 5  # <BOS> <image> dog <EOC> <image> cat <EOC>
  # <BOS> and the first marker -> 1; dog text, its <EOC>, marker 2 -> 2;
  # the cat text and after: no next image -> 0.
  phi = [1, 1] + [2] * (len(dog) + 2) + [0] * (len(cat) + 1)
  np.testing.assert_array_equal(ex['media_index'][:n], phi)
  assert not ex['media_index'][n:].any()


def test_leading_text_ends_with_eoc(tok):
  chunks = [{'text': 'Cute pics of my pets!'}, {'image': 0},
            {'text': 'My puppy.'}, {'image': 1}, {'text': 'My cat.'}]
  ex = formatting.format_document(chunks, tok, seq_len=64)
  expected = [BOS, *tok.encode('Cute pics of my pets!'), EOC, IMAGE,
              *tok.encode('My puppy.'), EOC, IMAGE, *tok.encode('My cat.'),
              EOC]
  np.testing.assert_array_equal(_valid(ex['tokens']), expected)
  assert ex['targets'][len(expected) - 1] == EOS


def test_consecutive_images_and_text_merging(tok):
  chunks = [{'image': 3}, {'image': 1}, {'text': 'my '}, {'text': 'dog'},
            {'text': '  '}, {'image': 0}]
  ex = formatting.format_document(chunks, tok, seq_len=64)
  expected = [BOS, IMAGE, EOC, IMAGE, *tok.encode('my dog  '), EOC, IMAGE,
              EOC]
  np.testing.assert_array_equal(_valid(ex['tokens']), expected)
  np.testing.assert_array_equal(ex['kept_media'], [3, 1, 0, -1, -1])


def test_whitespace_only_text_is_dropped(tok):
  chunks = [{'text': ' \n'}, {'image': 0}, {'text': 'my dog'}]
  ex = formatting.format_document(chunks, tok, seq_len=16)
  np.testing.assert_array_equal(
      _valid(ex['tokens']), [BOS, IMAGE, *tok.encode('my dog'), EOC])


def test_pair_exact(tok):
  ex = formatting.format_pair('  A cute puppy. ', tok, seq_len=16,
                              space_prefix_prob=0.0)
  caption = tok.encode('A cute puppy.')
  stream = [BOS, IMAGE, *caption, EOC, EOS]
  pad = [PAD] * (17 - len(stream))
  np.testing.assert_array_equal(ex['tokens'], stream[:-1] + pad)
  np.testing.assert_array_equal(ex['targets'], stream[1:] + pad)
  np.testing.assert_array_equal(
      ex['loss_mask'], [0] + [1] * (len(caption) + 2) + [0] * len(pad))
  np.testing.assert_array_equal(
      ex['media_index'], [0] + [1] * (len(caption) + 2) + [0] * len(pad))
  np.testing.assert_array_equal(ex['kept_media'], [0])
  assert ex['num_media'] == 1


def test_pair_with_space_prefix(tok):
  ex = formatting.format_pair('A cute puppy.', tok, seq_len=16,
                              space_prefix_prob=1.0)
  caption = tok.encode(' A cute puppy.')
  assert caption != tok.encode('A cute puppy.')
  np.testing.assert_array_equal(_valid(ex['tokens']),
                                [BOS, IMAGE, *caption, EOC])


def test_space_prefix_rate_and_determinism(tok):
  def prefixed(seed):
    rng = np.random.default_rng(seed)
    return [tok.decode(formatting.format_pair('my dog', tok, rng=rng)[
        'tokens']).startswith('<image> ') for _ in range(400)]

  draws = prefixed(0)
  assert 0.42 < np.mean(draws) < 0.58
  assert prefixed(0) == draws
  assert prefixed(1) != draws


def test_empty_caption_is_a_skip(tok):
  rng = np.random.default_rng(0)
  for caption in ['', '   \n']:
    result = formatting.format_pair(caption, tok, rng=rng)
    assert isinstance(result, formatting.Skip)
    assert result.reason == formatting.EMPTY_CAPTION


def test_document_without_text_is_a_skip(tok):
  result = formatting.format_document(
      [{'image': 0}, {'text': ' '}, {'image': 1}], tok)
  assert isinstance(result, formatting.Skip)
  assert result.reason == formatting.NO_TEXT


def test_text_cut_away_is_a_skip(tok):
  # One image allowed: the cut falls before the 2nd marker, losing the text.
  result = formatting.format_document(
      [{'image': 0}, {'image': 1}, {'text': 'my dog'}], tok, max_media=1)
  assert isinstance(result, formatting.Skip)
  assert result.reason == formatting.NO_TEXT_KEPT


def test_max_media_cuts_text_before_the_next_marker(tok):
  chunks = []
  for i in range(7):
    chunks += [{'image': i}, {'text': f'my dog {i}.'}]
  ex = formatting.format_document(chunks, tok, seq_len=256, max_media=5)
  n = int((ex['tokens'] != PAD).sum())
  assert ex['num_media'] == 5 == (ex['tokens'] == IMAGE).sum()
  np.testing.assert_array_equal(ex['kept_media'], [0, 1, 2, 3, 4])
  assert tok.decode(ex['tokens']).endswith('<image>my dog 4.')
  assert ex['targets'][n - 1] == EOC and ex['loss_mask'][n - 1] == 1
  assert EOS not in ex['targets']


def test_marker_only_as_last_target_keeps_no_image(tok):
  dog = tok.encode(DOG)
  seq_len = len(dog) + 3  # <BOS> <image> dog <EOC> | next target: <image>.
  ex = formatting.format_document(FIG7, tok, seq_len=seq_len)
  assert ex['tokens'][-1] == EOC and ex['targets'][-1] == IMAGE
  assert ex['loss_mask'][-1] == 0
  assert ex['num_media'] == 1
  np.testing.assert_array_equal(ex['kept_media'], [0, -1, -1, -1, -1])


def _random_document(rng: np.random.Generator) -> list[dict[str, object]]:
  words = ['my', 'dog', 'cat', ' ', 'picture', '<image>', '\n', 'grass.']
  chunks = []
  for _ in range(rng.integers(1, 12)):
    if rng.random() < 0.4:
      chunks.append({'image': int(rng.integers(0, 8))})
    else:
      size = rng.integers(1, 8)
      chunks.append({'text': ' '.join(rng.choice(words, size))})
  return chunks


def test_truncation_keeps_markers_and_images_consistent(tok):
  rng = np.random.default_rng(0)
  checked = 0
  for _ in range(300):
    chunks = _random_document(rng)
    seq_len = int(rng.integers(1, 40))
    max_media = int(rng.integers(0, 4))
    full = formatting.format_document(chunks, tok, seq_len=1000,
                                      max_media=100)
    ex = formatting.format_document(chunks, tok, seq_len=seq_len,
                                    max_media=max_media)
    if isinstance(ex, formatting.Skip):
      continue
    checked += 1
    tokens, targets = ex['tokens'], ex['targets']
    n = int((tokens != PAD).sum())
    assert (tokens[n:] == PAD).all() and (targets[n:] == PAD).all()
    # A prefix of the untruncated sequence, with next-token targets.
    np.testing.assert_array_equal(tokens[:n], full['tokens'][:n])
    np.testing.assert_array_equal(targets[:n], full['targets'][:n])
    np.testing.assert_array_equal(targets[:n - 1], tokens[1:n])
    # Every marker has its image, every kept image its marker, in order.
    is_marker = tokens == IMAGE
    num_media = int(ex['num_media'])
    assert is_marker.sum() == num_media == ex['media_mask'].sum()
    assert num_media <= max_media
    np.testing.assert_array_equal(ex['kept_media'][:num_media],
                                  full['kept_media'][:num_media])
    assert (ex['kept_media'][num_media:] == -1).all()
    # Supervised: real positions whose target is not a marker.
    np.testing.assert_array_equal(
        ex['loss_mask'], (np.arange(seq_len) < n) & (targets != IMAGE))
    # Previous-image phi counts the markers so far.
    np.testing.assert_array_equal(ex['media_index'][:n],
                                  np.cumsum(is_marker)[:n])
    assert not ex['media_index'][n:].any()
  assert checked > 150


def _long_document():
  chunks = []
  for i in range(8):
    chunks += [{'image': i}, {'text': f' Part {i}: the dog sat on a red mat '
                              f'and looked at picture {i} for a while.'}]
  return chunks


def test_random_window_is_a_window_of_the_document(tok):
  chunks, seq_len, max_media = _long_document(), 24, 2
  full = formatting.format_document(chunks, tok, seq_len=1000, max_media=100)
  stream = list(_valid(full['tokens'])) + [EOS]  # S without the padding.
  assert len(stream) > 4 * seq_len
  offsets = set()
  for seed in range(60):
    ex = formatting.format_document(
        chunks, tok, seq_len=seq_len, max_media=max_media,
        window_rng=np.random.default_rng(seed))
    tokens = list(_valid(ex['tokens']))
    assert tokens[0] == BOS
    # <BOS> then a contiguous run of S: find where it starts.
    body = tokens[1:]
    starts = [o for o in range(1, len(stream)) if
              stream[o:o + len(body)] == body]
    assert starts, body
    offsets.add(starts[0])
    # Up to max_media markers, each with the image it stands for.
    num_media = int(ex['num_media'])
    assert tokens.count(IMAGE) == num_media <= max_media
    ordinals = [stream[:o].count(IMAGE)  # Which image of the document.
                for o in range(starts[0], starts[0] + len(body))
                if stream[o] == IMAGE]
    np.testing.assert_array_equal(ex['kept_media'][:num_media],
                                  full['kept_media'][ordinals])
    np.testing.assert_array_equal(ex['media_index'][:len(tokens)],
                                  np.cumsum(np.array(tokens) == IMAGE))
    # The same generator state gives the same window.
    again = formatting.format_document(
        chunks, tok, seq_len=seq_len, max_media=max_media,
        window_rng=np.random.default_rng(seed))
    np.testing.assert_array_equal(again['tokens'], ex['tokens'])
  assert len(offsets) > 20 and max(offsets) > len(stream) - 2 * seq_len
  # A document that fits is taken whole, window or not.
  short = formatting.format_document(FIG7, tok, seq_len=64, max_media=5)
  windowed = formatting.format_document(FIG7, tok, seq_len=64, max_media=5,
                                        window_rng=np.random.default_rng(0))
  for key in short:
    np.testing.assert_array_equal(short[key], windowed[key])


def test_literal_image_text_is_not_a_marker(tok):
  chunks = [{'image': 0}, {'text': 'a <image> tag and an <EOC> in text'}]
  ex = formatting.format_document(chunks, tok, seq_len=64)
  assert ex['num_media'] == 1 and (ex['tokens'] == IMAGE).sum() == 1
  assert (ex['tokens'] == EOC).sum() == 1  # Only the closing <EOC>.
  assert (tok.decode(_valid(ex['tokens']))
          == '<image>a <image> tag and an <EOC> in text<EOC>')


def test_p_next_draw_rate_and_determinism(tok):
  def next_mode(seed):
    rng = np.random.default_rng(seed)
    return [formatting.format_document(FIG7, tok, seq_len=40, p_next=0.5,
                                       rng=rng)['media_index'][0] == 1
            for _ in range(400)]

  draws = next_mode(0)
  assert 0.42 < np.mean(draws) < 0.58
  assert next_mode(0) == draws


def test_draws_need_an_rng(tok):
  with pytest.raises(ValueError, match='p_next=0.5 needs an rng'):
    formatting.format_document(FIG7, tok, p_next=0.5)
  with pytest.raises(ValueError, match='space_prefix_prob=0.5 needs an rng'):
    formatting.format_pair('my dog', tok)


@pytest.mark.parametrize('chunks', [
    [{'image': 0, 'text': 'both'}],
    [{'video': 0}],
    [{'image': -1}],
    [{'image': True}],
    [{'text': 3}],
    ['plain string'],
    [{'text': 'a dog', 'supervised': 'no'}],
    [{'image': 0, 'supervised': False}],
    [{'text': 'a dog', 'supervised': False, 'image': 0}],
])
def test_malformed_chunks_raise(tok, chunks):
  with pytest.raises(ValueError, match='Chunk 0 must be'):
    formatting.format_document(chunks, tok)


def test_an_unsupervised_chunk_is_read_but_not_learned(tok):
  """{'text': ..., 'supervised': False}: its ids are inputs as any text's,
  its targets masked; the <EOC> that ends its chunk is still learned, and
  a supervised chunk next to it keeps its own ids and loss."""
  dog, cat = tok.encode(DOG), tok.encode(CAT)
  chunks = [{'image': 0}, {'text': DOG, 'supervised': False},
            {'image': 1}, {'text': CAT}]
  plain = formatting.format_document(FIG7, tok, seq_len=40)
  ex = formatting.format_document(chunks, tok, seq_len=40)
  for key in ('tokens', 'targets', 'media_index'):
    np.testing.assert_array_equal(ex[key], plain[key])
  mask = [0] * (1 + len(dog)) + [1, 0] + [1] * (len(cat) + 2)
  np.testing.assert_array_equal(ex['loss_mask'][:len(mask)], mask)
  assert ex['loss_mask'].sum() == plain['loss_mask'].sum() - len(dog)
  # Consecutive text chunks of different supervision: each keeps its own.
  mixed = formatting.format_document(
      [{'image': 0}, {'text': 'My dog.', 'supervised': False},
       {'text': ' My cat.'}], tok, seq_len=40)
  first, second = tok.encode('My dog.'), tok.encode(' My cat.')
  np.testing.assert_array_equal(
      _valid(mixed['tokens']), [BOS, IMAGE, *first, *second, EOC])
  np.testing.assert_array_equal(
      mixed['loss_mask'][:len(first) + len(second) + 3],
      [0] * (1 + len(first)) + [1] * (len(second) + 2))


def test_empty_example_has_no_supervision():
  ex = formatting.empty_example(seq_len=8, max_media=3)
  assert ex['tokens'].shape == ex['loss_mask'].shape == (8,)
  assert ex['loss_mask'].sum() == 0 and ex['num_media'] == 0
  np.testing.assert_array_equal(ex['kept_media'], [-1, -1, -1])


def test_prompt_strings():
  assert formatting.caption_prompt('A dog.') == '<image>Output: A dog.<EOC>'
  assert formatting.caption_prompt() == '<image>Output:'
  assert (formatting.vqa_prompt('What colour?', 'red')
          == '<image>Question: What colour? Answer: red<EOC>')
  assert (formatting.vqa_prompt('What colour?')
          == '<image>Question: What colour? Answer:')


def test_prompt_tokens_match_training_layout(tok):
  prompt = formatting.caption_prompt('A dog.') + formatting.caption_prompt()
  ids = [BOS] + tok.encode(prompt)
  ex = formatting.format_document(
      [{'image': 0}, {'text': 'Output: A dog.'}, {'image': 1},
       {'text': 'Output:'}], tok, seq_len=32)
  # Training only adds the closing <EOC> (then <EOS>, the last target).
  np.testing.assert_array_equal(_valid(ex['tokens']), ids + [EOC])
