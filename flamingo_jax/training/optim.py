"""Which parameters Flamingo trains, and the optimizer that trains them.

Freezing (paper §2, App. B.1.2): the vision encoder and the LM stay frozen;
the Perceiver Resampler, the GATED XATTN-DENSE layers and the `<EOC>` rows
train. A config declares this as an ordered list of rules,

  config.freeze = [(regex, 'train' | 'frozen'), ...]

matched with `re.fullmatch` against parameter paths such as
'lm/blocks/block/ffw/hidden/w'; the first match wins and every parameter must
be matched (a ValueError lists those that are not). `partition` splits the
parameters into a trainable and a frozen Haiku dict; the optimizer only ever
sees the trainable one, so frozen weights carry no optimizer state and get no
update, and the train step differentiates only with respect to the trainable
partition (the model also stops the gradient at the vision features).

Optimizer (`config.optim`, App. B.1.2): AdamW (b1 0.9, b2 0.999, eps 1e-8),
gradients clipped to a global norm of 1, learning rate warmed up linearly
from 0 to 1e-4 over 5000 steps, then constant (cosine and rsqrt decay are
options). Weight decay 0.1 is decoupled as in optax (the update is
-lr * (adam + wd * param)) and masked by `config.optim.weight_decay_rules`:

  * no decay on the Perceiver Resampler (the paper);
  * decay on the matrices (`.../w`) of the other trainable layers;
  * no decay on the tanh gates (decay would pull them back towards 0, i.e.
    towards switching the cross-attention off), norm scales and offsets,
    biases, or the `<EOC>` embedding rows (embeddings, as in GPT-style
    recipes). The paper says only "0.1 for the other trainable parameters";
    this is the conventional reading for 1-d and embedding parameters.

Learning-rate multipliers (`config.optim.lr_multipliers`, `((regex,
float), ...)`, first match wins, unmatched parameters 1.0; empty by default)
scale the final update of the parameters they match, so both the Adam step
and the weight decay run at that fraction of the learning rate. The paper's
LM co-trained on text (arXiv v1 §4.4.3, Table 10 (vi)) uses 0.1 on the LM.

`config.optim` also says how the train step turns the datasets' gradients
into updates (`dataset_updates`: 'accumulate', the paper's, or
'round_robin', Table 3 (ii)) and into how many micro-batches it splits each
batch (`microbatches`); see train_step.py. Round-robin makes one update per
dataset per step: `make_optimizer(config, updates_per_step=M)` keeps the
learning-rate schedule a function of the train step.
"""

from collections.abc import Sequence
import functools
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp
import ml_collections
import optax

from flamingo_jax import training

TRAIN = 'train'
FROZEN = 'frozen'
LABELS = (TRAIN, FROZEN)

# Flamingo's default freeze rules (config.freeze), first match wins.
FLAMINGO_FREEZE_RULES = (
    ('perceiver_resampler/.*', TRAIN),
    ('gated_xattn/.*', TRAIN),
    ('lm/eoc_(un)?embedding', TRAIN),  # The learned <EOC> rows.
    ('lm/.*', FROZEN),
    ('vision_encoder/.*', FROZEN),
)

# Which trainable parameters get weight decay (see the module docstring).
WEIGHT_DECAY_RULES = (
    ('perceiver_resampler/.*', False),
    ('.*/w', True),  # Linear kernels (hk.Linear and conv 'w').
    ('.*', False),  # Gates, norms, biases, <EOC> rows.
)

SCHEDULES = ('constant', 'cosine', 'rsqrt')


