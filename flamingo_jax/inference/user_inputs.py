"""What the notebook API (api.py) takes from a user: media as the arrays the
prompts take, and the tuples of `few_shot` per task.

A medium is an image -- a PIL image (any mode: transparency over white,
16-bit or float pixels scaled by their depth, as the dataset builders store
images), a uint8 array [h, w, 3], a file path or encoded bytes -- or a
video: a uint8 array [t, h, w, 3] or a list/tuple of frames.
"""

import dataclasses
import io
import os
from typing import Any

import jax
import numpy as np
from PIL import Image

from flamingo_jax import fs
from flamingo_jax.data import formatting
from flamingo_jax.data import images
from flamingo_jax.data import pipeline
from flamingo_jax.data import tokenizer as tokenizer_lib


def image_array(image: Any, what: str) -> Any:
  """A PIL image or path -> uint8 [h, w, 3]; arrays and bytes pass through
  (`prompts.as_frames` checks them)."""
  if isinstance(image, (str, os.PathLike)):
    path = os.fspath(image)
    if not fs.isfile(path):
      raise FileNotFoundError(f'{what}: no image file at {path}.')
    source = io.BytesIO(fs.read_bytes(path)) if fs.is_url(path) else path
    try:
      with Image.open(source) as pil:
        return pil_array(pil)
    except OSError as e:
      raise ValueError(f'{what}: cannot decode {path} as an image: {e}') from e
  if isinstance(image, Image.Image):
    return pil_array(image)
  if isinstance(image, (bytes, np.bytes_, np.ndarray, jax.Array)):
    return image
  raise TypeError(f'{what} must be a PIL image, a uint8 array, a file path '
                  f'or encoded bytes; got {type(image).__name__}.')


def pil_array(pil: Image.Image) -> np.ndarray:
  """Any PIL mode -> uint8 [h, w, 3], as the dataset builders store images:
  deep pixels scaled by their bit depth, transparency over white."""
  return np.asarray(images.to_rgb(pil))  # [h, w, 3] uint8


def medium(medium: Any, what: str) -> Any:
  """One medium -> an image [h, w, 3] / video [t, h, w, 3] array or bytes."""
  if isinstance(medium, (list, tuple)):
    if not medium:
      raise ValueError(f'{what}: a video needs at least one frame.')
    frames = [image_array(f, f'{what}, frame {i}')
              for i, f in enumerate(medium)]
    try:
      frames = [pipeline.decode_image(f) for f in frames]  # [h, w, 3] each
    except pipeline.MediaError as e:
      raise ValueError(f'{what}: {e}') from e
    shapes = {f.shape for f in frames}
    if len(shapes) > 1:
      raise ValueError(f'{what}: the frames of a video must share one shape; '
                       f'got {sorted(shapes)}.')
    return np.stack(frames)  # [t, h, w, 3]
  return image_array(medium, what)


def media_list(media: Any, num_markers: int, what: str) -> list[Any]:
  """A prompt's `media` argument -> one medium per marker (see the module
  docstring)."""
  if media is None:
    media = []
  elif not isinstance(media, (list, tuple)):
    media = [media]
  if len(media) != num_markers:
    hint = (' A video given as a list of frames goes in a list of its own: '
            '[frames].' if num_markers == 1 and len(media) > 1 else '')
    raise ValueError(
        f'{what} has {num_markers} <image> markers but {len(media)} media '
        f'were given: give exactly one medium per marker, in order.{hint}')
  return [medium(m, f'{what}, medium {i}') for i, m in enumerate(media)]


def fields(item: Any, arity: int, text_type: type, what: str,
            form: str) -> tuple[Any, ...]:
  if not isinstance(item, tuple) or len(item) != arity or not all(
      isinstance(f, text_type) for f in item[1:]):
    raise ValueError(f'{what} must be a tuple {form}; got {item!r:.200}.')
  return item


@dataclasses.dataclass(frozen=True)
class FewShotTask:
  support_arity: int  # Fields of a support tuple, the medium first.
  support_form: str  # For errors.
  shot: Any  # (*texts) -> one shot's prompt text.
  query_arity: int  # 1: the query is a medium; else a tuple.
  query_form: str
  query: Any  # (*texts) -> the open query's prompt text.


FEW_SHOT_TASKS = {
    'caption': FewShotTask(2, '(medium, caption)', formatting.caption_prompt,
                           1, 'medium', formatting.caption_prompt),
    'vqa': FewShotTask(3, '(medium, question, answer)', formatting.vqa_prompt,
                       2, '(medium, question)', formatting.vqa_prompt),
    'plain': FewShotTask(
        2, '(medium, text)',
        lambda text: f'{tokenizer_lib.IMAGE}{text}{tokenizer_lib.EOC}',
        1, 'medium', lambda: tokenizer_lib.IMAGE),
}
