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

The keyed probe asks a Flamingo model the binding probe's question with
every picture's key also written in words at the start of its line, the
query's too (`probe_batch(keyed=True)`), the LM stage's format:

  probe/keyed_margin, probe/keyed_accuracy
                          as binding_*; a model whose frozen LM binds the
                          LM stage's text scores high with its gates at 0
                          (Flamingo is then that LM), so a drop while
                          training says that the cross-attention layers'
                          writes break the LM's binding circuit.

The attribute probe asks the vision encoder alone (a contrastive run's,
`config.task = 'contrastive'`), on held-out one-object pictures
(`data.world.probe.attribute_probe_images`), whether a linear read-out of
its features (the spatial mean of the visual tokens Flamingo's resampler
reads) tells each attribute's values apart:

  probe/vision_<attribute>_accuracy  test accuracy of a ridge-regression
                          read-out to the one-hot labels, fitted in closed
                          form on the other pictures (chance 1 / values).

The training loop logs them every `config.probe.every` steps (and before
the first step): the binding and keyed probes in a Flamingo run, the text
probe in an LM run (`config.task = 'lm'`), so that the emergence of binding
can be seen over training (W/plots/probe.png, keyed_probe.png,
W/lm/plots/text_probe.png).

Glossary of shapes:
  R: rows = E * Q * C (episodes, queries, candidates; Q = C = ways).
  L: sequence length; V: vocabulary.
  M: attribute probe pictures (Mt of them fit the read-out); C: feature
    width; K: an attribute's values.
"""

from collections.abc import Callable, Mapping
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flamingo_jax.models import precision

MODEL_INPUTS = ('tokens', 'media', 'media_mask', 'media_index')
# The metrics' name prefixes: '<prefix>_margin', '<prefix>_accuracy'.
BINDING = 'probe/binding'
TEXT = 'probe/text'
KEYED = 'probe/keyed'
VISION = 'probe/vision'  # '<VISION>_<attribute>_accuracy'.
READOUT_L2 = 1e-2  # The ridge penalty, on standardised features.


def binding_scores(logits: jax.Array, targets: jax.Array,
                   score_mask: jax.Array, ways: int,
                   prefix: str = BINDING) -> dict[str, jax.Array]:
  """Margin and accuracy from the rows' logits [R, L, V] (module docstring).

  Args:
    logits: [R, L, V], rows ordered (episode, query, candidate).
    targets: [R, L] int.
    score_mask: [R, L]: the candidate's scored targets.
    ways: Q = C.
    prefix: the metrics' names: BINDING, KEYED or TEXT.

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


def make_probe_fn(apply_fn: Callable[..., jax.Array],
                  batches: Mapping[str, Mapping[str, Any]]
                  ) -> Callable[[Any], dict[str, float]]:
  """params -> the probes' scalars on each of `batches`, jitted once.

  Args:
    apply_fn: the model's apply, `(params, rng, tokens, media, media_mask,
      media_index, is_training=False) -> logits [R, L, V]` (Flamingo's, or
      the LM's alone: `flamingo.transform_lm`).
    batches: {prefix: batch}, the metrics' name prefix (BINDING, KEYED,
      TEXT) of each of `probe_batch`'s or `text_probe_batch`'s arrays (kept
      on the device between calls). One jitted function scores them all, so
      batches of one shape (the binding and keyed probes') compile once.
  """
  ways = {int(batch['ways']) for batch in batches.values()}
  if len(ways) != 1:
    raise ValueError(f'The probe batches have different ways: {ways}.')
  ways = ways.pop()
  arrays = {prefix: jax.device_put(
      {k: np.asarray(batch[k])
       for k in MODEL_INPUTS + ('targets', 'score_mask')})
            for prefix, batch in batches.items()}

  @jax.jit
  def probe(params, arrays):
    logits = apply_fn(params, jax.random.key(0),
                      *(arrays[k] for k in MODEL_INPUTS),
                      is_training=False)  # [R, L, V]
    return binding_scores(logits, arrays['targets'], arrays['score_mask'],
                          ways, prefix='')

  def run(params) -> dict[str, float]:
    return {prefix + k: float(v)
            for prefix, batch in arrays.items()
            for k, v in jax.device_get(probe(params, batch)).items()}

  return run


