"""Prompt encoding and batching: shapes, left padding and clear errors."""

import numpy as np
import pytest

from flamingo_jax.inference import prompts


class FakeTokenizer:
  """Whitespace tokenizer with the project's special ids."""
  bos_id, image_id = 2, 4

  def encode(self, text):
    return [self.image_id if w == '<image>' else 10 + len(w)
            for w in text.replace('<image>', ' <image> ').split()]


IMAGE = np.zeros([20, 30, 3], np.uint8)


def test_encode_and_collate_left_pad():
  tok = FakeTokenizer()
  short = prompts.encode(tok, '<image> a b', [IMAGE], 16)
  long = prompts.encode(tok, 'x <image> a <image> b c d', [IMAGE, IMAGE], 16)
  np.testing.assert_array_equal(short.media_index, [0, 1, 1, 1])
  batch = prompts.collate([short, long], pad_multiple=4)
  assert batch['tokens'].shape == (2, 8)
  assert batch['media'].shape == (2, 2, 1, 16, 16, 3)
  np.testing.assert_array_equal(batch['valid'][0], [0] * 4 + [1] * 4)
  np.testing.assert_array_equal(batch['tokens'][0, 4:], short.tokens)
  np.testing.assert_array_equal(batch['media_mask'], [[1, 0], [1, 1]])
  np.testing.assert_array_equal(batch['media_index'][1], long.media_index)


def test_video_frames():
  video = np.zeros([5, 20, 20, 3], np.uint8)
  encoded = prompts.encode(FakeTokenizer(), '<image> a', [video], 16)
  assert encoded.media.shape == (1, 5, 16, 16, 3)


@pytest.mark.parametrize('text,media,message', [
    ('<image> <image> a', [IMAGE], '2 <image> markers but 1 media'),
    ('a b', [IMAGE], '0 <image> markers but 1 media'),
    ('<image> a', [np.zeros([20, 30], np.uint8)], 'RGB'),
    ('<image> a', [np.zeros([20, 30, 4], np.uint8)], 'RGB'),
    ('<image> a', [np.zeros([20, 30, 3], np.float32)], 'uint8'),
    ('<image> a', [b'not an image'], 'Cannot decode'),
])
def test_bad_prompts_are_named(text, media, message):
  with pytest.raises(ValueError, match=message):
    prompts.encode(FakeTokenizer(), text, media, 16)


def test_prompt_longer_than_context():
  encoded = prompts.encode(FakeTokenizer(), 'a ' * 40, [], 16)
  with pytest.raises(ValueError, match='more than the context of 32'):
    prompts.collate([encoded], max_len=32)


def test_empty_batch():
  with pytest.raises(ValueError, match='at least one prompt'):
    prompts.collate([])
