"""GATED XATTN-DENSE: zero-initialised gates, the phi masks, the variants."""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flamingo_jax.models import xattn

B, L, N, R, D, DV = 2, 9, 3, 4, 16, 12
# Token t of row 0 attends to image phi[t]: none, then images 1, 2, 3.
PHI = np.array([[0, 0, 1, 1, 1, 2, 2, 3, 3],
                [1, 1, 1, 1, 1, 1, 1, 1, 1]])
MEDIA_MASK = np.array([[True, True, True], [True, False, False]])


def _block(**kwargs):
  def forward(y, visual, mask, positions):
    block = xattn.GatedXAttnDense(num_heads=2, head_size=8, name='block',
                                  **kwargs)
    return block(y, visual, mask, positions)
  return hk.without_apply_rng(hk.transform(forward))


def _inputs(seed=0):
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  y = jax.random.normal(k1, [B, L, D])
  visual = jax.random.normal(k2, [B, N, R, DV])
  positions = jnp.broadcast_to(jnp.arange(L), (B, L))
  return y, visual, positions


def _run(model, params, y, visual, phi=PHI, attend='last_image'):
  mask = xattn.cross_attention_mask(jnp.asarray(phi), jnp.asarray(MEDIA_MASK),
                                    R, attend)
  positions = jnp.broadcast_to(jnp.arange(L), (B, L))
  return model.apply(params, y, visual.reshape(B, N * R, DV), mask, positions)


def _replace_image(visual, j):
  """Image j of row 0 replaced by other features (LayerNorm ignores shifts)."""
  other = jax.random.normal(jax.random.PRNGKey(100 + j), visual.shape[2:])
  return visual.at[0, j].set(other)


def _opened(params):
  """Sets both gates to 1, so the block's outputs show."""
  params = {k: dict(v) for k, v in params.items()}
  params['block']['attn_gate'] = jnp.ones([])
  params['block']['ffw_gate'] = jnp.ones([])
  return params


@pytest.fixture(scope='module')
def gated():
  model = _block()
  y, visual, positions = _inputs()
  mask = jnp.ones([B, L, N * R], bool)
  params = model.init(jax.random.PRNGKey(0), y,
                      visual.reshape(B, N * R, DV), mask, positions)
  return model, params


def test_gates_are_zero_scalars_and_block_is_identity(gated):
  model, params = gated
  assert params['block']['attn_gate'].shape == ()
  assert params['block']['ffw_gate'].shape == ()
  assert float(params['block']['attn_gate']) == 0.0
  y, visual, _ = _inputs()
  np.testing.assert_array_equal(_run(model, params, y, visual), y)


def test_changing_image_j_changes_only_its_tokens(gated):
  model, params = gated
  params = _opened(params)
  y, visual, _ = _inputs()
  base = _run(model, params, y, visual)
  for j in range(N):
    changed = _replace_image(visual, j)
    delta = np.abs(_run(model, params, y, changed) - base)[0].max(axis=-1)
    attends_j = PHI[0] == j + 1
    assert (delta[attends_j] > 1e-4).all(), (j, delta)
    np.testing.assert_array_equal(delta[~attends_j], 0.0)


def test_tokens_before_first_image_get_exactly_zero_cross_attention():
  model = _block(xattn_type='vanilla_xattn', gating='none')
  y, visual, positions = _inputs()
  mask = jnp.ones([B, L, N * R], bool)
  params = model.init(jax.random.PRNGKey(0), y, visual.reshape(B, N * R, DV),
                      mask, positions)
  out = _run(model, params, y, visual)
  # Vanilla xattn has no dense layer: no image -> the residual passes as is.
  np.testing.assert_array_equal(out[0, :2], y[0, :2])
  assert np.abs(out[0, 2:] - y[0, 2:]).min() > 0


def test_all_previous_images_mask():
  mask = xattn.cross_attention_mask(jnp.asarray(PHI), jnp.asarray(MEDIA_MASK),
                                    R, 'all_previous_images')
  per_slot = np.asarray(mask).reshape(B, L, N, R)[..., 0]  # [B, L, N]
  expected = (np.arange(1, N + 1)[None, None] <= PHI[..., None])
  expected &= MEDIA_MASK[:, None, :]
  np.testing.assert_array_equal(per_slot, expected)
  last = xattn.cross_attention_mask(jnp.asarray(PHI), jnp.asarray(MEDIA_MASK),
                                    R, 'last_image')
  per_slot = np.asarray(last).reshape(B, L, N, R)[..., 0]
  np.testing.assert_array_equal(per_slot.sum(-1), (PHI > 0).astype(int))


def test_all_previous_images_sees_earlier_images(gated):
  model, params = gated
  params = _opened(params)
  y, visual, _ = _inputs()
  changed = _replace_image(visual, 0)  # Image 1.
  base = _run(model, params, y, visual, attend='all_previous_images')
  delta = np.abs(_run(model, params, y, changed, attend='all_previous_images')
                 - base)[0].max(axis=-1)
  assert (delta[PHI[0] >= 1] > 1e-4).all()
  np.testing.assert_array_equal(delta[PHI[0] == 0], 0.0)


def test_no_tanh_gating_has_no_gate_parameters_and_acts_at_init():
  model = _block(gating='none')
  y, visual, positions = _inputs()
  mask = jnp.ones([B, L, N * R], bool)
  params = model.init(jax.random.PRNGKey(0), y, visual.reshape(B, N * R, DV),
                      mask, positions)
  assert 'attn_gate' not in params.get('block', {})
  assert np.abs(_run(model, params, y, visual) - y).max() > 1e-3


def test_grafting_block_has_self_attention():
  model = _block(xattn_type='grafting')
  y, visual, positions = _inputs()
  mask = jnp.ones([B, L, N * R], bool)
  params = model.init(jax.random.PRNGKey(0), y, visual.reshape(B, N * R, DV),
                      mask, positions)
  assert 'block/self_attention/query' in params
  assert 'block/ffw/hidden' in params


def test_unknown_variant_raises():
  with pytest.raises(ValueError, match='xattn_type'):
    _block(xattn_type='bogus').init(
        jax.random.PRNGKey(0), *_inputs()[:1],
        jnp.zeros([B, 4, DV]), jnp.ones([B, L, 4], bool),
        jnp.zeros([B, L], jnp.int32))
