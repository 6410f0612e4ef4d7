"""Tests for flamingo_jax.models.nfnet.

Full-size variants are checked with jax.eval_shape only; numerics use the
'tiny' variant.
"""

import functools

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flamingo_jax.models import nfnet

_TINY_SIZE = 64
_BATCH = 4


def _encoder(variant, num_classes=None, stochastic_depth_rate=0.1):
  def forward(images, is_training):
    return nfnet.NFNet(variant, num_classes=num_classes,
                       stochastic_depth_rate=stochastic_depth_rate)(
                           images, is_training=is_training)
  return hk.transform(forward)


# Eager Haiku init/apply compiles every op shape separately (slow on CPU):
# jit them, once per configuration.
@functools.cache
def _tiny_apply(num_classes=None, stochastic_depth_rate=0.1,
                is_training=False):
  """Jitted apply(params, rng, images) of the tiny variant."""
  model = _encoder('tiny', num_classes, stochastic_depth_rate)
  return jax.jit(functools.partial(model.apply, is_training=is_training))


def _rng(seed=0):
  # XLA compiles the 'rbg' generator much faster than threefry on CPU.
  return jax.random.key(seed, impl='rbg')


@pytest.fixture(scope='module')
def tiny_params():
  """Initial parameters of the tiny variant with a 10-class head."""
  init = _encoder('tiny', num_classes=10).init
  return jax.jit(functools.partial(init, is_training=False))(
      _rng(), _images())


def _without_head(params):
  return {m: p for m, p in params.items() if m != 'nfnet/classifier'}


def _images(batch=_BATCH, size=_TINY_SIZE, seed=0):
  return jax.random.normal(jax.random.key(seed), (batch, size, size, 3))


def _num_params(params):
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))


def _abstract_params(variant, num_classes):
  images = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
  init = _encoder(variant, num_classes).init
  return jax.eval_shape(lambda rng: init(rng, images, False),
                        jax.random.key(0))


def _with_skip_gains(params, value):
  return {
      module: ({**p, 'skip_gain': jnp.full((), value, p['skip_gain'].dtype)}
               if 'skip_gain' in p else p)
      for module, p in params.items()
  }


# Parameter counts.


@pytest.mark.parametrize('variant, num_classes, expected', [
    ('F0', 1000, 71.5e6),  # NFNet paper, Table 3.
    ('F6', 1000, 438.4e6),  # NFNet paper, Table 3.
    ('F6', None, 435e6),  # Flamingo paper, Table 5 ("vision 435M").
])
def test_parameter_count(variant, num_classes, expected):
  count = _num_params(_abstract_params(variant, num_classes))
  assert count == pytest.approx(expected, rel=0.01), count


def test_parameter_paths_of_a_block():
  params = _abstract_params('F0', 1000)
  block = {f'{m}/{n}': p.shape for m, ps in params.items()
           for n, p in ps.items() if m.startswith('nfnet/stage2_block0')}
  assert block == {
      'nfnet/stage2_block0/skip_gain': (),
      'nfnet/stage2_block0/conv0/w': (1, 1, 512, 768),
      'nfnet/stage2_block0/conv0/gain': (768,),
      'nfnet/stage2_block0/conv0/bias': (768,),
      'nfnet/stage2_block0/conv1/w': (3, 3, 128, 768),  # 6 groups of 128.
      'nfnet/stage2_block0/conv1/gain': (768,),
      'nfnet/stage2_block0/conv1/bias': (768,),
      'nfnet/stage2_block0/conv1b/w': (3, 3, 128, 768),
      'nfnet/stage2_block0/conv1b/gain': (768,),
      'nfnet/stage2_block0/conv1b/bias': (768,),
      'nfnet/stage2_block0/conv2/w': (1, 1, 768, 1536),
      'nfnet/stage2_block0/conv2/gain': (1536,),
      'nfnet/stage2_block0/conv2/bias': (1536,),
      'nfnet/stage2_block0/conv_shortcut/w': (1, 1, 512, 1536),
      'nfnet/stage2_block0/conv_shortcut/gain': (1536,),
      'nfnet/stage2_block0/conv_shortcut/bias': (1536,),
      'nfnet/stage2_block0/squeeze_excite/fc0/w': (1536, 768),
      'nfnet/stage2_block0/squeeze_excite/fc0/b': (768,),
      'nfnet/stage2_block0/squeeze_excite/fc1/w': (768, 1536),
      'nfnet/stage2_block0/squeeze_excite/fc1/b': (1536,),
  }
  others = {m for m in params if '_block' not in m}
  assert others == {'nfnet/stem_conv0', 'nfnet/stem_conv1', 'nfnet/stem_conv2',
                    'nfnet/stem_conv3', 'nfnet/final_conv', 'nfnet/classifier'}
  # The second block of a stage keeps width and resolution: no projection.
  assert 'nfnet/stage2_block1/conv_shortcut' not in params


