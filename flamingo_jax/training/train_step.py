"""The train state and the one jitted train step.

One step takes a dict of batches, one per dataset of the mixture, and
computes each dataset's loss with lambda (`config.data.datasets.<name>.weight`)
as its weight, differentiated with respect to the trainable parameters only.
How the datasets' gradients become updates is `dataset_updates`
(`config.optim.dataset_updates`, paper §2.4 and Table 3 (ii)):

  'accumulate' (the paper's choice): the gradients of every dataset's
      weighted loss are accumulated, all at the same parameters, and ONE
      update is applied:  theta <- theta - opt(sum_m lambda_m grad L_m).
  'round_robin' (the ablation): the datasets take turns, one update each,
      in a fixed order (sorted names) within the step, each gradient taken
      at the parameters the previous update left:
        for m in datasets:  theta <- theta - opt(lambda_m grad L_m(theta)).
      A step is still one pass over every dataset's batch (the paper's step
      time for both rows covers "gradient updates on all training
      datasets"), so the optimizer takes M updates per step; build it with
      `optim.make_optimizer(config, updates_per_step=M)` so that the
      learning rate schedule stays a function of the step. With one dataset
      both modes are the same computation.

Metrics: `loss` is sum_m lambda_m L_m (in round-robin each L_m at the
parameters its update started from), `loss/<dataset>`,
`supervised_tokens/<dataset>`, `grad_norm` (of the summed gradients;
round-robin adds `grad_norm/<dataset>`), `param_norm`, `learning_rate`,
`skipped_steps` and the gates' |tanh(alpha)|.

The non-finite guard (`next_state`, shared by every task's step): a step
whose loss, gradient norm or updated parameters hold a NaN or an inf is
skipped -- parameters and optimizer state stay as they were, only the step
counter moves on -- and counted in the state (`skipped_steps`, and
`consecutive_skips`, which the loop stops on). One reduction (the norm) of the
new parameters; no host round trip. The counters are part of the state, so a
resumed run counts exactly as an uninterrupted one.

Micro-batches (`microbatches`, `config.optim.microbatches`) trade time for
memory: each dataset's batch is split into k strided parts (rows i, i+k,
...: with the batch split over devices in contiguous blocks, every part
stays spread over all of them), their gradients are summed in a `lax.scan`,
and the result equals the full-batch step: the loss is the sum of the parts'
token losses divided by the WHOLE batch's supervised-token count (computed
first), so parts with more supervised tokens weigh more, exactly as in the
full batch. Only randomness differs (part i uses fold_in(rng, i)); the model
draws none while the vision encoder is frozen.

Glossary of shapes:
  B: batch size of a dataset; L: its sequence length; V: vocabulary + <EOC>.
  N: media slots; T: frames; H, W: image size; K: micro-batches.
"""

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp
import optax

from flamingo_jax.models import precision

Batch = Mapping[str, jax.Array]
DATASET_UPDATES = ('accumulate', 'round_robin')
# Logits per chunk of the loss's float32 log-sum-exp (64 MiB); see _log_norm.
LOSS_CHUNK_ELEMENTS = 2**24


class TrainState(NamedTuple):
  """Everything a bit-exact resume needs, besides the data position."""
  step: jax.Array  # [] int32: completed steps (skipped ones included).
  trainable: hk.Params  # float32.
  frozen: hk.Params  # stored in bf16 (paper App. B.1.2).
  opt_state: optax.OptState  # Of the trainable parameters only.
  rng: jax.Array  # Base key; step keys are fold_in(rng, step).
  skipped_steps: jax.Array  # [] int32: non-finite steps skipped so far.
  consecutive_skips: jax.Array  # [] int32: ...of them in a row, up to now.


# Fields a checkpoint written before they existed may lack (they start at 0).
COUNTERS = ('skipped_steps', 'consecutive_skips')


