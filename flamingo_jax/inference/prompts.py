"""Prompts: text with `<image>` markers and media -> fixed-shape model inputs.

A prompt is text in the paper's format, with one `<image>` marker per medium,
in order (`'<image>Output: a red cube.<EOC><image>Output:'`). `encode` turns
it into token ids (with `<BOS>`), phi (through the same `compute_media_index`
as training) and media frames; `collate` left-pads a batch of prompts so that
every row's last prompt token sits in the last column, which is what cached
decoding expects (see `models/decoding.py`).

The markers are the tokenizer's: `<image>` and `<EOC>` are written so in any
prompt, and a checkpoint's own tokenizer maps them to the ids it defines
(`data/tokenizer.py`, e.g. OpenFlamingo's `<|endofchunk|>`), whether or not
`<image>` is a piece of its SentencePiece model.

Batch (numpy):
  tokens int32 [B, P]; valid bool [B, P]; media_index int32 [B, P];
  media uint8 [B, N, T, H, W, 3]; media_mask bool [B, N].

Glossary of shapes:
  B: prompts; P: longest prompt in tokens (rounded up to `pad_multiple`).
  N: most media in a prompt; T: frames (1 for images); H = W: image size.
"""

from collections.abc import Sequence
import dataclasses
from typing import Any

import numpy as np

from flamingo_jax.data import media_index as media_index_lib
from flamingo_jax.data import pipeline
from flamingo_jax.data import tokenizer as tokenizer_lib

Batch = dict[str, np.ndarray]


@dataclasses.dataclass
class EncodedPrompt:
  tokens: np.ndarray  # [L] int32, <BOS> first
  media_index: np.ndarray  # [L] int32, phi
  media: np.ndarray  # [n, T, H, W, 3] uint8 (n may be 0)


def as_frames(medium: Any, image_size: int) -> np.ndarray:
  """An image [h, w, 3] or a video [t, h, w, 3] (uint8 RGB arrays or encoded
  bytes) -> [T, image_size, image_size, 3], T = 1 for an image."""
  if isinstance(medium, (bytes, np.bytes_)):
    frames = 1
  else:
    array = np.asarray(medium)
    if array.ndim not in (3, 4) or array.shape[-1] != 3:
      raise ValueError(
          'A medium must be an RGB image [h, w, 3] or a video [t, h, w, 3] '
          f'of uint8; got an array of shape {array.shape} (convert grayscale '
          'or RGBA images to RGB first).')
    if array.dtype != np.uint8:
      raise ValueError(f'Media must be uint8 (0..255); got {array.dtype}.')
    frames = 1 if array.ndim == 3 else array.shape[0]
  try:
    return pipeline.media_array(medium, frames, image_size)
  except pipeline.MediaError as e:
    raise ValueError(str(e)) from e


def encode(tokenizer: tokenizer_lib.Tokenizer, text: str,
           media: Sequence[Any], image_size: int) -> EncodedPrompt:
  """One prompt: ids with <BOS>, phi, and its media as frames."""
  ids = [tokenizer.bos_id] + tokenizer.encode(text)
  tokens = np.asarray(ids, np.int32)  # [L]
  is_marker = tokens == tokenizer.image_id  # [L]
  num_markers = int(is_marker.sum())
  if num_markers != len(media):
    raise ValueError(
        f'The prompt has {num_markers} <image> markers but {len(media)} '
        f'media were given: give exactly one medium per marker, in order. '
        f'Prompt: {text[:200]!r}')
  phi = media_index_lib.compute_media_index(is_marker, len(media))  # [L]
  frames = [as_frames(m, image_size) for m in media]
  if frames and len({f.shape[0] for f in frames}) > 1:
    raise ValueError('All media of a prompt must have the same number of '
                     f'frames; got {[f.shape[0] for f in frames]}.')
  stacked = (np.stack(frames) if frames
             else np.zeros([0, 1, image_size, image_size, 3], np.uint8))
  return EncodedPrompt(tokens, phi, stacked)


def collate(prompts: Sequence[EncodedPrompt], *, max_len: int | None = None,
            pad_multiple: int = 16) -> Batch:
  """Left-pads prompts into one batch (see the module docstring).

  Padding to a multiple of `pad_multiple` tokens keeps the number of
  distinct shapes, hence of compilations, small.
  """
  if not prompts:
    raise ValueError('collate needs at least one prompt.')
  longest = max(len(p.tokens) for p in prompts)
  if max_len is not None and longest > max_len:
    raise ValueError(f'A prompt has {longest} tokens, more than the context '
                     f'of {max_len}: use fewer shots or shorter text.')
  width = -(-longest // pad_multiple) * pad_multiple
  if max_len is not None:
    width = min(width, max_len)
  num_media = max(1, max(len(p.media) for p in prompts))
  shapes = {p.media.shape[1:] for p in prompts if len(p.media)}
  if len(shapes) > 1:
    raise ValueError(f'Media of one batch must share [T, H, W, 3]; got '
                     f'{sorted(shapes)}.')
  frame_shape = shapes.pop() if shapes else prompts[0].media.shape[1:]
  batch = len(prompts)
  out = dict(
      tokens=np.zeros([batch, width], np.int32),
      valid=np.zeros([batch, width], bool),
      media_index=np.zeros([batch, width], np.int32),
      media=np.zeros([batch, num_media, *frame_shape], np.uint8),
      media_mask=np.zeros([batch, num_media], bool))
  for row, prompt in enumerate(prompts):
    length, count = len(prompt.tokens), len(prompt.media)
    out['tokens'][row, width - length:] = prompt.tokens
    out['valid'][row, width - length:] = True
    out['media_index'][row, width - length:] = prompt.media_index
    out['media'][row, :count] = prompt.media
    out['media_mask'][row, :count] = True
  return out