# Shapes.


@pytest.mark.parametrize('variant', ['F0', 'F1', 'F2', 'F3', 'F4', 'F5', 'F6'])
def test_token_shape_at_test_resolution(variant):
  size = nfnet.NFNET_PARAMS[variant]['test_imsize']
  images = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
  model = _encoder(variant)

  def init_and_apply(rng, images):
    params = model.init(rng, images, False)
    return model.apply(params, None, images, False)

  out = jax.eval_shape(init_and_apply, jax.random.key(0), images)
  side = size // 32
  assert out['tokens'].shape == (2, side * side, 3072)
  assert out['pooled'].shape == (2, 3072)
  assert 'logits' not in out
  assert nfnet.feature_width(variant) == 3072


def test_flamingo_resolution_gives_100_tokens():
  images = jax.ShapeDtypeStruct((1, 320, 320, 3), jnp.float32)
  model = _encoder('F6')
  out = jax.eval_shape(
      lambda rng, x: model.apply(model.init(rng, x, False), None, x, False),
      jax.random.key(0), images)
  assert out['tokens'].shape == (1, 100, 3072)


def test_non_square_images():
  images = jax.ShapeDtypeStruct((2, 64, 96, 3), jnp.float32)
  model = _encoder('tiny')
  out = jax.eval_shape(
      lambda rng, x: model.apply(model.init(rng, x, False), None, x, False),
      jax.random.key(0), images)
  assert out['tokens'].shape == (2, 2 * 3, 128)  # Row-major 2 x 3 grid.


def test_tiny_output_shapes_and_values(tiny_params):
  out = _tiny_apply(num_classes=10)(tiny_params, None, _images())
  width = nfnet.feature_width('tiny')
  assert width == 128
  assert out['tokens'].shape == (_BATCH, 2 * 2, width)
  assert out['pooled'].shape == (_BATCH, width)
  assert out['logits'].shape == (_BATCH, 10)
  np.testing.assert_allclose(out['pooled'], out['tokens'].mean(axis=1),
                             rtol=1e-5, atol=1e-6)
  assert np.all(np.isfinite(out['tokens']))
  # The tokens are post-GELU: bounded below by gamma * min(gelu) ~ -0.29.
  assert out['tokens'].min() >= nfnet.GELU_GAMMA * -0.18
  # Zero-initialised head and skip gains.
  np.testing.assert_array_equal(out['logits'], 0.0)
  gains = [p['skip_gain'] for p in tiny_params.values() if 'skip_gain' in p]
  assert len(gains) == sum(nfnet.NFNET_PARAMS['tiny']['depths'])
  np.testing.assert_array_equal(gains, 0.0)


def test_feature_width_rejects_unknown_variant():
  with pytest.raises(ValueError, match='F0'):
    nfnet.feature_width('F9')
  with pytest.raises(ValueError, match="'F9'"):
    hk.transform(lambda: nfnet.NFNet('F9')).init(None)


# Signal propagation.


def test_scaled_gelu_preserves_unit_variance():
  z = jax.random.normal(jax.random.key(0), (1_000_000,))
  assert float(jnp.std(nfnet.scaled_gelu(z))) == pytest.approx(1.0, rel=0.01)


