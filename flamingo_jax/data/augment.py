"""Image augmentation: random crops and flips, one draw per medium.

Off by default in every config: the paper trains on whole images, resized
with their aspect ratio kept and padded, and the embedded world's captions
name positions ('on the left'), which a flip or a crop would falsify. A
dataset spec turns them on for data where they are safe:

  crop_min_area   random crop of at least this fraction of the area (1.0: off),
                  aspect ratio in [3/4, 4/3] (Inception-style)
  flip_p          probability of a left-right flip (0.0: off)

A video gets the same crop and flip on every frame. Draws come from the
example's own generator, so a resumed run sees the same crops.

Glossary of shapes:
  T: frames; h, w: the medium's height and width.
"""

from collections.abc import Callable

import numpy as np

Augment = Callable[[np.ndarray], np.ndarray]  # [h, w, 3] -> [h', w', 3]


def _crop_box(height: int, width: int, min_area: float,
              rng: np.random.Generator) -> tuple[int, int, int, int]:
  """(top, left, crop height, crop width) covering >= min_area."""
  area = rng.uniform(min_area, 1.0) * height * width
  aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
  crop_h = int(min(height, max(1, round(np.sqrt(area / aspect)))))
  crop_w = int(min(width, max(1, round(np.sqrt(area * aspect)))))
  top = int(rng.integers(0, height - crop_h + 1))
  left = int(rng.integers(0, width - crop_w + 1))
  return top, left, crop_h, crop_w


def make_augment(rng: np.random.Generator, *, crop_min_area: float = 1.0,
                 flip_p: float = 0.0) -> Augment | None:
  """One medium's augmentation (None when both are off).

  The flip is drawn now; the crop box on the first frame seen (its size),
  then reused for every frame.
  """
  if not 0.0 < crop_min_area <= 1.0:
    raise ValueError(f'crop_min_area must be in (0, 1]; got {crop_min_area}.')
  if not 0.0 <= flip_p <= 1.0:
    raise ValueError(f'flip_p must be in [0, 1]; got {flip_p}.')
  if crop_min_area == 1.0 and flip_p == 0.0:
    return None
  flip = bool(rng.random() < flip_p)
  box = []

  def augment(image: np.ndarray) -> np.ndarray:  # [h, w, 3]
    if crop_min_area < 1.0:
      if not box:
        box.append(_crop_box(*image.shape[:2], crop_min_area, rng))
      top, left, crop_h, crop_w = box[0]
      image = image[top:top + crop_h, left:left + crop_w]  # [h', w', 3]
    return image[:, ::-1] if flip else image

  return augment
