"""Contrastive pretraining of the vision encoder: the loss and the train step.

The paper pretrains Flamingo's vision encoder on image-text pairs with the
two-term contrastive loss of CLIP/ALIGN (§2.1, App. B.1.3). For a batch of B
pairs with unit-norm embeddings x_i (image) and y_j (text) and the learned
inverse temperature s = 1 / tau:

  logits_ij = s * <x_i, y_j>                                      [B, B]
  L = 1/2 [ mean_i -log softmax_j(logits_i.)_i      (image -> text)
          + mean_j -log softmax_i(logits_.j)_j ]    (text -> image)

Rows that hold no example (the pipeline's all-padding rows for unusable
examples) are left out of both softmaxes and both means.

A run selects this with `config.task = 'contrastive'`: the training loop
(`loop.py`) then builds `models.contrastive` and this train step instead of
Flamingo's, and everything else -- sharded state, freezing rules (here:
everything trains), checkpoints, metrics.jsonl, plots, resume -- is the same.
The batches are the pipeline's 'pairs' batches: `media` [B, 1, 1, H, W, 3]
and `tokens` [B, L], whose non-padding ids are `<BOS><image>caption<EOC>`.
Per dataset the step logs `loss/<name>`, the in-batch retrieval accuracies
`i2t_accuracy/<name>` (image -> text top-1; chance is 1 / B) and
`t2i_accuracy/<name>`, and `logit_scale` (s).

Glossary of shapes:
  B: batch size of a dataset; E: joint embedding width; L: text tokens.
"""

from collections.abc import Callable, Mapping
from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax

from flamingo_jax.models import contrastive as contrastive_model
from flamingo_jax.models import precision
from flamingo_jax.training import optim
from flamingo_jax.training import train_step as train_step_lib

Batch = Mapping[str, jax.Array]
TrainState = train_step_lib.TrainState

# Everything trains: both towers, the projections and the temperature.
FREEZE_RULES = (('.*', optim.TRAIN),)
# Data parallel only: the towers are replicated (the vision encoder is also
# replicated in Flamingo's rules).
PARAM_RULES = (('.*', ()),)


def contrastive_loss(
    image: jax.Array,  # [B, E], unit norm
    text: jax.Array,  # [B, E], unit norm
    scale: jax.Array,  # [], 1 / temperature
    valid: Optional[jax.Array] = None,  # [B] bool: rows that hold a pair
) -> tuple[jax.Array, dict[str, jax.Array]]:  # ([], metrics)
  """The two-term contrastive loss and the in-batch retrieval accuracies.

  Args:
    image: image embeddings, row i paired with text row i.
    text: text embeddings.
    scale: the inverse temperature multiplying the cosine similarities.
    valid: which rows hold a real pair (default: all). Invalid rows are
      neither queries nor candidates.

  Returns:
    The loss (the mean of the image->text and text->image cross-entropies;
    0 when no row is valid) and {'i2t_loss', 't2i_loss', 'i2t_accuracy',
    't2i_accuracy'} (top-1, over valid rows).
  """
  if image.shape != text.shape or image.ndim != 2:
    raise ValueError(f'image and text embeddings must both be [B, E]; got '
                     f'{tuple(image.shape)} and {tuple(text.shape)}.')
  batch = image.shape[0]
  if valid is None:
    valid = jnp.ones([batch], bool)  # [B]
  logits = scale * jnp.einsum('ie,je->ij', image.astype(jnp.float32),
                              text.astype(jnp.float32))  # [B, B]
  pair = valid[:, None] & valid[None, :]  # [B, B]
  logits = jnp.where(pair, logits, jnp.finfo(jnp.float32).min)  # [B, B]
  diagonal = jnp.diagonal(logits)  # [B]
  # Row i: image i against every text; column j: text j against every image.
  i2t = jax.nn.logsumexp(logits, axis=1) - diagonal  # [B]
  t2i = jax.nn.logsumexp(logits, axis=0) - diagonal  # [B]
  weights = valid.astype(jnp.float32)  # [B]
  count = jnp.maximum(weights.sum(), 1.0)
  i2t_loss = (i2t * weights).sum() / count
  t2i_loss = (t2i * weights).sum() / count
  index = jnp.arange(batch)  # [B]
  i2t_hit = jnp.argmax(logits, axis=1) == index  # [B]
  t2i_hit = jnp.argmax(logits, axis=0) == index  # [B]
  metrics = dict(
      i2t_loss=i2t_loss, t2i_loss=t2i_loss,
      i2t_accuracy=(i2t_hit * weights).sum() / count,
      t2i_accuracy=(t2i_hit * weights).sum() / count)
  return 0.5 * (i2t_loss + t2i_loss), metrics


