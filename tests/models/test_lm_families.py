"""The published LM layouts (models/lm_layout.py) in the decoder: positions,
parameters, and cached decoding with Flamingo's cross-attention between the
blocks, for every family."""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flamingo_jax.models import flamingo
from flamingo_jax.models import variants
from flamingo_jax.models import lm
from flamingo_jax.models import lm_layout
from flamingo_jax.models import positions
from tests.models import test_decoding

SIZES = dict(num_layers=2, width=32, num_heads=4, head_size=8,
             vocab_size=512)
# Each family at a tiny size, with the variations the checkpoints use.
FAMILY_CONFIGS = {
    'llama_gqa': lm_layout.family_config('llama', num_kv_heads=2,
                                         ffw_hidden=40, **SIZES),
    'gpt_neox': lm_layout.family_config('gpt_neox', **SIZES),
    'mpt': lm_layout.family_config('mpt', **dict(SIZES, num_heads=2,
                                                 head_size=16)),
    'gpt2': lm_layout.family_config('gpt2', **dict(SIZES, max_positions=40)),
    # MPT-1B's: MPT with LayerNorms on the queries and keys.
    'mosaic_gpt': lm_layout.family_config('mosaic_gpt', **SIZES),
}


def _flamingo_config(lm_config):
  config = flamingo.model_config('tiny')
  config['lm'] = dict(lm_config)
  return config


def _random_params(config, *inputs):
  """Random values of the decoder's parameter shapes (no init to compile):
  norm scales near 1, gates open (0.5), the rest N(0, 0.1^2)."""
  shapes = jax.eval_shape(test_decoding._decode(config).init,  # pylint: disable=protected-access
                          jax.random.PRNGKey(0), *inputs)
  rng = np.random.default_rng(0)

  def value(path, shape):
    name = jax.tree_util.keystr(path)
    if name.endswith("_gate']"):
      return np.full(shape.shape, 0.5, np.float32)
    noise = rng.normal(0.0, 0.1, shape.shape).astype(np.float32)
    return noise + 1.0 if name.endswith("['scale']") else noise

  return jax.tree_util.tree_map_with_path(value, shapes)


@pytest.mark.parametrize('family', sorted(FAMILY_CONFIGS))
def test_cached_decoding_equals_full_forward(family):
  """Flamingo with each LM family (xattn between its blocks, gates open):
  a left-padded prompt decoded in two cached chunks gives the full forward
  pass's logits."""
  config = _flamingo_config(FAMILY_CONFIGS[family])
  tokens, _, media_mask, media_index = test_decoding._inputs()  # pylint: disable=protected-access
  visual = test_decoding._visual(config)  # pylint: disable=protected-access
  params = _random_params(config, tokens, visual, media_mask, media_index)
  full = jax.jit(test_decoding._decode(config).apply)(  # pylint: disable=protected-access
      params, None, tokens, visual, media_mask, media_index)  # [B, L, V]
  assert np.isfinite(np.asarray(full)).all()
  cached, args = test_decoding._cached(config, 3, 6)  # pylint: disable=protected-access
  logits = cached(params, None, *args)  # [B, 3 + L, V]
  np.testing.assert_allclose(logits[:, 3:], full, atol=2e-5, rtol=1e-5)
  # The media reach the text through the family's blocks.
  moved = cached(params, None, *args[:3], args[3][:, ::-1], args[4])
  assert np.abs(moved[:, 5:] - logits[:, 5:]).max() > 1e-3


def _lm_params(lm_config):
  model = hk.transform(lambda t: lm.DecoderLM(**lm_config)(t))
  return jax.eval_shape(model.init, jax.random.PRNGKey(0),
                        jnp.zeros([1, 4], jnp.int32))


