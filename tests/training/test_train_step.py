"""The train step: masked loss, lambda weighting, non-finite protection,
round-robin updates and micro-batches (on toy models: exact and instant)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flamingo_jax.training import optim
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


def _reference_nll(logits, targets, loss_mask):
  """The loss as autodiff would take it: float32 log_softmax."""
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
  nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
  return (nll * loss_mask).sum()


def _loss_inputs(dtype=jnp.float32, batch=3, length=8, vocab=37):
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  logits = (4 * jax.random.normal(keys[0], [batch, length, vocab])).astype(
      dtype)
  targets = jax.random.randint(keys[1], [batch, length], 0, vocab)
  loss_mask = (jax.random.uniform(keys[2], [batch, length]) > 0.3).astype(
      jnp.float32)
  return logits, targets, loss_mask


@pytest.mark.parametrize('chunk_elements', [2**24, 3 * 2 * 37])
def test_token_nll_equals_log_softmax_in_value_and_gradient(
    monkeypatch, chunk_elements):
  # 3 * 2 * 37: two rows of the sequence per chunk (four chunks).
  monkeypatch.setattr(train_step_lib, 'LOSS_CHUNK_ELEMENTS', chunk_elements)
  logits, targets, loss_mask = _loss_inputs()
  ours = lambda x: train_step_lib.token_nll(x, targets, loss_mask)[0]
  reference = lambda x: _reference_nll(x, targets, loss_mask)
  np.testing.assert_allclose(ours(logits), reference(logits), rtol=1e-6)
  np.testing.assert_allclose(jax.jit(jax.grad(ours))(logits),
                             jax.grad(reference)(logits), atol=1e-6)


def test_token_nll_in_bf16_keeps_the_logits_dtype_and_float32_sums():
  logits, targets, loss_mask = _loss_inputs(jnp.bfloat16)
  ours = lambda x: train_step_lib.token_nll(x, targets, loss_mask)[0]
  reference = lambda x: _reference_nll(x, targets, loss_mask)
  assert ours(logits).dtype == jnp.float32
  np.testing.assert_allclose(ours(logits), reference(logits), rtol=1e-6)
  grad = jax.grad(ours)(logits)
  assert grad.dtype == jnp.bfloat16
  np.testing.assert_allclose(grad.astype(jnp.float32),
                             jax.grad(reference)(logits).astype(jnp.float32),
                             atol=1e-2)


def test_token_nll_needs_one_chunk_of_float32_temporaries():
  """bf16 logits [8, 256, 32001]: 500 MiB of temporaries through
  log_softmax's autodiff; one 64-row float32 chunk (62.5 MiB) here."""
  logits = jax.ShapeDtypeStruct((8, 256, 32001), jnp.bfloat16)
  targets = jax.ShapeDtypeStruct((8, 256), jnp.int32)
  loss_mask = jax.ShapeDtypeStruct((8, 256), jnp.float32)
  grad = jax.jit(jax.grad(
      lambda x, t, m: train_step_lib.token_nll(x, t, m)[0]))
  temp = grad.lower(logits, targets, loss_mask).compile().memory_analysis(
  ).temp_size_in_bytes
  assert temp <= 4 * 2**24 * 1.01, temp / 2**20


def _toy_step(weights, optimizer=None):
  """A 'model' whose logits are a trainable bias: one dataset each.

  Its `kink` parameter (0) adds sqrt(|kink|) = 0 to the logits: nothing to
  the loss, but a NaN gradient when `kink` is exactly 0 (the issue's case of
  a finite loss with a NaN gradient norm); it starts at 1.
  """

  def apply_fn(params, rng, tokens, media, media_mask, media_index,
               is_training):
    del rng, media, media_mask, media_index, is_training
    block = params['gated_xattn/block']
    bias = block['attn_gate'] + 0.0 * jnp.sqrt(jnp.abs(block['kink']))  # [V]
    return jnp.broadcast_to(bias, tokens.shape + bias.shape)

  optimizer = optimizer or optax.sgd(1.0)
  step = train_step_lib.make_train_step(
      apply_fn, optimizer, weights, jnp.float32, lambda s: 1.0)
  trainable = {'gated_xattn/block': {'attn_gate': jnp.zeros([3]),
                                     'kink': jnp.ones([])}}
  state = train_step_lib.new_state(
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
      'gated_xattn/block': {'attn_gate': jnp.array([jnp.nan, 0.0, 0.0]),
                            'kink': jnp.ones([])}})
  new_state, metrics = step(poisoned, {'a': _batch(0)})
  assert not np.isfinite(metrics['loss'])
  assert int(new_state.step) == 1
  np.testing.assert_array_equal(
      new_state.trainable['gated_xattn/block']['attn_gate'],
      poisoned.trainable['gated_xattn/block']['attn_gate'])