def test_ws_conv_kernel_is_standardised():
  def kernel():
    conv = nfnet.WSConv2D(5, 3, name='conv')
    return conv.standardized_kernel(in_channels=4, dtype=jnp.float32)

  model = hk.transform(kernel)
  params = jax.jit(model.init)(_rng())
  params['conv']['w'] = params['conv']['w'] * 7.0 + 3.0  # WS undoes this.
  params['conv']['gain'] = jnp.arange(1.0, 6.0)
  w = jax.jit(model.apply)(params, None)  # [3, 3, 4, 5]
  fan_in = 3 * 3 * 4
  np.testing.assert_allclose(w.mean(axis=(0, 1, 2)), 0.0, atol=1e-6)
  np.testing.assert_allclose(w.std(axis=(0, 1, 2)) * np.sqrt(fan_in),
                             np.arange(1.0, 6.0), rtol=1e-4)


def test_block_schedule_betas_and_drop_rates():
  specs = nfnet.block_schedule('F0', stochastic_depth_rate=0.1)
  assert len(specs) == 12
  assert [s.name for s in specs[:4]] == [
      'stage0_block0', 'stage1_block0', 'stage1_block1', 'stage2_block0']
  assert [s.stride for s in specs[:4]] == [1, 2, 1, 2]
  # Variance grows by alpha^2 = 0.04 per block; a stage's first block
  # projects a unit-variance input, so the count restarts after it.
  expected_var = [1.0, 1.04, 1.04, 1.08, 1.04, 1.08, 1.12, 1.16, 1.20, 1.24,
                  1.04, 1.08]
  np.testing.assert_allclose([s.beta for s in specs],
                             1.0 / np.sqrt(expected_var), rtol=1e-6)
  np.testing.assert_allclose([s.stochastic_depth_rate for s in specs],
                             0.1 * np.arange(12) / 12)


# Residual blocks at init.


def _numpy_ws_conv1x1(x, params):
  w = np.asarray(params['w'])[0, 0]  # [Cin, C']
  w = (w - w.mean(axis=0)) / (w.std(axis=0) * np.sqrt(w.shape[0]))
  return x @ (w * np.asarray(params['gain'])) + np.asarray(params['bias'])


def _numpy_scaled_gelu(x):
  return np.asarray(nfnet.scaled_gelu(jnp.asarray(x)))


@pytest.mark.parametrize('in_channels, stride', [(16, 1), (8, 1), (8, 2)])
def test_block_is_its_shortcut_at_init(in_channels, stride):
  beta = 0.8

  def block(x):
    return nfnet.NFBlock(16, stride=stride, beta=beta, group_width=4,
                         name='block')(x, is_training=False)

  model = hk.transform(block)
  x = _images(batch=2, size=8)
  x = jnp.concatenate([x] * 6, axis=-1)[..., :in_channels]  # [2, 8, 8, Cin]
  params = jax.jit(model.init)(_rng(1), x)
  # Biases, gains and SE weights are non-trivial, as after training.
  params = jax.tree.map(lambda p: p + 0.3, params)
  params = _with_skip_gains(params, 0.0)
  apply = jax.jit(model.apply)
  out = np.asarray(apply(params, None, x))

  x = np.asarray(x)
  if in_channels == 16 and stride == 1:
    expected = x  # Identity shortcut, exactly.
    assert 'block/conv_shortcut' not in params
  else:
    normed = _numpy_scaled_gelu(x) * beta
    if stride == 2:  # 2x2 average pooling.
      normed = normed.reshape(2, 4, 2, 4, 2, in_channels).mean(axis=(2, 4))
    expected = _numpy_ws_conv1x1(normed, params['block/conv_shortcut'])
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)

  # With a non-zero skip gain, the residual branch contributes.
  out = apply(_with_skip_gains(params, 1.0), None, jnp.asarray(x))
  assert np.abs(np.asarray(out) - expected).max() > 1e-2


