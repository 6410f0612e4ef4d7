"""Tests for flamingo_jax.models.resampler."""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flamingo_jax.models import resampler

TINY = resampler.RESAMPLER_PARAMS['tiny']
TINY_WIDTH = TINY['width']
TINY_LATENTS = TINY['num_latents']


def _transformed(**overrides) -> hk.Transformed:
  kwargs = {**TINY, **overrides}
  return hk.transform(
      lambda x: resampler.PerceiverResampler(**kwargs)(x))


def _features(shape: tuple[int, ...], seed: int = 0) -> jax.Array:
  return jax.random.normal(jax.random.PRNGKey(seed), shape)


def _param_count(params) -> int:
  return sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))


# One tiny model, initialised and compiled once for the tests that share it.
_TINY_MODEL = _transformed()
_apply = jax.jit(_TINY_MODEL.apply)


@pytest.fixture(scope='module', name='params')
def _params_fixture() -> hk.Params:
  features = _features((1, 1, 5, 24))  # Din=24 != D: with input_projection.
  return jax.jit(_TINY_MODEL.init)(jax.random.PRNGKey(0), features)


@pytest.mark.parametrize('num_frames', [1, 3])
def test_output_shape(params, num_frames):
  features = _features((2, num_frames, 5, 24))  # [B, T, S, Din]
  out = _apply(params, None, features)
  assert out.shape == (2, TINY_LATENTS, TINY_WIDTH)
  assert np.all(np.isfinite(out))


def test_output_is_per_example(params):
  features = _features((3, 2, 5, 24))
  batched = _apply(params, None, features)
  for i in range(features.shape[0]):
    alone = _apply(params, None, features[i:i + 1])
    np.testing.assert_allclose(batched[i:i + 1], alone, atol=1e-5, rtol=1e-5)


def test_parameter_paths(params):
  paths = {f'{module}/{name}'
           for module, name, _ in hk.data_structures.traverse(params)}
  layer = [
      'latents_norm/scale', 'latents_norm/offset',
      'features_norm/scale', 'features_norm/offset',
      'attention/query/w', 'attention/key/w', 'attention/value/w',
      'attention/output/w',
      'ffw_norm/scale', 'ffw_norm/offset', 'ffw/hidden/w', 'ffw/output/w',
  ]
  expected = {
      'perceiver_resampler/input_projection/w',
      'perceiver_resampler/input_projection/b',
      'perceiver_resampler/time_embeddings',
      'perceiver_resampler/latents',
      'perceiver_resampler/output_norm/scale',
      'perceiver_resampler/output_norm/offset',
  } | {f'perceiver_resampler/layer_{i}/{p}' for i in range(2) for p in layer}
  assert paths == expected, sorted(paths)
  # Only temporal embeddings: the paper adds no spatial position embeddings.
  assert not any('spatial' in p or 'position' in p for p in paths)
  assert params['perceiver_resampler']['time_embeddings'].shape == (
      8, TINY_WIDTH)
  assert params['perceiver_resampler']['latents'].shape == (
      TINY_LATENTS, TINY_WIDTH)


def test_no_input_projection_when_widths_match():
  features = jax.ShapeDtypeStruct((1, 1, 5, TINY_WIDTH), jnp.float32)
  params = jax.eval_shape(_TINY_MODEL.init, jax.random.PRNGKey(0), features)
  assert 'perceiver_resampler/input_projection' not in params


def test_interpolate_keeps_short_prefix():
  table = jnp.arange(12.0).reshape(4, 3)
  np.testing.assert_array_equal(
      resampler.interpolate_time_embeddings(table, 2), table[:2])
  np.testing.assert_array_equal(
      resampler.interpolate_time_embeddings(table, 4), table)


def test_interpolate_endpoints_and_midpoint():
  table = _features((8, 6))
  out = resampler.interpolate_time_embeddings(table, 30)
  assert out.shape == (30, 6)
  np.testing.assert_array_equal(out[0], table[0])
  np.testing.assert_array_equal(out[-1], table[-1])
  # 3 frames over a 2-row table: the middle frame is the rows' mean.
  two = table[:2]
  mid = resampler.interpolate_time_embeddings(two, 3)[1]
  np.testing.assert_allclose(mid, 0.5 * (two[0] + two[1]), rtol=1e-6)


def test_interpolate_linear_table_stays_linear():
  # A table linear in the frame index interpolates to a finer linear ramp.
  table = jnp.stack([jnp.arange(4.0), -2.0 * jnp.arange(4.0)], axis=1)
  out = resampler.interpolate_time_embeddings(table, 10)  # [10, 2]
  expected = np.linspace(0.0, 3.0, 10)
  np.testing.assert_allclose(out[:, 0], expected, atol=1e-6)
  np.testing.assert_allclose(out[:, 1], -2.0 * expected, atol=1e-6)
  assert np.all(np.diff(out[:, 0]) > 0)


