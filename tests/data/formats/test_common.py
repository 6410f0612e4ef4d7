"""common: images stored as 8-bit RGB, deep ones scaled by their depth."""

import io

import numpy as np
from PIL import Image
import pytest

from flamingo_jax.data import images
from flamingo_jax.data import pipeline
from flamingo_jax.data.formats import common
from tests.data.formats import util

# A 16-bit gradient over all 8-bit levels: [4, 64] uint16 and its 8 bits.
GRADIENT_16 = np.linspace(0, 65535, 256).round().astype(np.uint16).reshape(
    4, 64)
GRADIENT_8 = np.linspace(0, 255, 256).round().astype(np.uint8).reshape(4, 64)


def _pillow_16_bit_grey() -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(GRADIENT_16).save(buffer, format='PNG')  # Mode I;16.
  return buffer.getvalue()


def _channels(count: int) -> np.ndarray:
  """GRADIENT_16 in every colour channel, alpha (if any) opaque."""
  array = np.repeat(GRADIENT_16[..., None], count, axis=-1)
  if count in (2, 4):
    array[..., -1] = 65535
  return array


@pytest.mark.parametrize('make', [
    _pillow_16_bit_grey,
    lambda: util.png_16_bit(_channels(1)),  # Grey.
    lambda: util.png_16_bit(_channels(2)),  # Grey and alpha.
    lambda: util.png_16_bit(_channels(3)),  # RGB.
    lambda: util.png_16_bit(_channels(4)),  # RGBA.
], ids=['pillow_grey', 'grey', 'grey_alpha', 'rgb', 'rgba'])
def test_16_bit_pngs_are_scaled_to_8_bits(make):
  stored = common.load_image(make(), 'x.png')
  assert stored[24] == 8  # The PNG stored has 8-bit samples.
  got = util.decode(stored).astype(int)  # [4, 64, 3]
  # Pillow reads 16-bit RGB by its high byte (v >> 8), which is at most one
  # level below round(v / 257); clipping would leave 0 and 255 only.
  assert np.abs(got - GRADIENT_8[..., None]).max() <= 1
  assert len(np.unique(got)) >= 255


# 'I' and 'F' state no depth: their range is the smallest that holds them.
@pytest.mark.parametrize('array, expected', [
    (np.array([[0, 257, 32896, 65535]], np.int32), [0, 1, 128, 255]),
    (np.array([[0, 17, 200, 255]], np.int32), [0, 17, 200, 255]),
    (np.array([[0, 0.25, 0.5, 1]], np.float32), [0, 64, 128, 255]),
    (np.array([[-3, 0, 32896, 65535]], np.float32), [0, 0, 128, 255]),
], ids=['int_16_bit', 'int_8_bit', 'float_unit', 'float_16_bit'])
def test_deep_modes_are_scaled_by_their_range(array, expected):
  image = Image.fromarray(array)
  assert image.mode in ('I', 'F')
  rgb = np.asarray(images.to_rgb(image))  # [1, 4, 3]
  np.testing.assert_array_equal(rgb, np.repeat(
      np.array(expected, np.uint8)[None, :, None], 3, axis=-1))


def test_16_bit_images_build_as_8_bit(tmp_path):
  src = tmp_path / 'src'
  util.write(src / 'grey.png', _pillow_16_bit_grey())
  util.write(src / 'rgb.png', util.png_16_bit(_channels(3)))
  util.write(src / 'pairs.csv', 'image,caption\ngrey.png,Grey.\n'
             'rgb.png,Colour.\n')
  builder, stats = util.build('table_pairs', src / 'pairs.csv',
                              tmp_path / 'out')
  assert stats == {'train': {'examples': 2}}
  data = util.by_source(builder.as_data_source(split='train'))
  for line in (2, 3):
    image = data[f'{src}/pairs.csv:{line}']['image'].astype(int)
    assert image.shape == (4, 64, 3)
    assert np.abs(image - GRADIENT_8[..., None]).max() <= 1


def test_pipeline_and_api_decode_deep_images_as_the_builders_store_them():
  """Encoded 16-bit bytes (the notebook API's bytes input) and a PIL image
  decode as the builders' 8-bit images, not clipped to black and white."""
  from flamingo_jax.inference import user_inputs  # pylint: disable=g-import-not-at-top
  decoded = pipeline.decode_image(_pillow_16_bit_grey())  # [4, 64, 3]
  np.testing.assert_array_equal(decoded, np.repeat(GRADIENT_8[..., None], 3,
                                                   axis=-1))
  with Image.open(io.BytesIO(_pillow_16_bit_grey())) as pil:
    np.testing.assert_array_equal(user_inputs.image_array(pil, 'image'),
                                  decoded)
