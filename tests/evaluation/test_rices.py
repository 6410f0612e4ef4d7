"""RICES: most similar support examples last; features cached on disk."""

import numpy as np
import pytest

from flamingo_jax.evaluation import rices
from flamingo_jax.models import flamingo
from tests.evaluation import test_runner


def _unit(rows):
  rows = np.asarray(rows, np.float32)
  return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_nearest_puts_the_most_similar_last():
  support = _unit([[1, 0], [0, 1], [1, 1], [-1, 0]])
  query = _unit([[1, 0.1], [0, 1]])
  order = rices.nearest(query, support, 3)
  # Query 0: [1, 0] is nearest, then [1, 1], then [0, 1].
  np.testing.assert_array_equal(order[0], [1, 2, 0])
  np.testing.assert_array_equal(order[1], [0, 2, 1])


def test_nearest_rejects_bad_inputs():
  with pytest.raises(ValueError, match='Cannot retrieve 3 shots from 2'):
    rices.nearest(_unit([[1, 0]]), _unit([[1, 0], [0, 1]]), 3)
  with pytest.raises(ValueError, match=r'\[Q, C\] and \[N, C\]'):
    rices.nearest(_unit([[1, 0]]), _unit([[1, 0, 0]]), 1)


def test_cached_computes_once(tmp_path):
  calls = []

  def compute():
    calls.append(1)
    return np.arange(6, dtype=np.float32).reshape(2, 3)

  path = str(tmp_path / 'cache' / 'task_support_abc.npy')
  first = rices.cached(path, compute)
  second = rices.cached(path, compute)
  np.testing.assert_array_equal(first, second)
  assert len(calls) == 1


def test_compute_features_pads_batches_to_one_shape():
  shapes = []

  def fn(params, media):
    del params
    shapes.append(media.shape)
    return media.reshape(len(media), -1)[:, :2].astype(np.float32)

  media = [np.full([1, 2, 2, 3], i, np.uint8) for i in range(5)]
  out = rices.compute_features(fn, None, media, batch_size=4)
  assert out.shape == (5, 2)
  np.testing.assert_array_equal(out[:, 0], np.arange(5))
  assert shapes == [(4, 1, 2, 2, 3)] * 2


def test_cache_key_moves_with_the_vision_params():
  params = test_runner.random_params(flamingo.model_config('tiny'))
  vision = {k: v for k, v in params.items() if k.startswith('vision_encoder')}
  assert rices.params_fingerprint(vision) == rices.params_fingerprint(params)
  module = sorted(vision)[0]
  name = sorted(vision[module])[0]
  moved = {**vision, module: {**vision[module],
                              name: vision[module][name] + 1.0}}
  assert rices.params_fingerprint(moved) != rices.params_fingerprint(vision)
  assert rices.cache_key(a=1, b='x') != rices.cache_key(a=2, b='x')
