"""Decoded images to 8-bit RGB, the one conversion every reader shares.

PIL's own `convert('RGB')` clips 16-bit, 32-bit and float pixels to 0..255,
which leaves a few grey levels of a 16-bit image; `to_rgb` scales them by
their bit depth instead, and puts transparency over white. The dataset
builders (`data/formats`), the input pipeline's decoder and the notebook API
all call it. No TensorFlow here: the API imports this module.
"""

import numpy as np
from PIL import Image

# PIL's one-channel modes of more than 8 bits; see `_to_8_bits`.
_DEEP_MODES = ('I;16', 'I;16B', 'I;16L', 'I;16N', 'I', 'F')


def _to_8_bits(image: Image.Image) -> Image.Image:
  """A deep one-channel image -> mode 'L', scaled by its bit depth.

  'I;16*' images have 16 bits: 65535 -> 255. 'I' (32-bit integers) and 'F'
  (floats) state no depth: their full scale is taken as the smallest of 1
  (floats only), 255, 65535 and 2**31 - 1 that holds their largest value.
  Values below 0 become 0.
  """
  values = np.asarray(image, np.float64)  # [h, w]
  if image.mode.startswith('I;16'):
    full_scale = 65535
  else:
    largest = max(float(values.max(initial=0)), 0.0)
    scales = (1, 255, 65535, 2**31 - 1) if image.mode == 'F' else (
        255, 65535, 2**31 - 1)
    full_scale = next((s for s in scales if largest <= s), largest)
  scaled = np.clip(np.round(values * (255 / full_scale)), 0, 255)  # [h, w]
  return Image.fromarray(scaled.astype(np.uint8), mode='L')


def to_rgb(image: Image.Image) -> Image.Image:
  """Any PIL image -> 8-bit RGB: transparency over white, deep modes scaled.

  (PIL's own `convert('RGB')` clips 16-bit, 32-bit and float pixels to
  0..255, which leaves a few grey levels of a 16-bit image.)
  """
  if image.mode in _DEEP_MODES:
    image = _to_8_bits(image)
  if image.mode in ('RGBA', 'LA', 'PA') or (
      image.mode == 'P' and 'transparency' in image.info):
    image = image.convert('RGBA')
    background = Image.new('RGBA', image.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, image).convert('RGB')
  return image.convert('RGB')
