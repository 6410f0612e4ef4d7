"""The train step: masked loss, lambda weighting, non-finite protection."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flamingo_jax.training import train_step as train_step_lib


def test_sequence_loss_masks_and_never_nans():
  logits = jnp.log(jnp.array([[[0.5, 0.5], [0.9, 0.1]]]))  # [1, 2, 2]
  targets = jnp.array([[0, 1]])
  loss, count = train_step_lib.sequence_loss(logits, targets,
                                             jnp.array([[1.0, 0.0]]))
  np.testing.assert_allclose(loss, np.log(2.0), rtol=1e-6)
  assert count == 1
  loss, count = train_step_lib.sequence_loss(logits, targets,
                                             jnp.zeros([1, 2]))
  assert loss == 0.0 and count == 0


def _toy_step(weights):
  """A 'model' whose logits are a trainable bias: one dataset each."""

  def apply_fn(params, rng, tokens, media, media_mask, media_index,
               is_training):
    del rng, media, media_mask, media_index, is_training
    bias = params['gated_xattn/block']['attn_gate']  # [V]
    return jnp.broadcast_to(bias, tokens.shape + bias.shape)

  optimizer = optax.sgd(1.0)
  step = train_step_lib.make_train_step(
      apply_fn, optimizer, weights, jnp.float32, lambda s: 1.0)
  trainable = {'gated_xattn/block': {'attn_gate': jnp.zeros([3])}}
  state = train_step_lib.TrainState(
      step=jnp.zeros([], jnp.int32), trainable=trainable, frozen={},
      opt_state=optimizer.init(trainable), rng=jax.random.PRNGKey(0))
  return step, state


def _batch(target):
  tokens = jnp.zeros([2, 4], jnp.int32)
  return dict(tokens=tokens, targets=tokens + target,
              loss_mask=jnp.ones([2, 4]), media=jnp.zeros([2, 1, 1, 1, 1, 3]),
              media_mask=jnp.ones([2, 1], bool), media_index=tokens)


def test_losses_are_lambda_weighted_into_one_update():
  step, state = _toy_step({'a': 1.0, 'b': 0.5})
  state, metrics = step(state, {'a': _batch(0), 'b': _batch(1)})
  np.testing.assert_allclose(metrics['loss'], 1.5 * np.log(3.0), rtol=1e-6)
  np.testing.assert_allclose(metrics['loss/a'], np.log(3.0), rtol=1e-6)
  # Gradient of CE wrt the bias is softmax - onehot; sgd(1) moves against it.
  bias = np.asarray(state.trainable['gated_xattn/block']['attn_gate'])
  expected = -(1.0 * (np.full(3, 1 / 3) - [1, 0, 0])
               + 0.5 * (np.full(3, 1 / 3) - [0, 1, 0]))
  np.testing.assert_allclose(bias, expected, rtol=1e-5, atol=1e-6)
  assert int(state.step) == 1
  assert 'gates/attn_gate_0' in metrics


def test_non_finite_loss_leaves_parameters_untouched():
  step, state = _toy_step({'a': 1.0})
  poisoned = state._replace(trainable={
      'gated_xattn/block': {'attn_gate': jnp.array([jnp.nan, 0.0, 0.0])}})
  new_state, metrics = step(poisoned, {'a': _batch(0)})
  assert not np.isfinite(metrics['loss'])
  assert int(new_state.step) == 1
  np.testing.assert_array_equal(
      new_state.trainable['gated_xattn/block']['attn_gate'],
      poisoned.trainable['gated_xattn/block']['attn_gate'])
