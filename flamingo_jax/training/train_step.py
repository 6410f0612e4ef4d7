"""The train state and the one jitted train step.

One step takes a dict of batches, one per dataset of the mixture, computes
each dataset's loss with the same parameters, weights it by lambda
(`config.data.<name>.weight`), and differentiates the weighted sum with
respect to the trainable parameters only: the gradients of all datasets are
accumulated in one step and one update is applied (paper App. B.1.2).

Glossary of shapes:
  B: batch size of a dataset; L: its sequence length; V: vocabulary + <EOC>.
  N: media slots; T: frames; H, W: image size.
"""

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp
import optax

from flamingo_jax.training import precision

Batch = Mapping[str, jax.Array]


class TrainState(NamedTuple):
  """Everything a bit-exact resume needs, besides the data position."""
  step: jax.Array  # [] int32: completed steps.
  trainable: hk.Params  # float32.
  frozen: hk.Params  # stored in bf16 (paper App. B.1.2).
  opt_state: optax.OptState  # Of the trainable parameters only.
  rng: jax.Array  # Base key; step keys are fold_in(rng, step).


def sequence_loss(
    logits: jax.Array,  # [B, L, V]
    targets: jax.Array,  # [B, L] int
    loss_mask: jax.Array,  # [B, L] float
) -> tuple[jax.Array, jax.Array]:  # ([], [])
  """Mean next-token cross-entropy over supervised tokens, and their count.

  A batch with no supervised token has loss 0, not NaN.
  """
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))  # [B, L, V]
  nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]  # [B, L]
  mask = loss_mask.astype(jnp.float32)  # [B, L]
  count = mask.sum()
  return (nll * mask).sum() / jnp.maximum(count, 1.0), count


def gate_values(trainable: hk.Params) -> dict[str, jax.Array]:
  """|tanh(alpha)| of every cross-attention gate (the paper's Fig. 6)."""
  gates = trainable.get('gated_xattn/block', {})
  values = {}
  for name in ('attn_gate', 'ffw_gate'):
    if name in gates:
      for layer, alpha in enumerate(jnp.abs(jnp.tanh(gates[name]))):
        values[f'gates/{name}_{layer}'] = alpha
  return values


def make_train_step(
    apply_fn: Callable[..., jax.Array],
    optimizer: optax.GradientTransformation,
    weights: Mapping[str, float],
    compute_dtype: Any,
    learning_rate_fn: Callable[[jax.Array], jax.Array],
) -> Callable[[TrainState, Mapping[str, Batch]],
              tuple[TrainState, dict[str, jax.Array]]]:
  """Builds `train_step(state, batches) -> (state, metrics)` (pure)."""

  def loss_fn(trainable, frozen, batches, rng):
    params = precision.compute_params(trainable, frozen, compute_dtype)
    total, metrics = 0.0, {}
    for index, (name, batch) in enumerate(sorted(batches.items())):
      logits = apply_fn(params, jax.random.fold_in(rng, index),
                        batch['tokens'], batch['media'], batch['media_mask'],
                        batch['media_index'], is_training=True)  # [B, L, V]
      loss, count = sequence_loss(logits, batch['targets'],
                                  batch['loss_mask'])
      total = total + weights[name] * loss
      metrics[f'loss/{name}'] = loss
      metrics[f'supervised_tokens/{name}'] = count
    return total, metrics

  def train_step(state: TrainState, batches: Mapping[str, Batch]):
    rng = jax.random.fold_in(state.rng, state.step)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, metrics), grads = grad_fn(state.trainable, state.frozen, batches,
                                     rng)
    updates, opt_state = optimizer.update(grads, state.opt_state,
                                          state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    # A non-finite loss leaves parameters and optimizer state untouched, so
    # no checkpoint ever holds them; the loop stops at the next log step.
    finite = jnp.isfinite(loss)
    keep = lambda new, old: jax.tree.map(
        lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = TrainState(
        step=state.step + 1,
        trainable=keep(trainable, state.trainable),
        frozen=state.frozen,
        opt_state=keep(opt_state, state.opt_state),
        rng=state.rng)
    metrics.update(
        loss=loss,
        grad_norm=optax.tree.norm(grads),
        param_norm=optax.tree.norm(state.trainable),
        learning_rate=learning_rate_fn(state.step),
        **gate_values(new_state.trainable))
    return new_state, metrics

  return train_step