def readout_accuracy(features: jax.Array, labels: jax.Array, num_train: int,
                     num_classes: int, l2: float = READOUT_L2) -> jax.Array:
  """Test accuracy of a linear read-out of `features` [M, C] to `labels`.

  Ridge regression to the one-hot labels, fitted in closed form on the
  first `num_train` rows (features standardised by their statistics, plus
  a bias), and scored by its argmax on the rest: deterministic, and cheap
  enough to run while training.
  """
  features = features.astype(jnp.float32)  # [M, C]
  fit, test = features[:num_train], features[num_train:]  # [Mt, C], [M-Mt, C]
  mean, std = fit.mean(0), fit.std(0) + 1e-6  # [C]

  def design(x):
    x = (x - mean) / std  # [., C]
    return jnp.concatenate([x, jnp.ones_like(x[:, :1])], axis=1)  # [., C+1]

  x = design(fit)  # [Mt, C + 1]
  targets = jax.nn.one_hot(labels[:num_train], num_classes)  # [Mt, K]
  gram = x.T @ x + l2 * num_train * jnp.eye(x.shape[1])  # [C+1, C+1]
  weights = jnp.linalg.solve(gram, x.T @ targets)  # [C + 1, K]
  predicted = jnp.argmax(design(test) @ weights, axis=-1)  # [M - Mt]
  return (predicted == labels[num_train:]).mean()


def make_attribute_probe_fn(
    features_fn: Callable[[Any, jax.Array], jax.Array],
    pictures: Mapping[str, Mapping[str, Any]]
) -> Callable[[Any], dict[str, float]]:
  """params -> '<VISION>_<attribute>_accuracy' per attribute, jitted once.

  Args:
    features_fn: `(params, images uint8 [M, H, W, 3]) -> [M, C]`.
    pictures: attribute -> `attribute_probe_images`'s arrays.
  """
  arrays = {a: jax.device_put({'images': np.asarray(p['images']),
                               'labels': np.asarray(p['labels'])})
            for a, p in pictures.items()}
  sizes = {a: (int(p['num_train']), int(p['num_classes']))
           for a, p in pictures.items()}

  @jax.jit
  def probe(params, arrays):
    return {f'{VISION}_{a}_accuracy': readout_accuracy(
        features_fn(params, x['images']), x['labels'], *sizes[a])
            for a, x in arrays.items()}

  def run(params) -> dict[str, float]:
    return {k: float(v) for k, v in
            jax.device_get(probe(params, arrays)).items()}

  return run


def from_config(config, model):
  """(params -> probe scalars, every) for `config.probe`; (None, 0) if off.

  config.probe: every (steps), episodes, seed, ways, shots, seq_len; the
  episodes are `data.world.probe`'s, in the run's tokenizer and image size:
  picture episodes for Flamingo (`probe_batch`, plain and keyed), their
  keyed text for an LM alone (`config.task = 'lm'`, `text_probe_batch`).
  A contrastive run (the vision stage) probes its encoder's features
  instead: every, seed and images (per attribute;
  `attribute_probe_images`). Other tasks: off.
  """
  spec = config.get('probe', None)
  task = config.get('task', 'flamingo')
  if not spec or task not in ('flamingo', 'lm', 'contrastive'):
    return None, 0
  # pylint: disable=g-import-not-at-top
  from flamingo_jax.data import tokenizer as tokenizer_lib
  from flamingo_jax.data.world import probe as probe_data
  # pylint: enable=g-import-not-at-top
  if task == 'contrastive':
    return _attribute_probe(config, spec, probe_data), spec.every
  probes = ([(probe_data.text_probe_batch, TEXT)] if task == 'lm' else
            [(probe_data.probe_batch, BINDING),
             (functools.partial(probe_data.probe_batch, keyed=True), KEYED)])
  tokenizer = tokenizer_lib.Tokenizer.load(config.data.tokenizer)
  apply_fn = precision.with_compute_dtype(
      model, jnp.dtype(config.compute_dtype)).apply
  return make_probe_fn(apply_fn, {prefix: make_batch(
      tokenizer, num_episodes=spec.episodes, seed=spec.seed, ways=spec.ways,
      shots=spec.shots, image_size=config.model.image_size,
      seq_len=spec.seq_len) for make_batch, prefix in probes}), spec.every


def _attribute_probe(config, spec, probe_data):
  """The vision stage's attribute probe (`make_attribute_probe_fn`)."""
  # pylint: disable=g-import-not-at-top
  from flamingo_jax.data.world import nonce
  from flamingo_jax.models import contrastive as contrastive_model
  # pylint: enable=g-import-not-at-top
  pictures = {a: probe_data.attribute_probe_images(
      a, num_images=spec.get('images', 1024), seed=spec.seed,
      image_size=config.model.image_size) for a in nonce.ATTRIBUTES}
  features = contrastive_model.transform_features(config.model)
  return make_attribute_probe_fn(
      lambda params, images: features.apply(params, None, images), pictures)
