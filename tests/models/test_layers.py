"""Attention through jax.nn.dot_product_attention, and Dense."""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flamingo_jax.models import layers

B, T, S, H, K = 2, 5, 7, 3, 4


def reference_attention(q, k, v, mask=None, bias=None):
  """Masked softmax attention written out; masked-out rows give 0."""
  logits = jnp.einsum('bthk,bshk->bhts', q, k) * K**-0.5  # [B, H, T, S]
  if bias is not None:
    logits = logits + bias
  if mask is not None:
    logits = jnp.where(mask, logits, -jnp.inf)
  peak = jnp.max(logits, axis=-1, keepdims=True)  # [B, H, T, 1]
  peak = jnp.where(jnp.isfinite(peak), peak, 0.0)
  weights = jnp.exp(logits - peak)  # [B, H, T, S]
  total = weights.sum(-1, keepdims=True)
  weights = weights / jnp.where(total > 0, total, 1.0)
  return jnp.einsum('bhts,bshk->bthk', weights, v)  # [B, T, H, K]


def _qkv(seed=0, dtype=jnp.float32):
  keys = jax.random.split(jax.random.PRNGKey(seed), 4)
  q = jax.random.normal(keys[0], [B, T, H, K], dtype)
  k = jax.random.normal(keys[1], [B, S, H, K], dtype)
  v = jax.random.normal(keys[2], [B, S, H, K], dtype)
  bias = jax.random.normal(keys[3], [B, H, T, S], dtype)
  return q, k, v, bias


def _mask():
  mask = np.random.default_rng(0).random([B, 1, T, S]) > 0.4
  mask[0, 0, 1] = False  # A query that sees nothing.
  mask[1, 0, 3] = False
  return jnp.asarray(mask)


def _grads(fn, q, k, v, bias):
  return jax.grad(lambda *a: jnp.sum(jnp.sin(fn(*a))), argnums=(0, 1, 2, 3))(
      q, k, v, bias)


@pytest.mark.parametrize('with_mask,with_bias', [
    (True, True), (True, False), (False, True)])
def test_attention_equals_reference_in_value_and_gradient(with_mask,
                                                          with_bias):
  q, k, v, bias = _qkv()
  mask = _mask() if with_mask else None

  def ours(q, k, v, bias):
    return layers.dot_product_attention(q, k, v, mask,
                                        bias if with_bias else None)

  def reference(q, k, v, bias):
    return reference_attention(q, k, v, mask, bias if with_bias else None)

  np.testing.assert_allclose(ours(q, k, v, bias), reference(q, k, v, bias),
                             atol=1e-6)
  for got, want in zip(_grads(ours, q, k, v, bias),
                       _grads(reference, q, k, v, bias)):
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_query_that_sees_nothing_gets_exactly_zero():
  q, k, v, _ = _qkv()
  out = layers.dot_product_attention(q, k, v, _mask())
  np.testing.assert_array_equal(out[0, 1], 0.0)
  np.testing.assert_array_equal(out[1, 3], 0.0)
  assert np.abs(out[0, 0]).min() > 0


def test_causal_flag_equals_causal_mask():
  q, _, _, bias = _qkv()
  k = v = q  # T == S.
  causal = jnp.tril(jnp.ones([T, T], bool))[None, None]
  np.testing.assert_allclose(
      layers.dot_product_attention(q, k, v, None, bias[..., :T],
                                   is_causal=True),
      reference_attention(q, k, v, causal, bias[..., :T]), atol=1e-6)


def test_bf16_attention_close_to_fp32():
  q, k, v, bias = _qkv()
  mask = _mask()
  low = layers.dot_product_attention(
      *(x.astype(jnp.bfloat16) for x in (q, k, v)), mask,
      bias.astype(jnp.bfloat16))
  assert low.dtype == jnp.bfloat16
  np.testing.assert_allclose(low.astype(jnp.float32),
                             reference_attention(q, k, v, mask, bias),
                             atol=0.05)


def test_implementation_is_xla_off_gpu():
  q = jnp.zeros([1, 2, 1, 8], jnp.bfloat16)
  assert layers.attention_implementations(q) == ('xla',)


def test_dense_equals_linear_in_parameters_value_and_gradient():
  x = jax.random.normal(jax.random.PRNGKey(1), [2, 3, 6])

  def apply(linear):
    model = hk.transform(lambda x: linear(5, name='proj')(x))
    params = model.init(jax.random.PRNGKey(0), x)
    loss = lambda p, x: jnp.sum(jnp.sin(model.apply(p, None, x)))
    return params, model.apply(params, None, x), jax.grad(
        loss, argnums=(0, 1))(params, x)

  linear_params, linear_out, linear_grads = apply(hk.Linear)
  dense_params, dense_out, dense_grads = apply(layers.Dense)
  for got, want in zip(jax.tree.leaves(dense_params),
                       jax.tree.leaves(linear_params)):
    np.testing.assert_array_equal(got, want)
  np.testing.assert_allclose(dense_out, linear_out, atol=1e-6)
  for got, want in zip(jax.tree.leaves(dense_grads),
                       jax.tree.leaves(linear_grads)):
    np.testing.assert_allclose(got, want, atol=1e-5)
  assert jax.tree.structure(dense_params) == jax.tree.structure(linear_params)