def new_state(step: Any, trainable: hk.Params, frozen: hk.Params,
              opt_state: optax.OptState, rng: jax.Array) -> TrainState:
  """A TrainState whose non-finite counters are zero."""
  zero = jnp.zeros([], jnp.int32)
  return TrainState(step=step, trainable=trainable, frozen=frozen,
                    opt_state=opt_state, rng=rng, skipped_steps=zero,
                    consecutive_skips=zero)


@jax.custom_vjp
def _cross_entropy(
    logits: jax.Array,  # [B, L, V]
    targets: jax.Array,  # [B, L] int
) -> jax.Array:  # [B, L] float32
  """-log softmax(logits)[target], in float32 whatever the logits' dtype.

  The gradient, softmax - one_hot(target), is formed in one elementwise pass
  from the logits themselves and their log-sum-exp [B, L] (the only
  residuals), and comes out in the logits' dtype: no float32 [B, L, V]
  array is kept for the backward pass, and the forward one converts chunks
  of the sequence (`_log_norm`). With 32k-vocabulary bf16 logits [8, 256,
  V] the step's loss then needs 64 MiB of temporaries instead of 500 MiB
  (autodiff of log_softmax keeps the float32 log-probs and scatters the
  target's gradient into another float32 array).
  """
  return _cross_entropy_fwd(logits, targets)[0]


def _log_norm(logits: jax.Array) -> jax.Array:  # [B, L, V] -> [B, L] float32
  """log sum exp over the vocabulary, in float32, a chunk of rows at a time.

  A backend may convert a whole operand to float32 before reducing it (XLA's
  CPU backend does); chunks of the sequence bound that copy to
  LOSS_CHUNK_ELEMENTS.
  """
  batch, length, vocab = logits.shape
  rows = max([r for r in range(1, length + 1) if length % r == 0
              and batch * r * vocab <= LOSS_CHUNK_ELEMENTS] or [1])

  def chunk_log_norm(x):  # [B, r, V] -> [B, r]
    return jax.nn.logsumexp(x.astype(jnp.float32), axis=-1)

  if rows == length:
    return chunk_log_norm(logits)

  # The loop slices the logits' bits: XLA would otherwise move the float32
  # conversion ahead of the slice and out of the loop, converting them all.
  bits = jax.lax.bitcast_convert_type(
      logits, jnp.dtype(f'uint{8 * logits.dtype.itemsize}'))  # [B, L, V]

  def body(i, out):
    chunk = jax.lax.dynamic_slice_in_dim(bits, i * rows, rows, axis=1)  # [B, r, V]
    chunk = jax.lax.bitcast_convert_type(chunk, logits.dtype)  # [B, r, V]
    return jax.lax.dynamic_update_slice_in_dim(
        out, chunk_log_norm(chunk), i * rows, axis=1)  # [B, L]

  return jax.lax.fori_loop(0, length // rows, body,
                           jnp.zeros([batch, length], jnp.float32))


def _cross_entropy_fwd(logits, targets):
  log_norm = _log_norm(logits)  # [B, L]
  target_logit = jnp.take_along_axis(
      logits, targets[..., None], axis=-1)[..., 0]  # [B, L]
  return log_norm - target_logit.astype(jnp.float32), (logits, targets,
                                                       log_norm)


def _cross_entropy_bwd(residuals, g):  # g: [B, L]
  logits, targets, log_norm = residuals
  probs = jnp.exp(logits.astype(jnp.float32) - log_norm[..., None])  # [B, L, V]
  target = targets[..., None] == jnp.arange(logits.shape[-1])  # [B, L, V]
  grad = (probs - target) * g[..., None]  # [B, L, V]
  return grad.astype(logits.dtype), None


_cross_entropy.defvjp(_cross_entropy_fwd, _cross_entropy_bwd)


def token_nll(
    logits: jax.Array,  # [B, L, V]
    targets: jax.Array,  # [B, L] int
    loss_mask: jax.Array,  # [B, L] float
) -> tuple[jax.Array, jax.Array]:  # ([], [])
  """Sum of next-token cross-entropy over supervised tokens, and their count.

  Computed in float32; see `_cross_entropy` for the memory it saves.
  """
  nll = _cross_entropy(logits, targets.astype(jnp.int32))  # [B, L]
  mask = loss_mask.astype(jnp.float32)  # [B, L]
  return (nll * mask).sum(), mask.sum()