def _labels(params: hk.Params, rules: training.Rules, what: str,
            allowed: Sequence[Any] | None = None) -> hk.Params:
  """A tree like `params` of each leaf's first matching rule value.

  Raises:
    ValueError: if a rule value is not in `allowed`, or some parameter
      matches no rule (all such paths are listed).
  """
  rules = [tuple(rule) for rule in rules]
  if allowed is not None:
    bad = [rule for rule in rules if rule[1] not in allowed]
    if bad:
      raise ValueError(f'{what} rules must map a regex to one of {allowed}; '
                       f'got {bad}.')
  uncovered = []

  def label(path, leaf):
    del leaf  # Only the path decides.
    name = training.path_str(path)
    index = training.match_rule(name, rules)
    if index is None:
      uncovered.append(name)
      return None
    return rules[index][1]

  labels = jax.tree_util.tree_map_with_path(label, params)
  if uncovered:
    raise ValueError(
        f'{len(uncovered)} parameter(s) match no {what.lower()} rule; add '
        f'rules for: {sorted(uncovered)} (rules: {rules}).')
  return labels


def freeze_labels(params: hk.Params, rules: training.Rules) -> hk.Params:
  """'train' or 'frozen' for every parameter (a tree like `params`)."""
  return _labels(params, rules, 'Freeze', allowed=LABELS)


def partition(params: hk.Params,
              rules: training.Rules) -> tuple[hk.Params, hk.Params]:
  """(trainable, frozen) Haiku parameter dicts according to freeze rules.

  Works on any tree shaped like the parameters (arrays, ShapeDtypeStructs,
  shardings), so shardings can be split the same way as the parameters.
  """
  labels = freeze_labels(params, rules)
  return hk.data_structures.partition(
      lambda module, name, _: labels[module][name] == TRAIN, params)


def merge(trainable: hk.Params, frozen: hk.Params) -> hk.Params:
  """The inverse of `partition`."""
  return hk.data_structures.merge(trainable, frozen, check_duplicates=True)


def weight_decay_mask(params: hk.Params, rules: training.Rules) -> hk.Params:
  """True for every parameter that gets weight decay (a tree like `params`)."""
  return _labels(params, rules, 'Weight decay', allowed=(True, False))


def default_optim_config() -> ml_collections.ConfigDict:
  """`config.optim` with the paper's values (App. B.1.2)."""
  config = ml_collections.ConfigDict()
  config.learning_rate = 1e-4  # Peak learning rate.
  config.schedule = 'constant'  # After warm-up: one of SCHEDULES.
  config.warmup_steps = 5000  # Linear warm-up from 0; 0 = none.
  config.decay_steps = 0  # 'cosine' only: steps from peak to end (> 0).
  config.end_learning_rate = 0.0  # 'cosine' only.
  config.b1 = 0.9
  config.b2 = 0.999
  config.eps = 1e-8
  config.weight_decay = 0.1
  config.weight_decay_rules = list(WEIGHT_DECAY_RULES)
  config.clip_norm = 1.0  # Global gradient norm; 0 or None = no clipping.
  # How the datasets' gradients become updates (paper Table 3 (ii)):
  # 'accumulate' (the paper) or 'round_robin'; see train_step.py.
  config.dataset_updates = 'accumulate'
  # Split each dataset's batch into this many micro-batches whose gradients
  # are summed (memory, not maths: the step equals the full-batch one).
  config.microbatches = 1
  # ((regex, multiplier), ...) of the learning rate; unmatched: 1 (see
  # above). A tuple, so that the command line can set it:
  # --config.optim.lr_multipliers="(('.*/ffw_gate', 0.0),)".
  config.lr_multipliers = ()
  return config


def lr_multipliers(params: hk.Params, rules: training.Rules) -> hk.Params:
  """Each parameter's learning-rate multiplier (1.0 where no rule matches)."""
  rules = [tuple(rule) for rule in rules]
  bad = [rule for rule in rules
         if not isinstance(rule[1], (int, float)) or rule[1] < 0]
  if bad:
    raise ValueError('optim.lr_multipliers must map a regex to a number >= '
                     f'0; got {bad}.')
  return _labels(params, rules + [('.*', 1.0)], 'Learning-rate multiplier')


