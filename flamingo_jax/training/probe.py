"""The binding probes: does the model name a picture by the word bound to it?

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

The text probe asks the same of an LM alone, on held-out episodes of the
LM stage's keyed episode text (`data.world.probe.text_probe_batch`: the
pictures in words, the query's line up to its word), scored the same way:

  probe/text_margin       as binding_margin; 0 for a model that ignores
                          its context (each word is the right one for
                          exactly one query, and such a model scores a word
                          the same whatever the query).
  probe/text_accuracy     as binding_accuracy (chance 1 / ways).

The training loop logs them every `config.probe.every` steps (and before
the first step): the binding probe in a Flamingo run, the text probe in an
LM run (`config.task = 'lm'`), so that the emergence of binding can be seen
over training (W/plots/probe.png, W/lm/plots/text_probe.png).

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
# The metrics' name prefixes: '<prefix>_margin', '<prefix>_accuracy'.
BINDING = 'probe/binding'
TEXT = 'probe/text'


def binding_scores(logits: jax.Array, targets: jax.Array,
                   score_mask: jax.Array, ways: int,
                   prefix: str = BINDING) -> dict[str, jax.Array]:
  """Margin and accuracy from the rows' logits [R, L, V] (module docstring).

  Args:
    logits: [R, L, V], rows ordered (episode, query, candidate).
    targets: [R, L] int.
    score_mask: [R, L]: the candidate's scored targets.
    ways: Q = C.
    prefix: the metrics' names, BINDING or TEXT.

  Returns:
    '<prefix>_margin' and '<prefix>_accuracy', scalars.
  """
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
  return {f'{prefix}_margin': (correct - others).mean(),
          f'{prefix}_accuracy': (best == jnp.arange(ways)).mean()}


def make_probe_fn(apply_fn: Callable[..., jax.Array], batch: Mapping[str, Any],
                  prefix: str = BINDING
                  ) -> Callable[[Any], dict[str, float]]:
  """params -> the probe's scalars on `batch`, jitted once.

  Args:
    apply_fn: the model's apply, `(params, rng, tokens, media, media_mask,
      media_index, is_training=False) -> logits [R, L, V]` (Flamingo's, or
      the LM's alone: `flamingo.transform_lm`).
    batch: `probe_batch`'s or `text_probe_batch`'s arrays (kept on the
      device between calls).
    prefix: the metrics' names: BINDING, or TEXT for the text probe.
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
                          ways, prefix)

  def run(params) -> dict[str, float]:
    return {k: float(v) for k, v in
            jax.device_get(probe(params, arrays)).items()}

  return run