def valid_rows(tokens: jax.Array) -> jax.Array:  # [B, L] -> [B] bool
  """Rows with any non-padding token (skipped examples are all padding)."""
  return jnp.any(tokens != contrastive_model.PAD_ID, axis=1)  # [B]


def make_train_step(
    apply_fn: Callable[..., Mapping[str, jax.Array]],
    optimizer: optax.GradientTransformation,
    weights: Mapping[str, float],
    compute_dtype: Any,
    learning_rate_fn: Callable[[jax.Array], jax.Array],
    *,
    dataset_updates: str = 'accumulate',
    microbatches: int = 1,
) -> Callable[[TrainState, Mapping[str, Batch]],
              tuple[TrainState, dict[str, jax.Array]]]:
  """`train_step(state, batches) -> (state, metrics)` for the contrastive task.

  The same contract as `train_step.make_train_step`: one update per step
  from the lambda-weighted sum of each dataset's loss (each dataset is its
  own in-batch softmax), differentiated with respect to the trainable
  partition; a non-finite step is skipped and counted
  (`train_step.next_state`). Only the
  'accumulate' mode and whole batches: micro-batches would shrink the set
  of in-batch negatives and so change the loss.

  Args:
    apply_fn: `contrastive_model.transform(config.model).apply` (possibly
      under `precision.with_compute_dtype`).
    optimizer: for the trainable partition.
    weights: lambda per dataset name.
    compute_dtype: dtype the parameters are cast to for the forward pass.
    learning_rate_fn: step -> learning rate, for logging.

    dataset_updates: must be 'accumulate' (`config.optim.dataset_updates`).
    microbatches: must be 1 (`config.optim.microbatches`).

  Returns:
    The pure train step, to be jitted.

  Raises:
    ValueError: for another `dataset_updates` or `microbatches`.
  """
  if dataset_updates != 'accumulate' or microbatches != 1:
    raise ValueError(
        "The contrastive task supports only optim.dataset_updates="
        f"'accumulate' and optim.microbatches=1 (in-batch negatives need the "
        f"whole batch); got {dataset_updates!r} and {microbatches}.")

  def loss_fn(trainable, frozen, batches, rng):
    params = precision.compute_params(trainable, frozen, compute_dtype)
    total, metrics = 0.0, {}
    for index, (name, batch) in enumerate(sorted(batches.items())):
      out = apply_fn(params, jax.random.fold_in(rng, index), batch['tokens'],
                     batch['media'], is_training=True)
      loss, parts = contrastive_loss(out['image'], out['text'], out['scale'],
                                     valid_rows(batch['tokens']))
      total = total + weights[name] * loss
      metrics[f'loss/{name}'] = loss
      for key, value in parts.items():
        metrics[f'{key}/{name}'] = value
      metrics['logit_scale'] = out['scale']
    return total, metrics

  def train_step(state: TrainState, batches: Mapping[str, Batch]):
    rng = jax.random.fold_in(state.rng, state.step)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, metrics), grads = grad_fn(state.trainable, state.frozen, batches,
                                     rng)
    updates, opt_state = optimizer.update(grads, state.opt_state,
                                          state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    grad_norm = optax.tree.norm(grads)
    # The same non-finite guard as Flamingo's step (skip and count).
    new_state = train_step_lib.next_state(state, loss, grad_norm, trainable,
                                          opt_state)
    metrics.update(
        loss=loss,
        grad_norm=grad_norm,
        skipped_steps=new_state.skipped_steps,
        param_norm=optax.tree.norm(state.trainable),
        learning_rate=learning_rate_fn(state.step))
    return new_state, metrics

  return train_step

