"""Scenes: seeding, sampling and rendering."""

import numpy as np
import pytest

from flamingo_jax.data.world import scenes


def _scene(index, split='train', seed=scenes.WORLD_SEED):
  return scenes.sample_scene(scenes.example_rng('test', split, index,
                                                seed=seed))


def test_same_seed_gives_identical_pixels():
  a = scenes.render_scene(_scene(3))
  b = scenes.render_scene(_scene(3))
  assert a.tobytes() == b.tobytes()


def test_other_index_split_or_seed_gives_other_scenes():
  base = scenes.render_scene(_scene(3))
  for other in (_scene(4), _scene(3, split='validation'), _scene(3, seed=1)):
    assert scenes.render_scene(other).tobytes() != base.tobytes()


def test_example_rng_does_not_depend_on_generation_order():
  forward = [_scene(i) for i in range(5)]
  backward = [_scene(i) for i in reversed(range(5))][::-1]
  assert forward == backward


def test_example_rng_rejects_negative_index():
  with pytest.raises(ValueError, match='>= 0'):
    scenes.example_rng('test', 'train', -1)


@pytest.mark.parametrize('size', [64, 320])
def test_objects_have_their_named_colour_where_they_are(size):
  checked = 0
  for index in range(40):
    scene = _scene(index)
    image = scenes.render_scene(scene, size)
    assert image.shape == (size, size, 3) and image.dtype == np.uint8
    for obj in scene.objects:
      row, col = scenes.anchor_pixel(obj, size)
      assert scenes.nearest_colour(image[row, col]) == obj.colour, obj
      # The anchor is in the object's named grid cell.
      cell_row, cell_col = obj.cell
      assert cell_row == row * scenes.GRID // size
      assert cell_col == col * scenes.GRID // size
      checked += 1
  assert checked > 80


def test_empty_cells_show_only_background():
  scene = _scene(0)
  image = scenes.render_scene(scene, 60).astype(int)
  occupied = {o.cell for o in scene.objects}
  for r in range(scenes.GRID):
    for c in range(scenes.GRID):
      if (r, c) in occupied:
        continue
      patch = image[r * 20:(r + 1) * 20, c * 20:(c + 1) * 20]
      # A grey background: channels within tint and gradient of each other.
      spread = patch.max(axis=-1) - patch.min(axis=-1)
      assert spread.max() <= 2 * scenes.BACKGROUND_TINT + 1


def test_textures_differ_from_plain():
  obj = scenes.Obj('square', 'red', 'large', 'plain', 0.5, 0.5)
  bg = scenes.sample_background(np.random.default_rng(0))
  plain = scenes.render([obj], bg, 64)
  body = np.any(plain != scenes.render([], bg, 64), axis=-1).sum()
  for texture in ('striped', 'dotted'):
    textured = scenes.render([obj.replace(texture=texture)], bg, 64)
    changed = np.any(textured != plain, axis=-1).sum()
    # Some of the body is pattern, most of it base colour.
    assert 0.05 * body < changed < 0.5 * body, texture


def test_objects_stay_in_their_cells():
  for index in range(100):
    for obj in _scene(index).objects:
      row, col = obj.cell
      assert col / 3 <= obj.x - obj.radius and obj.x + obj.radius <= (
          col + 1) / 3
      assert row / 3 <= obj.y - obj.radius and obj.y + obj.radius <= (
          row + 1) / 3


def test_bad_arguments_raise():
  rng = np.random.default_rng(0)
  with pytest.raises(ValueError, match='max_objects'):
    scenes.sample_scene(rng, max_objects=0)
  with pytest.raises(ValueError, match='Image size'):
    scenes.render_scene(_scene(0), 8)
  with pytest.raises(ValueError, match='Unknown shape'):
    scenes.render([scenes.Obj('blob', 'red', 'small', 'plain', .5, .5)],
                  scenes.sample_background(rng), 32)
