"""Random crops and flips: bounds, one draw per medium, off by default."""

import numpy as np
import pytest

from flamingo_jax.data import augment
from flamingo_jax.data import pipeline


def _image(height=40, width=60):
  rows, cols = np.mgrid[:height, :width]
  return np.stack([rows, cols, rows + cols], -1).astype(np.uint8)  # [h, w, 3]


def test_off_by_default():
  assert augment.make_augment(np.random.default_rng(0)) is None


@pytest.mark.parametrize('seed', range(20))
def test_crop_keeps_at_least_the_minimum_area_and_its_pixels(seed):
  image = _image()
  fn = augment.make_augment(np.random.default_rng(seed), crop_min_area=0.5)
  crop = fn(image)
  assert crop.size >= 0.5 * image.size * (3 / 4)  # Aspect may clip a side.
  top, left = int(crop[0, 0, 0]), int(crop[0, 0, 1])
  np.testing.assert_array_equal(
      crop, image[top:top + crop.shape[0], left:left + crop.shape[1]])


def test_flip_reverses_columns():
  fn = augment.make_augment(np.random.default_rng(0), flip_p=1.0)
  np.testing.assert_array_equal(fn(_image()), _image()[:, ::-1])


def test_a_video_gets_one_crop_and_flip_for_all_frames():
  video = [_image() for _ in range(5)]
  fn = augment.make_augment(np.random.default_rng(3), crop_min_area=0.3,
                            flip_p=1.0)
  frames = pipeline.media_array(video, 3, 32, fn)  # [T, 32, 32, 3]
  assert frames.shape == (3, 32, 32, 3)
  assert all(np.array_equal(frames[0], f) for f in frames[1:])
  plain = pipeline.media_array(video, 3, 32)
  assert not np.array_equal(frames, plain)


@pytest.mark.parametrize('kwargs,message', [
    (dict(crop_min_area=0.0), 'crop_min_area'),
    (dict(crop_min_area=1.5), 'crop_min_area'),
    (dict(flip_p=-0.1), 'flip_p'),
])
def test_bad_settings_are_named(kwargs, message):
  with pytest.raises(ValueError, match=message):
    augment.make_augment(np.random.default_rng(0), **kwargs)