def _skips(state):
  return int(state.skipped_steps), int(state.consecutive_skips)


def test_a_nan_gradient_with_a_finite_loss_is_skipped_and_counted():
  step, state = _toy_step({'a': 1.0})
  kinked = state._replace(trainable={'gated_xattn/block': {
      'attn_gate': jnp.zeros([3]), 'kink': jnp.zeros([])}})
  new_state, metrics = step(kinked, {'a': _batch(0)})
  assert np.isfinite(metrics['loss']) and not np.isfinite(metrics['grad_norm'])
  jax.tree.map(np.testing.assert_array_equal, new_state.trainable,
               kinked.trainable)
  assert int(new_state.step) == 1 and _skips(new_state) == (1, 1)
  assert metrics['skipped_steps'] == 1


def test_a_non_finite_update_is_skipped_and_a_finite_step_ends_the_run():
  # Finite loss and gradient, but a step size that overflows the update.
  step, state = _toy_step({'a': 1.0}, optimizer=optax.sgd(1e39))
  new_state, metrics = step(state, {'a': _batch(0)})
  assert np.isfinite(metrics['loss']) and np.isfinite(metrics['grad_norm'])
  jax.tree.map(np.testing.assert_array_equal, new_state.trainable,
               state.trainable)
  jax.tree.map(np.testing.assert_array_equal, new_state.opt_state,
               state.opt_state)
  assert _skips(new_state) == (1, 1)
  poisoned = _batch(0)
  poisoned['loss_mask'] = poisoned['loss_mask'].at[0, 0].set(jnp.nan)
  new_state, _ = step(new_state, {'a': poisoned})
  assert _skips(new_state) == (2, 2)
  good, _ = _toy_step({'a': 1.0})  # The same state, a sane step size.
  new_state, _ = good(new_state, {'a': _batch(0)})
  assert _skips(new_state) == (2, 0) and int(new_state.step) == 3


def _toy_model_step(weights, dataset_updates='accumulate', microbatches=1,
                    optimizer=None):
  """A 'model' that reads every input: tokens, media, media_index, masks."""

  def apply_fn(params, rng, tokens, media, media_mask, media_index,
               is_training):
    del rng, is_training
    p = params['gated_xattn/block']
    pixels = media.astype(jnp.float32).mean(axis=(2, 3, 4, 5))  # [B, N]
    pixels = (pixels * media_mask).sum(axis=1) / 255.0  # [B]
    embed = p['embed'][tokens]  # [B, L, V]
    phi = media_index.astype(jnp.float32)[..., None] * p['phi']  # [B, L, V]
    return embed + phi + pixels[:, None, None] * p['pixels']  # [B, L, V]

  optimizer = optimizer or optax.adam(0.1)
  step = train_step_lib.make_train_step(
      apply_fn, optimizer, weights, jnp.float32, lambda s: 1.0,
      dataset_updates=dataset_updates, microbatches=microbatches)
  rng = np.random.default_rng(0)
  trainable = {'gated_xattn/block': {
      'embed': jnp.asarray(rng.standard_normal([5, 5]), jnp.float32),
      'phi': jnp.asarray(rng.standard_normal([5]), jnp.float32),
      'pixels': jnp.asarray(rng.standard_normal([5]), jnp.float32)}}
  state = train_step_lib.new_state(
      step=jnp.zeros([], jnp.int32), trainable=trainable, frozen={},
      opt_state=optimizer.init(trainable), rng=jax.random.PRNGKey(0))
  return jax.jit(step), state


def _toy_batch(seed, batch=4, length=6, slots=2):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, 5, [batch, length]).astype(np.int32)
  # Uneven supervision: rows differ in their number of supervised tokens.
  mask = (rng.random([batch, length]) < np.linspace(0.2, 1.0, batch)[:, None])
  return dict(tokens=tokens, targets=np.roll(tokens, -1, axis=1),
              loss_mask=mask.astype(np.float32),
              media=rng.integers(0, 256, [batch, slots, 1, 2, 2, 3]).astype(
                  np.uint8),
              media_mask=rng.random([batch, slots]) < 0.7,
              media_index=rng.integers(0, slots + 1, [batch, length]).astype(
                  np.int32))


def _params(state):
  return jax.tree.map(np.asarray, state.trainable)


