"""The binding probe: does the model name a picture by the word bound to it?

On held-out nonce episodes (`data.world.probe.probe_batch`: every query of
an episode continued by every word of the episode), the probe scores each
continuation by its summed log-probability and reports, averaged over the
queries:

  probe/binding_margin    log p(the query's word) - mean log p(the other
                          words of its episode), in nats; 0 for a model that
                          does not look at the pictures (the rows' texts do
                          not depend on the query's picture, so each word is
                          the right one for exactly one query of the
                          episode), > 0 once the model binds in context.
  probe/binding_accuracy  how often the query's word scores highest (chance
                          1 / ways), as the nonce_choice task decides.

The training loop logs both every `config.probe.every` steps (and before the
first step), so that the emergence of binding can be seen over training
(W/plots/probe.png).

Glossary of shapes:
  R: rows = E * Q * C (episodes, queries, candidates; Q = C = ways).
  L: sequence length; V: vocabulary.
"""

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

MODEL_INPUTS = ('tokens', 'media', 'media_mask', 'media_index')


def binding_scores(logits: jax.Array, targets: jax.Array,
                   score_mask: jax.Array, ways: int) -> dict[str, jax.Array]:
  """Margin and accuracy from the rows' logits [R, L, V] (module docstring)."""
  rows = logits.shape[0]
  if rows % (ways * ways):
    raise ValueError(f'The probe has {rows} rows, not a multiple of '
                     f'ways^2 = {ways * ways}.')
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))  # [R, L, V]
  target_lp = jnp.take_along_axis(log_probs, targets[..., None],
                                  axis=-1)[..., 0]  # [R, L]
  scores = (target_lp * score_mask).sum(-1)  # [R]
  scores = scores.reshape(-1, ways, ways)  # [E, Q, C]
  eye = jnp.eye(ways, dtype=bool)  # [Q, C]: the correct candidates.
  correct = jnp.where(eye, scores, 0.0).sum(-1)  # [E, Q]
  others = jnp.where(eye, 0.0, scores).sum(-1) / (ways - 1)  # [E, Q]
  best = jnp.argmax(scores, axis=-1)  # [E, Q]
  return {'probe/binding_margin': (correct - others).mean(),
          'probe/binding_accuracy': (best == jnp.arange(ways)).mean()}


def make_probe_fn(apply_fn: Callable[..., jax.Array], batch: Mapping[str, Any]
                  ) -> Callable[[Any], dict[str, float]]:
  """params -> the probe's scalars on `batch`, jitted once.

  Args:
    apply_fn: the model's apply, `(params, rng, tokens, media, media_mask,
      media_index, is_training=False) -> logits [R, L, V]`.
    batch: `probe_batch`'s arrays (kept on the device between calls).
  """
  ways = int(batch['ways'])
  arrays = jax.device_put({k: np.asarray(batch[k])
                           for k in MODEL_INPUTS + ('targets', 'score_mask')})

  @jax.jit
  def probe(params, arrays):
    logits = apply_fn(params, jax.random.key(0),
                      *(arrays[k] for k in MODEL_INPUTS),
                      is_training=False)  # [R, L, V]
    return binding_scores(logits, arrays['targets'], arrays['score_mask'],
                          ways)

  def run(params) -> dict[str, float]:
    return {k: float(v) for k, v in
            jax.device_get(probe(params, arrays)).items()}

  return run