def test_parameters_of_each_layout():
  block = 'lm/blocks/block'
  llama = _lm_params(FAMILY_CONFIGS['llama_gqa'])
  assert llama[f'{block}/self_attention/query']['w'].shape == (2, 32, 32)
  assert llama[f'{block}/self_attention/key']['w'].shape == (2, 32, 16)  # GQA
  assert llama[f'{block}/ffw/gate']['w'].shape == (2, 32, 40)  # SwiGLU
  assert set(llama[f'{block}/attention_norm']) == {'scale'}  # RMSNorm
  assert 'lm/unembed' in llama
  assert not any('relative_key' in m for m in llama)
  neox = _lm_params(FAMILY_CONFIGS['gpt_neox'])
  assert set(neox[f'{block}/self_attention/query']) == {'w', 'b'}
  assert set(neox[f'{block}/attention_norm']) == {'scale', 'offset'}
  assert neox[f'{block}/ffw/hidden']['w'].shape == (2, 32, 128)
  mpt = _lm_params(FAMILY_CONFIGS['mpt'])
  assert 'lm/unembed' not in mpt  # Tied.
  assert set(mpt[f'{block}/ffw_norm']) == {'scale'}  # LayerNorm, no bias.
  gpt2 = _lm_params(FAMILY_CONFIGS['gpt2'])
  assert gpt2['lm/position_embed']['embeddings'].shape == (40, 32)
  assert not any('q_norm' in m for m in (*llama, *neox, *mpt, *gpt2))
  mosaic = _lm_params(FAMILY_CONFIGS['mosaic_gpt'])
  for norm in ('q_norm', 'k_norm'):  # Over all heads' features, no bias.
    assert jax.tree.map(jnp.shape, mosaic[f'{block}/self_attention/{norm}']
                        ) == {'scale': (2, 32)}


def test_tied_embeddings_read_the_table():
  config = FAMILY_CONFIGS['mpt']
  model = hk.without_apply_rng(hk.transform(
      lambda t: lm.DecoderLM(**config)(t)))
  tokens = jnp.arange(8)[None] + 7
  params = jax.jit(model.init)(jax.random.PRNGKey(0), tokens)
  apply = jax.jit(model.apply)
  base = apply(params, tokens)
  table = params['lm/embed']['embeddings']
  bumped = dict(params, **{'lm/embed': {
      'embeddings': table.at[300].add(jnp.linspace(-1, 1, table.shape[1]))}})
  changed = apply(bumped, tokens)
  # Only the logit of token 300 moves: no token reads its input row.
  delta = np.abs(np.asarray(changed - base)).max(axis=(0, 1))
  assert delta[300] > 1e-3 and np.delete(delta, 300).max() == 0.0


def test_rotary_is_relative_and_rotates_half():
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=[1, 5, 2, 8]), jnp.float32)
  k = jnp.asarray(rng.normal(size=[1, 5, 2, 8]), jnp.float32)
  pos = jnp.arange(5)[None]

  def scores(offset, dims):
    rq = positions.apply_rotary(q, pos + offset, dims)
    rk = positions.apply_rotary(k, pos + offset, dims)
    return np.asarray(jnp.einsum('blhk,bshk->bhls', rq, rk))

  np.testing.assert_allclose(scores(0, 8), scores(11, 8), atol=1e-4)
  assert np.abs(scores(0, 8) - np.asarray(
      jnp.einsum('blhk,bshk->bhls', q, k))).max() > 1e-2
  # Partial rotary leaves the other dimensions alone.
  partial = positions.apply_rotary(q, pos + 3, 4)
  np.testing.assert_array_equal(partial[..., 4:], q[..., 4:])
  # Rotate-half: dimension i pairs with i + R/2 (one position, angle 1 rad
  # on the first pair).
  x = jnp.zeros([1, 1, 1, 4]).at[..., 0].set(1.0)
  out = positions.apply_rotary(x, jnp.ones([1, 1], jnp.int32), 4)
  np.testing.assert_allclose(out[0, 0, 0], [np.cos(1.0), 0, np.sin(1.0), 0],
                             atol=1e-6)


def test_alibi_slopes():
  np.testing.assert_allclose(positions.alibi_slopes(8),
                             2.0 ** -np.arange(1, 9))
  # Not a power of two: 8's odd-indexed slopes, then its even-indexed ones.
  eight = 2.0 ** -np.arange(1, 9)
  np.testing.assert_allclose(positions.alibi_slopes(6),
                             np.concatenate([eight[1::2], eight[::2]])[:6])


