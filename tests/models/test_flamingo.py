"""Flamingo end to end on the tiny config, and full sizes by eval_shape."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import ablations
from experiments import flamingo as flamingo_config
from flamingo_jax import summarize
from flamingo_jax.data import media_index as media_index_lib
from flamingo_jax.models import flamingo
from flamingo_jax.models import precision

TINY = flamingo.model_config('tiny')
B, L, N = 2, 12, 3
# Row 0: text, <image>1, text, <image>2, text, <image>3, text. Row 1: 1 image.
MARKERS = np.zeros([B, L], bool)
MARKERS[0, [2, 5, 9]] = True
MARKERS[1, 1] = True
PHI = media_index_lib.compute_media_index(MARKERS, np.array([3, 1]))
MEDIA_MASK = np.array([[True, True, True], [True, False, False]])


def _inputs(seed=0, frames=1):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, TINY['lm']['vocab_size'], [B, L]).astype(np.int32)
  size = TINY['image_size']
  media = rng.integers(0, 256, [B, N, frames, size, size, 3]).astype(np.uint8)
  return tokens, media, MEDIA_MASK, PHI


@pytest.fixture(scope='module')
def tiny():
  model = flamingo.transform(TINY)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), *_inputs())
  apply = jax.jit(model.apply, static_argnames='is_training')
  return apply, params


def _open_gates(params, value=1.0):
  params = dict(params)
  gates = dict(params['gated_xattn/block'])
  for name in gates:
    gates[name] = jnp.full_like(gates[name], value)
  params['gated_xattn/block'] = gates
  return params


def test_init_equals_frozen_lm(tiny):
  apply, params = tiny
  tokens, media, media_mask, phi = _inputs()
  logits = apply(params, None, tokens, media, media_mask, phi)
  # The LM alone (the LM stage's model, `transform_lm`): exactly Flamingo's
  # lm/... parameters, and the same function while the gates are closed.
  lm = flamingo.transform_lm(TINY)
  lm_params = {k: v for k, v in params.items() if k.startswith('lm')}
  assert jax.tree.map(np.shape, lm_params) == jax.tree.map(
      np.shape, jax.eval_shape(lm.init, jax.random.PRNGKey(1), *_inputs()))
  expected = lm.apply(lm_params, None, tokens, None, None, None)
  assert logits.shape == (B, L, TINY['lm']['vocab_size'] + 1)
  np.testing.assert_allclose(logits, expected, rtol=1e-6, atol=1e-6)
  # And the media really are ignored at init.
  other = apply(params, None, tokens, media[::-1], media_mask, phi)
  np.testing.assert_allclose(other, logits, rtol=1e-6, atol=1e-6)


def _image_sensitivity(apply, params, j):
  """Max |change| of each token's logits when image j of row 0 changes."""
  tokens, media, media_mask, phi = _inputs()
  changed = media.copy()
  changed[0, j] = 255 - changed[0, j]
  base = apply(params, None, tokens, media, media_mask, phi)
  moved = apply(params, None, tokens, changed, media_mask, phi)
  return np.abs(np.asarray(moved - base)).max(axis=-1)  # [B, L]


def test_image_j_reaches_only_tokens_from_its_marker_on(tiny):
  apply, params = tiny
  params = _open_gates(params)
  for j in range(N):
    delta = _image_sensitivity(apply, params, j)
    first = int(np.argmax(PHI[0] == j + 1))
    # Causal self-attention carries image j forward, never backward.
    np.testing.assert_array_equal(delta[0, :first], 0.0)
    assert (delta[0, first:] > 0).all(), (j, delta[0])
    np.testing.assert_array_equal(delta[1], 0.0)  # Other sequences.


def test_tokens_before_first_image_see_no_image(tiny):
  apply, params = tiny
  params = _open_gates(params)
  tokens, media, media_mask, phi = _inputs()
  base = apply(params, None, tokens, media, media_mask, phi)
  other = apply(params, None, tokens, 255 - media, media_mask, phi)
  np.testing.assert_array_equal(base[0, :2], other[0, :2])
  np.testing.assert_array_equal(base[1, :1], other[1, :1])


def test_video_frames_and_interpolated_time_embeddings():
  model = flamingo.transform(TINY)
  max_frames = TINY['resampler']['max_frames']
  for frames in (3, max_frames + 4):
    inputs = _inputs(frames=frames)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), *inputs)
    # Time embeddings stay [max_frames, D]: longer videos interpolate them.
    assert params['perceiver_resampler']['time_embeddings'].shape[0] == (
        max_frames)
    logits = jax.eval_shape(model.apply, params, None, *inputs)
    assert logits.shape == (B, L, TINY['lm']['vocab_size'] + 1)


