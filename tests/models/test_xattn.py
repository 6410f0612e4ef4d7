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


# The per-image form (attend='last_image'): tokens packed by image.
# Any phi: out of order, 0s, and slots without a medium (row 1's slot 2,
# row 2's slots 1 and 4).
ROUTED_PHI = np.array([[3, 3, 1, 0, 2, 2, 4, 1, 1, 1, 4, 0, 3],
                       [0, 1, 1, 1, 2, 2, 3, 3, 3, 4, 4, 4, 4],
                       [4, 1, 2, 2, 2, 2, 2, 3, 0, 0, 1, 2, 3]])
ROUTED_MEDIA_MASK = np.array([[True, True, True, True],
                              [True, False, True, True],
                              [False, True, True, False]])


def _routed_block_grads(routing, seed=0):
  """Loss and gradients (params, queries, visual) of one opened block."""
  batch, length = ROUTED_PHI.shape
  num_media = ROUTED_MEDIA_MASK.shape[1]
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  y = jax.random.normal(k1, [batch, length, D])
  visual = jax.random.normal(k2, [batch, num_media * R, DV])
  positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
  model = _block(gating='none')
  params = model.init(jax.random.PRNGKey(0), y, visual,
                      jnp.ones([batch, length, num_media * R], bool),
                      positions)

  def loss(params, y, visual):
    out = model.apply(params, y, visual, routing, positions)
    return jnp.sum(jnp.sin(out))

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(
      params, y, visual)


@pytest.mark.parametrize('group_size', [1, 3, 64])
def test_per_image_form_equals_dense_in_value_and_gradient(group_size):
  phi, media_mask = jnp.asarray(ROUTED_PHI), jnp.asarray(ROUTED_MEDIA_MASK)
  dense = _routed_block_grads(xattn.cross_attention_mask(phi, media_mask, R))
  routed = _routed_block_grads(
      xattn.route_by_image(phi, media_mask, group_size))
  np.testing.assert_allclose(routed[0], dense[0], rtol=1e-6)
  for got, want in zip(jax.tree.leaves(routed[1]), jax.tree.leaves(dense[1])):
    np.testing.assert_allclose(got, want, rtol=1e-5,
                               atol=1e-5 * float(np.abs(want).max()))
  # Tokens that see no image get nothing from it: no gradient either.
  sees_nothing = ~np.take_along_axis(
      ROUTED_MEDIA_MASK, np.clip(ROUTED_PHI - 1, 0, 3), 1) | (ROUTED_PHI == 0)
  visual_grad = np.asarray(routed[1][2]).reshape(3, 4, R, DV)
  np.testing.assert_array_equal(visual_grad[~ROUTED_MEDIA_MASK], 0.0)
  assert sees_nothing.any()