def scale_by_lr_multipliers(
    rules: training.Rules) -> optax.GradientTransformation:
  """Multiplies each update by its parameter's `lr_multipliers` value."""

  def update(updates, state, params=None):
    del params  # The paths of `updates` decide.
    factors = lr_multipliers(updates, rules)
    return jax.tree.map(lambda u, f: u * jnp.asarray(f, u.dtype), updates,
                        factors), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(),
                                      update)


def _after_warmup(config: ml_collections.ConfigDict) -> optax.Schedule:
  """The schedule from the end of warm-up on (its step 0 is the peak)."""
  peak = config.learning_rate
  if config.schedule == 'constant':
    return optax.constant_schedule(peak)
  if config.schedule == 'cosine':
    if config.decay_steps <= 0:
      raise ValueError('The cosine schedule needs optim.decay_steps > 0; got '
                       f'{config.decay_steps}.')
    return optax.cosine_decay_schedule(
        peak, config.decay_steps, alpha=config.end_learning_rate / peak)
  if config.schedule == 'rsqrt':
    if config.warmup_steps <= 0:
      raise ValueError('The rsqrt schedule decays as sqrt(warmup / step) and '
                       'needs optim.warmup_steps > 0; got '
                       f'{config.warmup_steps}.')
    warmup = config.warmup_steps
    # join_schedules also evaluates this before its boundary (count < 0).
    return lambda count: peak * jnp.sqrt(
        warmup / (jnp.maximum(count, 0) + warmup))
  raise ValueError(f'Unknown optim.schedule {config.schedule!r}; expected one '
                   f'of {SCHEDULES}.')


def learning_rate_fn(config: ml_collections.ConfigDict) -> optax.Schedule:
  """step -> learning rate for `config.optim` (also for logging)."""
  after = _after_warmup(config)
  if config.warmup_steps <= 0:
    return after
  warmup = optax.linear_schedule(0.0, config.learning_rate,
                                 config.warmup_steps)
  return optax.join_schedules([warmup, after], [config.warmup_steps])


def updates_per_step(config: ml_collections.ConfigDict,
                     num_datasets: int) -> int:
  """Optimizer updates in one train step: M for round-robin, else 1.

  Raises:
    ValueError: for an unknown `config.dataset_updates`.
  """
  mode = config.get('dataset_updates', 'accumulate')
  if mode == 'accumulate':
    return 1
  if mode == 'round_robin':
    return num_datasets
  raise ValueError(f"Unknown optim.dataset_updates {mode!r}; expected "
                   "'accumulate' or 'round_robin'.")


def make_optimizer(config: ml_collections.ConfigDict,
                   updates_per_step: int = 1
                   ) -> optax.GradientTransformation:
  """AdamW with clipping and masked weight decay, for `config.optim`.

  Apply it to the TRAINABLE partition only (see `partition`): its state then
  holds Adam moments for those parameters alone, in their dtype (float32).

  Args:
    config: the `config.optim` section (see `default_optim_config`).
    updates_per_step: optimizer updates per train step (`updates_per_step`
      above); the learning rate of update u is that of step u // this, so
      the schedule (warm-up steps, ...) counts train steps in every mode.

  Returns:
    The optax transformation.
  """
  if updates_per_step < 1:
    raise ValueError(f'updates_per_step must be >= 1; got {updates_per_step}.')
  schedule = learning_rate_fn(config)
  if updates_per_step > 1:
    by_step = schedule
    schedule = lambda count: by_step(count // updates_per_step)
  adamw = optax.adamw(
      schedule, b1=config.b1, b2=config.b2, eps=config.eps,
      weight_decay=config.weight_decay,
      mask=functools.partial(weight_decay_mask,
                             rules=tuple(config.weight_decay_rules)))
  parts = [adamw]
  if config.get('lr_multipliers'):
    parts.append(scale_by_lr_multipliers(tuple(config.lr_multipliers)))
  if config.clip_norm:
    parts.insert(0, optax.clip_by_global_norm(config.clip_norm))
  return parts[0] if len(parts) == 1 else optax.chain(*parts)