def sequence_loss(
    logits: jax.Array,  # [B, L, V]
    targets: jax.Array,  # [B, L] int
    loss_mask: jax.Array,  # [B, L] float
) -> tuple[jax.Array, jax.Array]:  # ([], [])
  """Mean next-token cross-entropy over supervised tokens, and their count.

  A batch with no supervised token has loss 0, not NaN.
  """
  total, count = token_nll(logits, targets, loss_mask)
  return total / jnp.maximum(count, 1.0), count


def gate_values(trainable: hk.Params) -> dict[str, jax.Array]:
  """|tanh(alpha)| of every cross-attention gate (the paper's Fig. 6)."""
  gates = trainable.get('gated_xattn/block', {})
  values = {}
  for name in ('attn_gate', 'ffw_gate'):
    if name in gates:
      for layer, alpha in enumerate(jnp.abs(jnp.tanh(gates[name]))):
        values[f'gates/{name}_{layer}'] = alpha
  return values


def split_microbatches(batch: Batch, microbatches: int) -> Batch:
  """[B, ...] -> [K, B/K, ...], part i holding rows i, i + K, i + 2K, ...

  Raises:
    ValueError: if K does not divide B.
  """

  def split(x):  # [B, ...] -> [K, B/K, ...]
    if x.shape[0] % microbatches:
      raise ValueError(f'{microbatches} micro-batches do not divide the batch '
                       f'size {x.shape[0]}.')
    parts = x.reshape(x.shape[0] // microbatches, microbatches,
                      *x.shape[1:])  # [B/K, K, ...]
    return jnp.swapaxes(parts, 0, 1)  # [K, B/K, ...]

  return jax.tree.map(split, dict(batch))


def all_finite(tree: Any) -> jax.Array:
  """[] bool: no NaN or inf in `tree`: its global norm is finite.

  One reduction, like the gradient norm's (per-leaf flags stacked together
  tripled the contrastive step's compile time). A norm that overflows, i.e.
  values beyond ~1e19, counts as non-finite too.
  """
  return jnp.isfinite(optax.tree.norm(tree))


def next_state(state: TrainState, loss: jax.Array, grad_norm: jax.Array,
               trainable: Any, opt_state: Any) -> TrainState:
  """The state after one step, or the same state if the step is not finite.

  A step whose loss, gradient norm or updated parameters are not all finite
  leaves parameters and optimizer state untouched (so no checkpoint can
  hold them) and is counted: `skipped_steps` (all) and `consecutive_skips`
  (in a row; a finite step resets it), on which the loop stops the run.
  """
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & all_finite(trainable)
  keep = lambda new, old: jax.tree.map(
      lambda n, o: jnp.where(finite, n, o), new, old)
  skipped = jnp.logical_not(finite).astype(jnp.int32)
  return TrainState(
      step=state.step + 1,
      trainable=keep(trainable, state.trainable),
      frozen=state.frozen,
      opt_state=keep(opt_state, state.opt_state),
      rng=state.rng,
      skipped_steps=state.skipped_steps + skipped,
      consecutive_skips=(state.consecutive_skips + 1) * skipped)


