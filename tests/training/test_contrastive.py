"""Contrastive pretraining: the two-term loss.

The tiny recipe's contrastive stage, whose final parameters initialise
Flamingo's vision encoder, runs for real in tests/faults/test_recipe_faults.py
(its reference run).
"""

import jax.numpy as jnp
import numpy as np
import pytest

from flamingo_jax.training import contrastive


def _log_softmax(x, axis):
  x = x - x.max(axis=axis, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


def test_aligned_pairs_at_low_temperature_cost_nothing():
  embeddings = jnp.eye(4, 8)  # [B, E]: four orthonormal pairs.
  loss, metrics = contrastive.contrastive_loss(embeddings, embeddings, 100.0)
  # Each wrong candidate costs exp(-100): the loss is 3 exp(-100) ~ 0.
  np.testing.assert_allclose(loss, 0.0, atol=1e-6)
  assert metrics['i2t_accuracy'] == 1.0 and metrics['t2i_accuracy'] == 1.0


def test_identical_embeddings_cost_log_batch():
  same = jnp.ones([5, 3]) / np.sqrt(3.0)
  loss, metrics = contrastive.contrastive_loss(same, same, 10.0)
  np.testing.assert_allclose(loss, np.log(5.0), rtol=1e-6)
  np.testing.assert_allclose(metrics['i2t_loss'], np.log(5.0), rtol=1e-6)


def test_loss_is_the_mean_of_both_directions():
  rng = np.random.default_rng(0)
  image = rng.normal(size=[4, 6])
  text = rng.normal(size=[4, 6])
  image /= np.linalg.norm(image, axis=-1, keepdims=True)
  text /= np.linalg.norm(text, axis=-1, keepdims=True)
  scale = 3.0
  logits = scale * image @ text.T  # [B, B]
  i2t = -np.diagonal(_log_softmax(logits, axis=1)).mean()
  t2i = -np.diagonal(_log_softmax(logits, axis=0)).mean()
  assert abs(i2t - t2i) > 1e-3  # Not symmetric: both terms matter.
  loss, metrics = contrastive.contrastive_loss(jnp.asarray(image),
                                               jnp.asarray(text), scale)
  np.testing.assert_allclose(metrics['i2t_loss'], i2t, rtol=1e-5)
  np.testing.assert_allclose(metrics['t2i_loss'], t2i, rtol=1e-5)
  np.testing.assert_allclose(loss, (i2t + t2i) / 2, rtol=1e-5)
  top1 = (logits.argmax(axis=1) == np.arange(4)).mean()
  np.testing.assert_allclose(metrics['i2t_accuracy'], top1)

  # A row without a pair (a skipped example) is neither query nor candidate.
  padded_image = np.concatenate([image, np.zeros([1, 6])])
  padded_text = np.concatenate([text, np.zeros([1, 6])])
  valid = jnp.array([True] * 4 + [False])
  padded, _ = contrastive.contrastive_loss(
      jnp.asarray(padded_image), jnp.asarray(padded_text), scale, valid)
  np.testing.assert_allclose(padded, loss, rtol=1e-6)


def test_unsupported_step_options_are_named():
  with pytest.raises(ValueError, match='microbatches=1'):
    contrastive.make_train_step(None, None, {}, jnp.float32, None,
                                microbatches=2)