def test_video_forward_runs(tiny):
  apply, params = tiny
  tokens, media, media_mask, phi = _inputs(frames=2)
  logits = apply(_open_gates(params), None, tokens, media, media_mask, phi)
  assert np.isfinite(np.asarray(logits)).all()


def test_mixed_parameter_dtypes_are_named(tiny):
  """A checkpoint's bf16 frozen LM with fp32 cross-attention, applied raw:
  a TypeError saying what to do (not a scan-carry mismatch)."""
  apply, params = tiny
  mixed = {k: jax.tree.map(lambda x: x.astype(jnp.bfloat16), v)
           if k.startswith('lm') else v for k, v in params.items()}
  with pytest.raises(TypeError, match='with_compute_dtype'):
    apply(mixed, None, *_inputs())
  logits = precision.with_compute_dtype(flamingo.transform(TINY),
                                        jnp.float32).apply(
                                            mixed, None, *_inputs())
  assert logits.dtype == jnp.float32


PINNED_PATHS = pathlib.Path(__file__).parent / 'testdata' / 'tiny_param_paths.txt'


def test_parameter_paths_are_pinned():
  """The parameter paths are an API (freezing, sharding, importers)."""
  shapes = summarize.flat_shapes(flamingo.abstract_params(TINY))
  got = [f'{path} {list(shape)}' for path, shape in sorted(shapes.items())]
  expected = PINNED_PATHS.read_text().splitlines()
  assert got == expected, '\n'.join(sorted(set(got) ^ set(expected)))


# Paper Table 5 (LM, vision, xattn, resampler, total).
TABLE_5 = {
    '3B': dict(lm=1.4e9, vision=435e6, xattn=1.2e9, resampler=194e6,
               total=3.2e9),
    '80B': dict(total=80e9),
}


@pytest.mark.parametrize('size', ['3B', '80B'])
def test_full_size_counts_match_table_5(size):
  counts = summarize.count_by_component(
      flamingo.abstract_params(flamingo.model_config(size)))
  for component, paper in TABLE_5[size].items():
    assert abs(counts[component] - paper) / paper < 0.05, (component, counts)


def test_9b_counts_as_documented():
  counts = summarize.count_by_component(
      flamingo.abstract_params(flamingo.model_config('9B')))
  assert abs(counts['xattn'] - 1.6e9) / 1.6e9 < 0.05, counts
  assert abs(counts['lm'] - 8.99e9) / 8.99e9 < 0.01, counts  # See lm.py.


@pytest.mark.parametrize('ablation', sorted(ablations.ABLATIONS))
def test_every_ablation_builds_and_runs_shapes(ablation):
  config = flamingo_config.get_config(f'tiny,{ablation}').model
  model = flamingo.transform(config)
  size = config['image_size']
  inputs = list(_inputs())
  inputs[1] = np.zeros([B, N, 1, size, size, 3], np.uint8)
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), *inputs)
  logits = jax.eval_shape(model.apply, params, None, *inputs)
  assert logits.shape == (B, L, TINY['lm']['vocab_size'] + 1)


def test_xattn_placements():
  assert flamingo.xattn_positions(24, 1, 'interleaved', 'gated_xattn_dense') == (
      tuple(range(24)))
  assert flamingo.xattn_positions(40, 4, 'interleaved', 'gated_xattn_dense') == (
      tuple(range(0, 40, 4)))
  eighty = flamingo.xattn_positions(80, 7, 'interleaved', 'gated_xattn_dense')
  assert eighty[0] == 0 and eighty[-1] == 77 and len(eighty) == 12
  assert flamingo.xattn_positions(24, 1, 'single_in_middle',
                                  'gated_xattn_dense') == (12,)


@pytest.mark.parametrize('change,message', [
    (lambda t, m, mm, p: (t[0], m, mm, p), r'\[B, L\].*\(12,\)'),
    (lambda t, m, mm, p: (t, m[:, :, 0], mm, p), r'\[B, N, T, H, W, 3\]'),
    (lambda t, m, mm, p: (t, m[:, :, :0], mm, p), r'T>=1.*\(2, 3, 0, '),
    (lambda t, m, mm, p: (t, m, mm[:, :2], p), r'\[B, N\].*\(2, 2\)'),
    (lambda t, m, mm, p: (t, m, mm, p[:, :5]), r'\[B, L\].*\(2, 5\)'),
    (lambda t, m, mm, p: (t, m[:, :2], mm[:, :2], p),
     r'slot 3.*N=2.*more <image> markers than media'),
])
def test_bad_inputs_raise(change, message):
  model = flamingo.transform(TINY)
  # Not under jit: the checks run before any computation, and the value check
  # of media_index needs concrete values (under jit phi's builder checks it).
  with pytest.raises(ValueError, match=message):
    model.init(jax.random.PRNGKey(0), *change(*_inputs()))