def make_train_step(
    apply_fn: Callable[..., jax.Array],
    optimizer: optax.GradientTransformation,
    weights: Mapping[str, float],
    compute_dtype: Any,
    learning_rate_fn: Callable[[jax.Array], jax.Array],
    *,
    dataset_updates: str = 'accumulate',
    microbatches: int = 1,
) -> Callable[[TrainState, Mapping[str, Batch]],
              tuple[TrainState, dict[str, jax.Array]]]:
  """Builds `train_step(state, batches) -> (state, metrics)` (pure).

  Args:
    apply_fn: `apply(params, rng, tokens, media, media_mask, media_index,
      is_training=True) -> logits [B, L, V]`, e.g. the Flamingo transform
      under `precision.with_compute_dtype`.
    optimizer: for the trainable partition; for 'round_robin', built with
      `updates_per_step` = the number of datasets (see the module docstring).
    weights: lambda per dataset name.
    compute_dtype: the dtype parameters are cast to for the forward pass.
    learning_rate_fn: step -> learning rate, for logging.
    dataset_updates: 'accumulate' (one update from all datasets) or
      'round_robin' (one update per dataset in turn).
    microbatches: K >= 1 parts each dataset's batch is split into for memory;
      the result equals the full-batch step.

  Returns:
    The pure train step, to be jitted.
  """
  if dataset_updates not in DATASET_UPDATES:
    raise ValueError(f'Unknown dataset_updates {dataset_updates!r}; expected '
                     f'one of {DATASET_UPDATES}.')
  if microbatches < 1:
    raise ValueError(f'microbatches must be >= 1; got {microbatches}.')

  def dataset_grads(trainable, frozen, name, batch, rng):
    """(loss, supervised tokens, grad of lambda * loss) of one dataset."""
    count = batch['loss_mask'].astype(jnp.float32).sum()
    denominator = jax.lax.stop_gradient(jnp.maximum(count, 1.0))

    def part_loss(trainable, part, rng):
      params = precision.compute_params(trainable, frozen, compute_dtype)
      logits = apply_fn(params, rng, part['tokens'], part['media'],
                        part['media_mask'], part['media_index'],
                        is_training=True)  # [B/K, L, V]
      total, _ = token_nll(logits, part['targets'], part['loss_mask'])
      return weights[name] * total / denominator, total

    grad_fn = jax.grad(part_loss, has_aux=True)
    if microbatches == 1:
      grads, total = grad_fn(trainable, batch, rng)
    else:
      parts = split_microbatches(batch, microbatches)  # [K, B/K, ...]

      def accumulate(carry, part_and_index):
        grads, total = carry
        part, index = part_and_index
        part_grads, part_total = grad_fn(trainable, part,
                                         jax.random.fold_in(rng, index))
        return (jax.tree.map(jnp.add, grads, part_grads),
                total + part_total), None

      zeros = jax.tree.map(jnp.zeros_like, trainable)
      (grads, total), _ = jax.lax.scan(
          accumulate, (zeros, jnp.zeros([], jnp.float32)),
          (parts, jnp.arange(microbatches)))
    return total / denominator, count, grads

  def update(trainable, opt_state, grads):
    updates, opt_state = optimizer.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state

  def train_step(state: TrainState, batches: Mapping[str, Batch]):
    rng = jax.random.fold_in(state.rng, state.step)
    trainable, opt_state = state.trainable, state.opt_state
    loss, metrics, total_grads = 0.0, {}, None
    for index, (name, batch) in enumerate(sorted(batches.items())):
      dataset_loss, count, grads = dataset_grads(
          trainable, state.frozen, name, batch, jax.random.fold_in(rng, index))
      loss = loss + weights[name] * dataset_loss
      metrics[f'loss/{name}'] = dataset_loss
      metrics[f'supervised_tokens/{name}'] = count
      if dataset_updates == 'round_robin':
        metrics[f'grad_norm/{name}'] = optax.tree.norm(grads)
        trainable, opt_state = update(trainable, opt_state, grads)
      total_grads = grads if total_grads is None else jax.tree.map(
          jnp.add, total_grads, grads)
    if dataset_updates == 'accumulate':
      trainable, opt_state = update(trainable, opt_state, total_grads)
    grad_norm = optax.tree.norm(total_grads)
    updated = next_state(state, loss, grad_norm, trainable, opt_state)
    metrics.update(
        loss=loss,
        grad_norm=grad_norm,
        skipped_steps=updated.skipped_steps,
        param_norm=optax.tree.norm(state.trainable),
        learning_rate=learning_rate_fn(state.step),
        **gate_values(updated.trainable))
    return updated, metrics

  return train_step
