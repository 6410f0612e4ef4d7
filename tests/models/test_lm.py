"""The decoder LM: causality, relative positions, the <EOC> token, sizes."""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flamingo_jax.models import lm

TINY = lm.LM_PARAMS['tiny']


def _lm():
  return hk.without_apply_rng(
      hk.transform(lambda tokens: lm.DecoderLM(**TINY)(tokens)))


@pytest.fixture(scope='module')
def tiny():
  model = _lm()
  tokens = jax.random.randint(jax.random.PRNGKey(0), [2, 10], 0,
                              TINY['vocab_size'])
  return model, model.init(jax.random.PRNGKey(1), tokens), tokens


def test_logits_shape_includes_eoc(tiny):
  model, params, tokens = tiny
  logits = model.apply(params, tokens)
  assert logits.shape == (2, 10, TINY['vocab_size'] + 1)
  assert np.isfinite(logits).all()


def test_causal(tiny):
  model, params, tokens = tiny
  changed = tokens.at[:, 6].set((tokens[:, 6] + 1) % TINY['vocab_size'])
  before, after = model.apply(params, tokens), model.apply(params, changed)
  np.testing.assert_allclose(before[:, :6], after[:, :6], atol=1e-6)
  assert np.abs(before[:, 6:] - after[:, 6:]).max() > 1e-4


def test_eoc_uses_its_own_embedding(tiny):
  model, params, tokens = tiny
  eoc = tokens.at[:, 0].set(TINY['vocab_size'])
  base = model.apply(params, eoc)
  bumped = jax.tree.map(lambda x: x, params)
  bumped['lm'] = dict(params['lm'])
  bumped['lm']['eoc_embedding'] = params['lm']['eoc_embedding'] + 1.0
  moved = model.apply(bumped, eoc)
  assert np.abs(moved - base).max() > 1e-3
  # Tokens that are not <EOC> never read the <EOC> row.
  np.testing.assert_allclose(model.apply(bumped, tokens),
                             model.apply(params, tokens), atol=1e-6)


def test_relative_positions_are_shift_invariant():
  width, heads, size = 32, 4, 8

  def attend(x, positions):
    return lm.RelativeSelfAttention(heads, size, name='attn')(x, positions)

  model = hk.without_apply_rng(hk.transform(attend))
  x = jax.random.normal(jax.random.PRNGKey(0), [1, 6, width])
  positions = jnp.arange(6)[None]
  params = model.init(jax.random.PRNGKey(1), x, positions)
  params = jax.tree.map(lambda p: p + 0.1, params)  # Non-zero u, v biases.
  np.testing.assert_allclose(model.apply(params, x, positions),
                             model.apply(params, x, positions + 7), atol=1e-5)
  # ...but the encoding does depend on relative distance.
  spread = model.apply(params, x, positions * 2)
  assert np.abs(spread - model.apply(params, x, positions)).max() > 1e-4


def test_relative_shift_puts_each_key_on_its_offset():
  length = 5
  x = np.random.default_rng(0).normal(size=[2, 3, length, length]).astype(
      np.float32)
  shifted = np.asarray(lm.relative_shift(jnp.asarray(x)))
  for t in range(length):
    for s in range(t + 1):  # The causal part; the rest is never attended.
      np.testing.assert_array_equal(shifted[:, :, t, s],
                                    x[:, :, t, length - 1 - (t - s)])


def test_contiguous_attention_equals_the_gathered_one():
  """The shift (positions 0..L-1, no cache) computes what the gather does,
  gradients included."""
  width, heads, size, length = 32, 4, 8, 7

  def attend(x, contiguous):
    positions = jnp.broadcast_to(jnp.arange(length), x.shape[:2])
    return lm.RelativeSelfAttention(heads, size, contiguous,
                                    name='attn')(x, positions)

  model = hk.without_apply_rng(hk.transform(attend))
  x = jax.random.normal(jax.random.PRNGKey(0), [2, length, width])
  params = model.init(jax.random.PRNGKey(1), x, False)
  params = jax.tree.map(lambda p: p + 0.1, params)  # Non-zero u, v biases.
  loss = lambda p, contiguous: jnp.sum(model.apply(p, x, contiguous) ** 2)
  np.testing.assert_allclose(model.apply(params, x, True),
                             model.apply(params, x, False), rtol=1e-5,
                             atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                       atol=1e-5),
               jax.grad(loss)(params, True), jax.grad(loss)(params, False))
  # The LM takes the shift when it makes the positions itself.
  model = _lm()
  tokens = jax.random.randint(jax.random.PRNGKey(2), [2, length], 0,
                              TINY['vocab_size'])
  params = model.init(jax.random.PRNGKey(3), tokens)
  explicit = hk.without_apply_rng(hk.transform(
      lambda t: lm.DecoderLM(**TINY)(t, positions=lm.default_positions(t))))
  np.testing.assert_allclose(model.apply(params, tokens),
                             explicit.apply(params, tokens), rtol=1e-5,
                             atol=1e-5)


def test_bad_token_rank():
  model = _lm()
  with pytest.raises(ValueError, match=r'\[B, L\].*\(10,\)'):
    model.init(jax.random.PRNGKey(0), jnp.zeros([10], jnp.int32))


@pytest.mark.parametrize('size,expected', [('3B', 1.44e9), ('80B', 70.3e9)])
def test_full_size_parameter_counts(size, expected):
  config = lm.LM_PARAMS[size]
  model = hk.transform(lambda tokens: lm.DecoderLM(**config)(tokens))
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                          jnp.zeros([1, 4], jnp.int32))
  count = sum(np.prod(x.shape) for x in jax.tree.leaves(shapes))
  assert abs(count - expected) / expected < 0.01, count
  blocks = shapes['lm/blocks/block/self_attention/query']['w']
  assert blocks.shape == (config['num_layers'], config['width'],
                          config['width'])
