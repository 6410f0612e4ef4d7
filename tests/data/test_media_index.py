"""phi from marker positions, in previous- and next-image modes."""

import numpy as np
import pytest

from flamingo_jax.data import media_index


def test_previous_image_mode():
  #          t:  0  1  2  3  4  5  6
  markers = [0, 1, 0, 0, 1, 0, 0]
  phi = media_index.compute_media_index(np.array(markers, bool), 2)
  np.testing.assert_array_equal(phi, [0, 1, 1, 1, 2, 2, 2])


def test_next_image_mode():
  markers = [0, 1, 0, 0, 1, 0, 0]
  phi = media_index.compute_media_index(np.array(markers, bool), 2,
                                        attend_next=True)
  np.testing.assert_array_equal(phi, [1, 1, 2, 2, 2, 0, 0])


def test_batch_with_per_row_draws():
  markers = np.array([[1, 0, 1, 0], [0, 1, 0, 0]], bool)
  phi = media_index.compute_media_index(markers, np.array([2, 1]),
                                        attend_next=np.array([False, True]))
  np.testing.assert_array_equal(phi, [[1, 1, 2, 2], [1, 1, 0, 0]])
  assert phi.dtype == np.int32


def test_more_markers_than_media_raises():
  markers = np.array([[1, 0, 1, 1]], bool)
  with pytest.raises(ValueError, match='3 <image> markers but only 2 media'):
    media_index.compute_media_index(markers, 2)