@pytest.mark.parametrize('group_size', [1, 3, 4])
def test_routing_packs_each_group_with_tokens_of_one_image(group_size):
  routing = jax.device_get(xattn.route_by_image(
      jnp.asarray(ROUTED_PHI), jnp.asarray(ROUTED_MEDIA_MASK), group_size))
  batch, length = ROUTED_PHI.shape
  image_of_group = routing.image.argmax(-1)  # [B, G]
  assert routing.image.sum(-1).max() == 1  # One-hot.
  for b in range(batch):
    sees = ROUTED_PHI[b] >= 1
    sees &= ROUTED_MEDIA_MASK[b, np.clip(ROUTED_PHI[b] - 1, 0, None)]
    np.testing.assert_array_equal(routing.attends[b], sees)
    tokens = np.nonzero(sees)[0]
    slots = routing.slot[b, tokens]
    assert len(set(slots.tolist())) == len(tokens)  # No two share a slot.
    np.testing.assert_array_equal(routing.source[b, slots], tokens)
    filled = np.zeros(routing.source.shape[1], bool)
    filled[slots] = True
    np.testing.assert_array_equal(routing.source[b, ~filled], length)
    np.testing.assert_array_equal(
        image_of_group[b, slots // group_size], ROUTED_PHI[b, tokens] - 1)


def test_routing_fits_the_worst_case():
  """Every image with one token more than a multiple of the group size."""
  group_size, num_media = 4, 3
  phi = np.repeat(np.arange(1, num_media + 1), group_size + 1)[None]  # [1, 15]
  routing = xattn.route_by_image(jnp.asarray(phi),
                                 jnp.ones([1, num_media], bool), group_size)
  assert routing.image.shape[1] == 15 // group_size + num_media
  assert len(set(np.asarray(routing.slot[0]).tolist())) == 15


def test_attention_plan_picks_the_cheaper_form():
  media_mask = jnp.ones([2, 5], bool)
  long_phi = jnp.ones([2, 256], jnp.int32)
  plan = xattn.attention_plan(long_phi, media_mask, R, 'last_image')
  assert isinstance(plan, xattn.ImageRouting)
  dense = xattn.attention_plan(long_phi, media_mask, R, 'all_previous_images')
  assert dense.shape == (2, 256, 5 * R)
  one_token = xattn.attention_plan(long_phi[:, :1], media_mask, R)
  assert one_token.shape == (2, 1, 5 * R)  # Decoding steps stay dense.
  one_image = xattn.attention_plan(long_phi, media_mask[:, :1], R)
  assert one_image.shape == (2, 256, R)


def test_per_image_form_sharded_over_the_batch_equals_unsharded():
  """8 fake devices, each holding one row: no row's tokens leave it."""
  batch, length, num_media = 8, 24, 3
  mesh = jax.make_mesh((8,), ('data',),
                       axis_types=(jax.sharding.AxisType.Auto,))
  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  rng = np.random.default_rng(1)
  phi = jnp.asarray(rng.integers(0, num_media + 1, (batch, length)),
                    jnp.int32)
  q = jnp.asarray(rng.normal(size=(batch, length, 2, 8)), jnp.float32)
  kv = jnp.asarray(rng.normal(size=(batch, num_media * R, 2, 8)),
                   jnp.float32)

  def attend(q, k, v, phi):
    routing = xattn.route_by_image(phi, jnp.ones([batch, num_media], bool), 4)
    return xattn.attend_per_image(q, k, v, routing)

  want = jax.jit(attend)(q, kv, kv, phi)
  sharded = jax.jit(attend, in_shardings=rows, out_shardings=rows)
  args = [jax.device_put(x, rows) for x in (q, kv, kv, phi)]
  np.testing.assert_allclose(sharded(*args), want, atol=1e-6)
  hlo = sharded.lower(*args).compile().as_text()
  assert 'all-gather' not in hlo and 'all-to-all' not in hlo


def test_vanilla_xattn_keeps_its_tanh_gate():
  """Table 3 (iv) keeps the 0-initialised gate (arXiv v1 §4.4.2); only
  gating='none' drops it."""
  y, visual, positions = _inputs()
  mask = jnp.ones([B, L, N * R], bool)
  model = _block(xattn_type='vanilla_xattn')
  params = model.init(jax.random.PRNGKey(0), y, visual.reshape(B, N * R, DV),
                      mask, positions)
  assert set(params['block']) == {'attn_gate'}  # No ffw_gate: no dense.
  np.testing.assert_array_equal(_run(model, params, y, visual), y)
  assert np.abs(_run(model, _opened(params), y, visual) - y).max() > 1e-3


IDEFICS = dict(norm='rms_norm', norm_eps=1e-6, ffw_activation='swiglu',
               ffw_hidden=24, visual_norm=False, alpha_type='vector',
               qk_norm='rms_norm')


def test_idefics_block_parameters_and_closed_gates():
  """IDEFICS's layer: RMSNorms, SwiGLU, per-feature gates, q/k norms; at
  init (gates 0) the identity, opened it sees only its tokens' images."""
  model = _block(**IDEFICS)
  y, visual, positions = _inputs()
  mask = xattn.cross_attention_mask(jnp.asarray(PHI), jnp.asarray(MEDIA_MASK),
                                    R)
  params = model.init(jax.random.PRNGKey(0), y, visual.reshape(B, N * R, DV),
                      mask, positions)
  shapes = {f'{m}/{n}': v.shape for m, p in params.items()
            for n, v in p.items()}
  assert shapes == {
      'block/attn_gate': (D,), 'block/ffw_gate': (D,),
      'block/query_norm/scale': (D,), 'block/ffw_norm/scale': (D,),
      'block/cross_attention/query/w': (D, 16),
      'block/cross_attention/key/w': (DV, 16),
      'block/cross_attention/value/w': (DV, 16),
      'block/cross_attention/output/w': (16, D),
      'block/cross_attention/query_norm/scale': (8,),
      'block/cross_attention/key_norm/scale': (8,),
      'block/ffw/gate/w': (D, 24), 'block/ffw/hidden/w': (D, 24),
      'block/ffw/output/w': (24, D)}
  run = jax.jit(lambda p, v: model.apply(p, y, v.reshape(B, N * R, DV),
                                         mask, positions))  # One compile.
  np.testing.assert_array_equal(run(params, visual), y)
  opened = dict(params, block=dict(params['block'],
                                   attn_gate=jnp.full([D], 0.5),
                                   ffw_gate=jnp.zeros([D])))
  base = run(opened, visual)
  changed = run(opened, _replace_image(visual, 0))
  delta = np.abs(changed - base)[0].max(axis=-1)
  np.testing.assert_array_equal(delta[PHI[0] != 1], 0.0)
  assert (delta[PHI[0] == 1] > 1e-4).all()


def test_unknown_idefics_options_raise():
  for option in (dict(norm='batch_norm'), dict(alpha_type='matrix')):
    with pytest.raises(ValueError, match=next(iter(option))):
      _block(**option).init(
          jax.random.PRNGKey(0), *_inputs()[:1], jnp.zeros([B, 4, DV]),
          jnp.ones([B, L, 4], bool), jnp.zeros([B, L], jnp.int32))