def test_bad_layouts_are_named():
  with pytest.raises(ValueError, match='num_kv_heads=3 must divide'):
    _lm_params(dict(FAMILY_CONFIGS['llama_gqa'], num_kv_heads=3))
  with pytest.raises(ValueError, match="positions='relative'"):
    _lm_params(dict(SIZES, use_bias=True))
  with pytest.raises(ValueError, match='no query/key norms'):
    _lm_params(dict(SIZES, qk_norm=True))
  with pytest.raises(ValueError, match="Unknown lm positions 'sinusoid'"):
    _lm_params(dict(SIZES, positions='sinusoid'))
  with pytest.raises(ValueError, match='past the 40 rows'):
    config = FAMILY_CONFIGS['gpt2']
    model = hk.transform(lambda t: lm.DecoderLM(**config)(t))
    model.init(jax.random.PRNGKey(0), jnp.zeros([1, 41], jnp.int32))


def test_openflamingo_variant_with_mpt():
  """OpenFlamingo-3B's shape in small: MPT, xattn before every 2nd block
  counting from the 2nd, GELU feed-forwards, no norm on the visual tokens;
  cached decoding still equals the full forward pass."""
  config = variants.with_variant(
      _flamingo_config(FAMILY_CONFIGS['mpt']), 'openflamingo')
  config['xattn']['every'] = 2
  assert flamingo.xattn_positions(4, 2, 'openflamingo',
                                  'gated_xattn_dense') == (1, 3)
  assert flamingo.xattn_positions(4, 2, 'interleaved',
                                  'gated_xattn_dense') == (0, 2)
  tokens, _, media_mask, media_index = test_decoding._inputs()  # pylint: disable=protected-access
  visual = test_decoding._visual(config)  # pylint: disable=protected-access
  params = _random_params(config, tokens, visual, media_mask, media_index)
  assert not any('visual_norm' in m for m in params)
  assert params['gated_xattn/block']['attn_gate'].shape == (1,)  # One block.
  decode = jax.jit(test_decoding._decode(config).apply)  # pylint: disable=protected-access
  full = decode(params, None, tokens, visual, media_mask, media_index)
  cached, args = test_decoding._cached(config, 3, 6)  # pylint: disable=protected-access
  np.testing.assert_allclose(cached(params, None, *args)[:, 3:], full,
                             atol=2e-5, rtol=1e-5)
  # Without the visual norm, the visual tokens' scale reaches the text.
  scaled = decode(params, None, tokens, 2 * visual, media_mask, media_index)
  assert np.abs(np.asarray(scaled - full)).max() > 1e-3
  paper = _flamingo_config(FAMILY_CONFIGS['mpt'])
  paper_params = _random_params(paper, tokens, visual, media_mask,
                                media_index)
  paper_decode = jax.jit(test_decoding._decode(paper).apply)  # pylint: disable=protected-access
  np.testing.assert_allclose(
      paper_decode(paper_params, None, tokens, 2 * visual, media_mask,
                   media_index),
      paper_decode(paper_params, None, tokens, visual, media_mask,
                   media_index), atol=1e-4)


def test_variant_errors():
  with pytest.raises(ValueError, match="Unknown Flamingo variant 'llava'"):
    variants.with_variant(flamingo.model_config('tiny'), 'llava')


def test_vanilla_xattn_needs_a_sequential_block():
  """Table 3's vanilla_xattn sits between self-attention and feed-forward,
  which a parallel residual (GPT-NeoX) does not have: a named error."""
  config = _flamingo_config(FAMILY_CONFIGS['gpt_neox'])
  config['xattn']['xattn_type'] = 'vanilla_xattn'
  tokens, _, media_mask, media_index = test_decoding._inputs()  # pylint: disable=protected-access
  visual = test_decoding._visual(config)  # pylint: disable=protected-access
  with pytest.raises(ValueError, match='parallel residual'):
    jax.eval_shape(test_decoding._decode(config).init, jax.random.PRNGKey(0),  # pylint: disable=protected-access
                   tokens, visual, media_mask, media_index)