def test_round_robin_with_one_dataset_is_accumulation():
  batches = {'a': _toy_batch(0)}
  accumulate, state = _toy_model_step({'a': 0.5})
  round_robin, _ = _toy_model_step({'a': 0.5}, 'round_robin')
  for _ in range(2):
    state_a, metrics_a = accumulate(state, batches)
    state_r, metrics_r = round_robin(state, batches)
    jax.tree.map(np.testing.assert_array_equal, _params(state_a),
                 _params(state_r))
    np.testing.assert_array_equal(metrics_a['loss'], metrics_r['loss'])
    state = state_a


def test_round_robin_updates_on_each_dataset_in_turn():
  """Two datasets: update on 'a', then on 'b' at the updated parameters."""
  weights = {'a': 1.0, 'b': 0.5}
  batches = {'a': _toy_batch(0), 'b': _toy_batch(1)}
  round_robin, state = _toy_model_step(weights, 'round_robin',
                                       optimizer=optax.sgd(1.0))
  accumulate, _ = _toy_model_step(weights, optimizer=optax.sgd(1.0))
  single_a, _ = _toy_model_step({'a': 1.0}, optimizer=optax.sgd(1.0))
  single_b, _ = _toy_model_step({'b': 0.5}, optimizer=optax.sgd(1.0))
  new_state, metrics = round_robin(state, batches)
  after_a, _ = single_a(state, {'a': batches['a']})
  expected, metrics_b = single_b(after_a, {'b': batches['b']})
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6),
               _params(new_state), _params(expected))
  # 'b' was evaluated at the parameters 'a' left.
  np.testing.assert_allclose(metrics['loss/b'], metrics_b['loss/b'],
                             rtol=1e-6)
  assert int(new_state.step) == 1 and 'grad_norm/a' in metrics
  accumulated, _ = accumulate(state, batches)
  difference = jax.tree.map(lambda x, y: np.abs(x - y).max(),
                            _params(new_state), _params(accumulated))
  assert max(jax.tree.leaves(difference)) > 1e-3


def test_round_robin_non_finite_loss_reverts_every_update():
  round_robin, state = _toy_model_step({'a': 1.0, 'b': 1.0}, 'round_robin')
  poisoned = _toy_batch(1)
  poisoned['loss_mask'][0, 0] = np.nan
  new_state, metrics = round_robin(state, {'a': _toy_batch(0),
                                           'b': poisoned})
  assert np.isfinite(metrics['loss/a']) and not np.isfinite(metrics['loss'])
  jax.tree.map(np.testing.assert_array_equal, _params(new_state),
               _params(state))
  jax.tree.map(np.testing.assert_array_equal, new_state.opt_state,
               state.opt_state)


def test_microbatches_equal_the_full_batch():
  weights = {'a': 1.0, 'b': 0.2}
  batches = {'a': _toy_batch(0, batch=8), 'b': _toy_batch(1, batch=4)}
  full, state = _toy_model_step(weights)
  split, _ = _toy_model_step(weights, microbatches=4)
  state_full, metrics_full = full(state, batches)
  state_split, metrics_split = split(state, batches)
  for key in ('loss', 'loss/a', 'loss/b', 'grad_norm',
              'supervised_tokens/a'):
    np.testing.assert_allclose(metrics_split[key], metrics_full[key],
                               rtol=1e-6, err_msg=key)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6,
                                                       atol=1e-7),
               _params(state_split), _params(state_full))


def test_microbatches_must_divide_the_batch():
  split, state = _toy_model_step({'a': 1.0}, microbatches=3)
  with pytest.raises(ValueError, match='3 micro-batches.*batch size 4'):
    split(state, {'a': _toy_batch(0)})


def test_split_microbatches_is_strided():
  parts = train_step_lib.split_microbatches({'x': jnp.arange(6)}, 2)
  np.testing.assert_array_equal(parts['x'], [[0, 2, 4], [1, 3, 5]])


def test_round_robin_schedule_counts_steps():
  config = optim.default_optim_config()
  config.warmup_steps = 4
  optimizer = optim.make_optimizer(config, updates_per_step=2)
  params = {'w': jnp.ones([])}
  opt_state = optimizer.init(params)
  learning_rates = []
  for _ in range(6):  # 3 steps of 2 updates: lr(0), lr(0), lr(1), ...
    before = params['w']
    updates, opt_state = optimizer.update({'w': jnp.ones([])}, opt_state,
                                          params)
    params = optax.apply_updates(params, updates)
    learning_rates.append(float(before - params['w']))
  # Adam's first steps move by ~lr (weight decay aside: no mask match).
  np.testing.assert_allclose(learning_rates[0::2], learning_rates[1::2],
                             rtol=1e-3)
  np.testing.assert_allclose(learning_rates[0::2],
                             [0.0, 0.25e-4, 0.5e-4], rtol=1e-2, atol=1e-9)
