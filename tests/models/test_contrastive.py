"""The contrastive model: Flamingo's vision parameter paths, the text tower."""

import pathlib

import haiku as hk
import jax
import numpy as np
import pytest

from flamingo_jax import summarize
from flamingo_jax.models import contrastive
from flamingo_jax.models import flamingo

TINY = contrastive.model_config('tiny')
PINNED_FLAMINGO_PATHS = (pathlib.Path(__file__).parent / 'testdata'
                         / 'tiny_param_paths.txt')


def _paths(params):
  shapes = summarize.flat_shapes(params)
  return sorted(f'{path} {list(shape)}' for path, shape in shapes.items())


def test_vision_paths_are_flamingos():
  """init_from 'vision_encoder/.*' needs the same paths and shapes."""
  got = _paths(contrastive.abstract_params(TINY))
  vision = [p for p in got if p.startswith('vision_encoder/')]
  expected = [p for p in PINNED_FLAMINGO_PATHS.read_text().splitlines()
              if p.startswith('vision_encoder/')]
  assert vision and vision == expected
  # The rest: both projections, the text tower and the temperature.
  others = {p.split(' ')[0] for p in got} - {p.split(' ')[0] for p in vision}
  assert {'image_projection/w', 'text_projection/w', 'temperature/log_scale',
          'text_encoder/embed/embeddings', 'text_encoder/position_embeddings',
          'text_encoder/final_norm/scale',
          'text_encoder/layer_1/attention/query/w',
          'text_encoder/layer_1/ffw/output/w'} <= others
  assert all(p.startswith(('image_projection/', 'text_projection/',
                           'temperature/', 'text_encoder/')) for p in others)


def test_full_size_vision_paths_are_flamingo_3bs():
  config = contrastive.model_config('F6')
  got = summarize.flat_shapes(contrastive.abstract_params(config))
  want = summarize.flat_shapes(flamingo.abstract_params(
      flamingo.model_config('3B')))
  vision = lambda shapes: {k: v for k, v in shapes.items()
                           if k.startswith('vision_encoder/')}
  assert vision(got) == vision(want)
  assert got['image_projection/w'] == (3072, 1024)
  assert got['text_encoder/embed/embeddings'] == (32001, 768)


@pytest.fixture(scope='module')
def text_tower():
  model = hk.transform(
      lambda tokens: contrastive.ContrastiveModel(TINY).embed_text(tokens))
  tokens = np.zeros([3, 12], np.int32)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), tokens)
  return jax.jit(model.apply), params


def test_text_embeddings_are_unit_and_ignore_padding(text_tower):
  apply, params = text_tower
  rng = np.random.default_rng(0)
  tokens = rng.integers(5, 500, [3, 12]).astype(np.int32)
  tokens[0, 7:] = contrastive.PAD_ID  # A shorter caption.
  tokens[2] = contrastive.PAD_ID  # An all-padding row (a skipped example).
  embedded = np.asarray(apply(params, None, tokens))  # [3, E]
  assert embedded.shape == (3, TINY['embed_dim'])
  np.testing.assert_allclose(np.linalg.norm(embedded[:2], axis=-1), 1.0,
                             rtol=1e-5)
  assert np.isfinite(embedded).all()
  # Other ids under the padding do not matter: padding is never read.
  shorter = np.full_like(tokens, contrastive.PAD_ID)
  shorter[:, :7] = tokens[:, :7]
  other = np.asarray(apply(params, None, shorter))
  np.testing.assert_allclose(other[0], embedded[0], rtol=1e-5, atol=1e-6)
  assert not np.allclose(other[1], embedded[1], atol=1e-3)


def test_bad_inputs_are_named():
  with pytest.raises(ValueError, match='max_len is 64'):
    jax.eval_shape(contrastive.transform(TINY).init, jax.random.PRNGKey(0),
                   *contrastive.example_inputs(TINY, seq_len=65))
  with pytest.raises(ValueError, match='Unknown contrastive size'):
    contrastive.model_config('F7')