def test_network_ignores_residual_branches_at_init(tiny_params):
  apply = _tiny_apply()
  params = _without_head(tiny_params)
  images = _images()
  reference = apply(params, None, images)['tokens']

  # Replace every residual-branch parameter by noise.
  branch = ('/conv0', '/conv1', '/conv1b', '/conv2', '/squeeze_excite')
  rng = np.random.default_rng(1)  # numpy: no per-shape compilation.
  perturbed = {}
  for module, module_params in params.items():
    if any(b in module for b in branch):
      module_params = {n: rng.standard_normal(p.shape).astype(np.float32)
                       for n, p in module_params.items()}
    perturbed[module] = module_params
  assert sum(m != 'nfnet/stage0_block0/conv0' and '/conv0' in m
             for m in perturbed) == 4  # All blocks are covered.

  out = apply(perturbed, None, images)['tokens']
  np.testing.assert_array_equal(out, reference)
  # Sanity check that the perturbation matters once the gains open.
  gated = apply(_with_skip_gains(perturbed, 1.0), None, images)['tokens']
  assert np.abs(np.asarray(gated - reference)).max() > 1e-3


# Stochastic depth.


def test_stochastic_depth_only_when_training(tiny_params):
  # Open the gains, otherwise the dropped branches are zero anyway.
  params = _with_skip_gains(_without_head(tiny_params), 1.0)
  images = _images()
  train = _tiny_apply(stochastic_depth_rate=0.9, is_training=True)
  # In evaluation the rate is unused: any rate's apply will do.
  evaluation = _tiny_apply()(params, None, images)['tokens']
  train_a = train(params, _rng(1), images)['tokens']
  train_a2 = train(params, _rng(1), images)['tokens']
  train_b = train(params, _rng(2), images)['tokens']

  np.testing.assert_array_equal(train_a, train_a2)  # Deterministic given rng.
  assert not np.allclose(train_a, evaluation)
  assert not np.allclose(train_a, train_b)


def test_drop_path_drops_whole_examples():
  x = jnp.ones((64, 3, 3, 2))
  out = np.asarray(nfnet.drop_path(x, 0.5, jax.random.key(0)))
  per_example = out.reshape(64, -1)
  assert set(np.unique(per_example)) == {0.0, 1.0}
  # Each example is either kept whole or dropped whole, and both happen.
  assert np.all(per_example.min(axis=1) == per_example.max(axis=1))
  assert 10 < per_example[:, 0].sum() < 54


def test_no_rng_needed_without_stochastic_depth(tiny_params):
  params = _with_skip_gains(_without_head(tiny_params), 1.0)
  images = _images()
  train = _tiny_apply(stochastic_depth_rate=0.0, is_training=True)(
      params, None, images)['tokens']
  evaluation = _tiny_apply()(params, None, images)['tokens']
  np.testing.assert_array_equal(train, evaluation)


def test_head_dropout_only_when_training(tiny_params):
  params = dict(tiny_params)
  params['nfnet/classifier'] = {
      'w': jnp.ones_like(tiny_params['nfnet/classifier']['w']),
      'b': tiny_params['nfnet/classifier']['b']}
  images = _images()
  train = _tiny_apply(num_classes=10, stochastic_depth_rate=0.0,
                      is_training=True)
  evaluation = _tiny_apply(num_classes=10)(params, None, images)['logits']
  logits = train(params, _rng(1), images)['logits']
  assert not np.allclose(logits, evaluation)
  with pytest.raises(ValueError, match='PRNGKey'):
    train(params, None, images)


# Input validation.


@pytest.mark.parametrize('shape', [
    (64, 64, 3),  # No batch axis.
    (2, 64, 64, 1),  # Grayscale.
    (2, 3, 64, 64),  # Channels first.
    (2, 48, 64, 3),  # Height not a multiple of 32.
    (2, 64, 0, 3),  # Empty.
])
def test_rejects_bad_image_shapes(shape):
  model = _encoder('tiny')
  with pytest.raises(ValueError, match='B, H, W, 3') as error:
    model.init(jax.random.key(0), jnp.zeros(shape), False)
  assert str(shape) in str(error.value)


def test_rejects_bad_stochastic_depth_rate():
  with pytest.raises(ValueError, match='1.5'):
    hk.transform(lambda: nfnet.NFNet('tiny', stochastic_depth_rate=1.5)).init(
        None)
