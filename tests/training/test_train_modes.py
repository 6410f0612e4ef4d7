"""Train-step modes on the tiny Flamingo: round-robin updates, remat.

Each step is built from a config as the loop builds it
(`loop.make_optimizer`, `loop.make_step_fn`) and compiled once per module
(three compiles in all); parameters are random with open gates, so every
trainable part moves. The tiny config runs with its ViT stand-in (the
`vision_clip_vit_l14` ablation at tiny scale), which compiles faster than
the tiny NFNet; the frozen encoder plays no part in what is compared. The
exact semantics of round-robin and of micro-batches (equal to the full
batch) are pinned on toy models in test_train_step.py.
"""

import functools

import jax
import numpy as np
import pytest

from experiments import tiny
from flamingo_jax.models import flamingo
from flamingo_jax.models import precision
from flamingo_jax.training import loop
from flamingo_jax.training import optim
from flamingo_jax.training import train_step as train_step_lib
from tests import training as training_tests
from tests.training import multiprocess_worker as synthetic

# Halves XLA's CPU compile time; these tests compare steps, not speed.
COMPILER_OPTIONS = {'xla_backend_optimization_level': 0}


def _config(**changes):
  config = tiny.get_config('smoke,vision_clip_vit_l14')
  datasets = config.data.datasets
  config.data.datasets = {'pairs': datasets.pairs,
                          'video_pairs': datasets.video_pairs}
  for spec in config.data.datasets.values():
    spec.batch_size = 4
  config.optim.warmup_steps = 0
  for key, value in changes.items():
    *sections, leaf = key.split('.')
    target = config
    for section in sections:
      target = target[section]
    target[leaf] = value
  return config


@functools.cache
def _initial_params():
  config = _config()
  return training_tests.random_params(
      flamingo.abstract_params(config.model), gate=0.5)


@functools.cache
def _step(**changes):
  """(trainable params, metrics) after one step of `_config(**changes)`."""
  config = _config(**changes)
  model = flamingo.transform(config.model)
  optimizer = loop.make_optimizer(config)
  trainable, frozen = optim.partition(_initial_params(), config.freeze)
  state = train_step_lib.new_state(
      step=jax.numpy.zeros([], jax.numpy.int32), trainable=trainable,
      frozen=precision.cast_frozen(frozen),
      opt_state=optimizer.init(trainable), rng=jax.random.PRNGKey(0))
  batches = synthetic.global_batches(config, 0)
  step = jax.jit(loop.make_step_fn(config, model, optimizer))
  compiled = step.lower(state, batches).compile(
      compiler_options=COMPILER_OPTIONS)
  state, metrics = compiled(state, batches)
  return jax.device_get(state.trainable), jax.device_get(metrics)


def _max_difference(a, b) -> float:
  return max(jax.tree.leaves(jax.tree.map(
      lambda x, y: float(np.abs(np.asarray(x, np.float32) - y).max()), a, b)))


def test_round_robin_differs_from_accumulation_as_expected():
  accumulated, metrics_a = _step()
  round_robin, metrics_r = _step(**{'optim.dataset_updates': 'round_robin'})
  assert np.isfinite(metrics_a['loss']) and np.isfinite(metrics_r['loss'])
  # The first dataset (sorted: 'pairs') sees the same parameters in both;
  # 'video_pairs' sees those after round-robin's first update.
  np.testing.assert_allclose(metrics_r['loss/pairs'], metrics_a['loss/pairs'],
                             rtol=1e-6)
  assert abs(metrics_r['loss/video_pairs'] - metrics_a['loss/video_pairs']
             ) > 1e-6
  # Two Adam updates move the parameters about twice as far as one.
  assert _max_difference(round_robin, accumulated) > 1e-4
  assert set(metrics_r) >= {'grad_norm/pairs', 'grad_norm/video_pairs'}


@pytest.mark.parametrize('policy', ['full'])
def test_remat_gives_the_same_step(policy):
  plain, metrics_plain = _step()
  remat, metrics_remat = _step(**{'model.lm.remat_policy': policy})
  np.testing.assert_allclose(metrics_remat['loss'], metrics_plain['loss'],
                             rtol=1e-6)
  np.testing.assert_allclose(metrics_remat['grad_norm'],
                             metrics_plain['grad_norm'], rtol=1e-5)
  assert _max_difference(remat, plain) < 1e-6
