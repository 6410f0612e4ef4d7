"""Mixed precision: bf16 storage and compute, fp32 where it matters."""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flamingo_jax.models import flamingo
from flamingo_jax.models import precision
from flamingo_jax.training import optim
from tests import training as training_tests

TINY = flamingo.model_config('tiny')
B, L, N = 2, 12, 2
F32, BF16 = jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)


def _inputs():
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, TINY['lm']['vocab_size'], [B, L]).astype(np.int32)
  size = TINY['image_size']
  media = rng.integers(0, 256, [B, N, 1, size, size, 3]).astype(np.uint8)
  media_index = np.tile(np.minimum(np.arange(L) // 4, N), (B, 1))
  return tokens, media, np.ones([B, N], bool), media_index.astype(np.int32)


def _dtypes(tree) -> set[jnp.dtype]:
  return {leaf.dtype for leaf in jax.tree.leaves(tree)}


def test_cast_frozen_and_compute_params():
  trainable = {'a': {'w': jnp.ones([2], F32)}}
  frozen = {'b': {'w': jnp.ones([2], F32), 'ids': jnp.arange(2)}}
  frozen = precision.cast_frozen(frozen)
  assert frozen['b']['w'].dtype == BF16
  assert frozen['b']['ids'].dtype == jnp.int32  # Only floats are cast.
  merged = precision.compute_params(trainable, frozen, jnp.bfloat16)
  assert set(merged) == {'a', 'b'}
  assert merged['a']['w'].dtype == merged['b']['w'].dtype == BF16


def test_gradients_of_fp32_params_stay_fp32():
  trainable = {'a': {'w': jnp.ones([2], F32)}}
  frozen = precision.cast_frozen({'b': {'w': jnp.ones([2], F32)}})

  def loss(trainable):
    params = precision.compute_params(trainable, frozen, jnp.bfloat16)
    return jnp.sum(params['a']['w'] * params['b']['w']).astype(F32)

  assert jax.grad(loss)(trainable)['a']['w'].dtype == F32


def test_scope_casts_inputs_and_keeps_norms_fp32():

  def forward(x):
    h = hk.Linear(4, name='linear')(x)
    return h, hk.RMSNorm(-1, name='norm')(h)

  model = precision.with_compute_dtype(hk.transform(forward), jnp.bfloat16)
  x = jnp.asarray(np.random.default_rng(0).standard_normal([3, 4]), F32)
  params = model.init(jax.random.PRNGKey(0), x)
  assert _dtypes(params) == {F32}  # Init is left in fp32.
  h, normed = model.apply(params, None, x)
  assert h.dtype == normed.dtype == BF16
  def norm(h):
    return hk.RMSNorm(-1, name='norm')(h)

  expected = hk.transform(norm).apply({'norm': params['norm']}, None,
                                      h.astype(F32))
  np.testing.assert_array_equal(normed, expected.astype(BF16))


@pytest.fixture(scope='module')
def logits():
  """fp32 and bf16 logits of the tiny Flamingo, gates open."""
  model = flamingo.transform(TINY)
  inputs = _inputs()
  params = training_tests.random_params(flamingo.abstract_params(TINY))
  trainable, frozen = optim.partition(params, optim.FLAMINGO_FREEZE_RULES)
  bf16_model = precision.with_compute_dtype(model, jnp.bfloat16)
  mixed = jax.jit(bf16_model.apply)(
      optim.merge(trainable, precision.cast_frozen(frozen)), None, *inputs)
  full = jax.jit(model.apply)(params, None, *inputs)
  return np.asarray(full), mixed


def test_bf16_forward_is_close_to_fp32(logits):
  full, mixed = logits
  assert mixed.dtype == BF16
  mixed = np.asarray(mixed, np.float32)
  assert np.isfinite(mixed).all()
  # bf16 has an 8-bit mantissa: about 1% of the logits' scale.
  scale = np.abs(full).max()
  np.testing.assert_allclose(mixed, full, atol=0.05 * scale)
  assert np.abs(mixed - full).mean() < 0.01 * scale
  assert (mixed.argmax(-1) == full.argmax(-1)).mean() > 0.9