def test_more_frames_than_max_frames_uses_interpolated_embeddings():
  features = _features((2, 5, 3, TINY_WIDTH))  # T=5 > max_frames=2.
  f = _transformed(max_frames=2)
  apply = jax.jit(f.apply)
  params = jax.jit(f.init)(jax.random.PRNGKey(0), features)
  out = apply(params, None, features)
  assert out.shape == (2, TINY_LATENTS, TINY_WIDTH)
  # Adding the interpolated table by hand, with the learned one zeroed, must
  # give the same output.
  table = params['perceiver_resampler']['time_embeddings']
  embedded = features + resampler.interpolate_time_embeddings(
      table, 5)[:, None, :]
  zeroed = hk.data_structures.to_mutable_dict(params)
  zeroed['perceiver_resampler'] = {
      **zeroed['perceiver_resampler'], 'time_embeddings': jnp.zeros_like(table)}
  np.testing.assert_allclose(
      apply(zeroed, None, embedded), out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('resampler_type', ['mlp', 'transformer'])
def test_ablation_variants_output_one_token_per_feature(resampler_type):
  # Shapes only: tracing runs every layer; numerics are tested on 'perceiver'.
  features = jax.ShapeDtypeStruct((2, 3, 5, 24), jnp.float32)
  f = _transformed(resampler_type=resampler_type)
  params = jax.eval_shape(f.init, jax.random.PRNGKey(0), features)
  out = jax.eval_shape(f.apply, params, None, features)
  num_tokens = resampler.num_output_tokens(
      resampler_type, TINY_LATENTS, num_frames=3, num_spatial=5)
  assert num_tokens == 15
  assert out.shape == (2, num_tokens, TINY_WIDTH)
  assert 'latents' not in params['perceiver_resampler']


def test_num_output_tokens():
  assert resampler.num_output_tokens('perceiver', 64, 30, 100) == 64
  assert resampler.num_output_tokens('mlp', 64, 2, 100) == 200
  with pytest.raises(ValueError, match='resampler_type'):
    resampler.num_output_tokens('lstm', 64, 2, 100)


def test_medium_has_194m_parameters():
  """Flamingo's resampler: Table 5's 194M (App. A.1.4's key size 96 would
  give 175M; see RESAMPLER_PARAMS)."""
  f = hk.transform(lambda x: resampler.PerceiverResampler(
      **resampler.RESAMPLER_PARAMS['medium'])(x))
  features = jax.ShapeDtypeStruct((1, 1, 4, 3072), jnp.float32)  # NFNet-F6.
  params = jax.eval_shape(f.init, jax.random.PRNGKey(0), features)
  count = _param_count(params)
  print(f'medium resampler parameters: {count:,}')
  assert abs(count - 194e6) <= 0.05 * 194e6, count


@pytest.mark.parametrize('shape', [(2, 5, 24), (1, 2, 3, 5, 24)])
def test_wrong_rank_raises(shape):
  f = _transformed()
  with pytest.raises(ValueError, match=r'\[B, T, S, Din\]') as error:
    f.init(jax.random.PRNGKey(0), jnp.zeros(shape))
  assert str(shape) in str(error.value)


def test_unknown_type_raises():
  f = _transformed(resampler_type='lstm')
  with pytest.raises(ValueError, match='lstm'):
    f.init(jax.random.PRNGKey(0), jnp.zeros((1, 1, 5, 24)))


def test_media_time_embeddings_add_the_slots_row():
  """OpenFlamingo's `max_num_media`: the medium in slot n gets row n of
  `media_time_embeddings` on every token, before the layers (the same as
  resampling features that already carry it)."""
  with_media = hk.transform(lambda x, s: resampler.PerceiverResampler(
      **TINY, max_media=3)(x, s))
  features = _features((2, 2, 5, TINY_WIDTH))  # No input projection.
  slots = jnp.array([0, 2])
  params = with_media.init(jax.random.PRNGKey(0), features, slots)
  table = params['perceiver_resampler']['media_time_embeddings']
  assert table.shape == (3, TINY_WIDTH)
  plain = {k: {n: v for n, v in leaves.items()
               if n != 'media_time_embeddings'}
           for k, leaves in params.items()}
  out = with_media.apply(params, None, features, slots)
  expected = _transformed().apply(
      plain, None, features + table[slots][:, None, None, :])
  np.testing.assert_allclose(out, expected, atol=1e-5)
  assert np.abs(out - with_media.apply(params, None, features,
                                       slots[::-1])).max() > 1e-3
  with pytest.raises(ValueError, match='needs each medium'):
    with_media.apply(params, None, features, None)
