"""experiments/bench.py: the matched comparison config is complete."""

import jax
import numpy as np
import pytest

from experiments import bench
from flamingo_jax.training import loop


def _trainable_count(config) -> int:
  model = loop.task_of(config).transform(config.model)
  state = loop.abstract_train_state(config, model,
                                    loop.make_optimizer(config))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.trainable))


def test_matched_has_about_145m_trainable_parameters():
  config = bench.get_config('matched')
  assert abs(_trainable_count(config) - 145e6) / 145e6 < 0.03
  model = config.model
  assert (model.lm.num_layers, model.lm.width, model.lm.vocab_size) == (
      4, 256, 2048)
  assert model.vision.variant == 'F0' and model.xattn.every == 1
  (spec,) = config.data.datasets.values()
  assert (spec.batch_size, spec.seq_len, spec.max_media,
          spec.image_size) == (8, 64, 2, 64)


def test_tiny_variant_and_unknown_variant():
  assert _trainable_count(bench.get_config('tiny')) > 0
  with pytest.raises(ValueError, match='matched'):
    bench.get_config('big')
