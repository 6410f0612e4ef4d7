"""Tests for flamingo_jax.models.vit."""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flamingo_jax.models import vit

TINY = vit.VIT_PARAMS['tiny']
TINY_IMAGE_SIZE = 16  # A 4x4 grid of 4-pixel patches.


def _transformed(variant: str = 'tiny',
                 image_size: int = TINY_IMAGE_SIZE) -> hk.Transformed:
  return hk.transform(lambda x: vit.VisionTransformer(
      variant, image_size=image_size)(x, is_training=False))


def _images(shape: tuple[int, ...]) -> jax.Array:
  return jax.random.uniform(jax.random.PRNGKey(0), shape)


def _param_count(params) -> int:
  return sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))


# One tiny model, initialised and compiled once for the tests that share it.
_TINY_MODEL = _transformed()
_apply = jax.jit(_TINY_MODEL.apply)


@pytest.fixture(scope='module', name='params')
def _params_fixture() -> hk.Params:
  images = _images((1, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, 3))
  return jax.jit(_TINY_MODEL.init)(jax.random.PRNGKey(0), images)


def test_tiny_shapes(params):
  images = _images((2, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, 3))
  out = _apply(params, None, images)
  assert out['tokens'].shape == (2, 16, TINY['width'])
  assert out['pooled'].shape == (2, TINY['embed_dim'])
  assert vit.feature_width('tiny') == TINY['width']
  assert vit.feature_width('L/14') == 1024
  # Blocks are stacked: one set of block parameters with a leading depth axis.
  query = params['vit/transformer/attention/query']['w']
  assert query.shape == (TINY['depth'], TINY['width'], TINY['width'])
  assert params['vit']['position_embeddings'].shape == (17, TINY['width'])
  assert 'b' not in params['vit/patch_embedding']
  assert 'b' not in params['vit/projection']


def test_l14_has_clip_parameter_count():
  f = _transformed('L/14', image_size=224)
  images = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
  params = jax.eval_shape(f.init, jax.random.PRNGKey(0), images)
  count = _param_count(params)
  print(f'ViT-L/14 parameters: {count:,}')
  assert 303e6 <= count <= 304e6, count


def test_other_resolution_resizes_position_embeddings(params):
  out = _apply(params, None, _images((2, 24, 32, 3)))  # A 6x8 patch grid.
  assert out['tokens'].shape == (2, 48, TINY['width'])
  assert out['pooled'].shape == (2, TINY['embed_dim'])
  assert np.all(np.isfinite(out['tokens']))


def test_resize_position_embeddings():
  table = jax.random.normal(jax.random.PRNGKey(0), (1 + 16, 3))  # 4x4 grid.
  np.testing.assert_array_equal(
      vit.resize_position_embeddings(table, (4, 4)), table)
  resized = vit.resize_position_embeddings(table, (6, 8))
  assert resized.shape == (1 + 48, 3)
  np.testing.assert_array_equal(resized[0], table[0])  # Class token as is.
  # A constant grid stays constant.
  constant = jnp.concatenate([table[:1], jnp.full((16, 3), 0.5)])
  np.testing.assert_allclose(
      vit.resize_position_embeddings(constant, (6, 8))[1:], 0.5, rtol=1e-6)


@pytest.mark.parametrize('shape, match', [
    ((16, 16, 3), r'\[B, H, W, 3\]'),
    ((1, 16, 16, 1), r'3 channels'),
    ((1, 18, 16, 3), r'patch size 4'),
])
def test_bad_images_raise(shape, match):
  f = _transformed()
  with pytest.raises(ValueError, match=match) as error:
    f.init(jax.random.PRNGKey(0), jnp.zeros(shape))
  assert str(shape) in str(error.value)


def test_bad_configuration_raises():
  with pytest.raises(ValueError, match='X/99'):
    _transformed('X/99').init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))
  with pytest.raises(ValueError, match='18'):
    _transformed(image_size=18).init(
        jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))


def test_h14_has_openclip_parameter_count():
  f = _transformed('H/14', image_size=224)
  images = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
  count = _param_count(jax.eval_shape(f.init, jax.random.PRNGKey(0), images))
  assert 632e6 <= count <= 633e6, count  # OpenCLIP ViT-H-14's visual tower.


def test_custom_sizes_and_options():
  with pytest.raises(ValueError, match="'custom' needs every size"):
    vit.sizes('custom', width=32)
  for bad, message in ((dict(tokens='middle'), 'Unknown ViT tokens'),
                       (dict(activation='relu'), 'Unknown ViT activation')):
    with pytest.raises(ValueError, match=message):
      hk.transform(lambda: vit.VisionTransformer('tiny', **bad)).init(None)
  model = hk.transform(lambda x: vit.VisionTransformer(
      'custom', image_size=16, patch_size=4, width=8, depth=2, num_heads=2,
      mlp_dim=16, embed_dim=4, tokens='penultimate_block',
      keep_class_token=True, projection=False)(x, is_training=False))
  images = _images((2, 16, 16, 3))
  params = model.init(jax.random.PRNGKey(0), images)
  out = model.apply(params, None, images)
  assert out['tokens'].shape == (2, 17, 8)  # Class token kept.
  assert out['pooled'].shape == (2, 8)  # No projection.
  assert not any('projection' in m for m in params)
