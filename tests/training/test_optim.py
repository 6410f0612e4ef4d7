"""Freeze rules, weight-decay mask, schedule, and one step of the optimizer."""

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from ml_collections import config_flags

from experiments import flamingo as flamingo_config
from flamingo_jax import summarize
from flamingo_jax.models import flamingo
from flamingo_jax.models import precision
from flamingo_jax.training import optim
from tests import training as training_tests

TINY = flamingo.model_config('tiny')
RULES = optim.FLAMINGO_FREEZE_RULES
TRAINABLE_TOPS = ('perceiver_resampler/', 'gated_xattn/', 'lm/eoc_embedding',
                  'lm/eoc_unembedding')


@pytest.fixture(scope='module')
def abstract():
  return flamingo.abstract_params(TINY)


def _paths(params) -> set[str]:
  return set(summarize.flat_shapes(params))


@pytest.mark.parametrize('ablation', ['', 'grafting', 'resampler_mlp',
                                      'vision_clip_vit_l14'])
def test_default_rules_freeze_lm_and_vision(ablation):
  config = flamingo_config.get_config(f'tiny,{ablation}'.rstrip(','))
  params = flamingo.abstract_params(config.model)
  trainable, frozen = optim.partition(params, RULES)
  assert _paths(trainable) | _paths(frozen) == _paths(params)
  assert all(p.startswith(TRAINABLE_TOPS) for p in _paths(trainable))
  assert all(p.startswith(('lm/', 'vision_encoder/')) for p in _paths(frozen))
  assert {'lm/eoc_embedding', 'lm/eoc_unembedding'} <= _paths(trainable)


def test_merge_inverts_partition(abstract):
  trainable, frozen = optim.partition(abstract, RULES)
  merged = optim.merge(trainable, frozen)
  assert jax.tree.structure(merged) == jax.tree.structure(abstract)


def test_uncovered_parameter_is_named(abstract):
  rules = [rule for rule in RULES if not rule[0].startswith('vision')]
  with pytest.raises(ValueError, match='vision_encoder/stem_conv0/w'):
    optim.partition(abstract, rules)


def test_rules_match_whole_paths(abstract):
  # 'lm' alone matches no path; a fullmatch needs 'lm/.*'.
  rules = [('lm', 'frozen'), ('.*', 'train')]
  trainable, frozen = optim.partition(abstract, rules)
  assert not frozen
  assert _paths(trainable) == _paths(abstract)


def test_unknown_label_raises(abstract):
  with pytest.raises(ValueError, match="'fozen'"):
    optim.partition(abstract, [('.*', 'fozen')])


def test_weight_decay_mask(abstract):
  trainable, _ = optim.partition(abstract, RULES)
  mask = optim.weight_decay_mask(trainable, optim.WEIGHT_DECAY_RULES)
  flat = {f'{m}/{n}': v for m, leaves in mask.items()
          for n, v in leaves.items()}
  resampler = [v for p, v in flat.items() if p.startswith('perceiver_')]
  assert resampler and not any(resampler)
  assert flat['gated_xattn/block/ffw/hidden/w']
  assert flat['gated_xattn/block/cross_attention/key/w']
  for path in ('gated_xattn/block/attn_gate', 'gated_xattn/block/ffw_gate',
               'gated_xattn/block/ffw_norm/scale', 'lm/eoc_embedding'):
    assert not flat[path], path


@pytest.mark.parametrize('schedule,expected', [
    ('constant', {0: 0.0, 2500: 5e-5, 5000: 1e-4, 10000: 1e-4}),
    ('cosine', {0: 0.0, 2500: 5e-5, 5000: 1e-4, 10000: 5e-5, 15000: 0.0}),
    ('rsqrt', {0: 0.0, 2500: 5e-5, 5000: 1e-4, 20000: 5e-5}),
])
def test_learning_rate_schedule(schedule, expected):
  config = optim.default_optim_config()
  config.schedule = schedule
  config.decay_steps = 10000
  lr = optim.learning_rate_fn(config)
  for step, value in expected.items():
    np.testing.assert_allclose(lr(step), value, rtol=1e-6, atol=1e-12,
                               err_msg=f'{schedule} at step {step}')


def test_lr_multipliers_scale_the_update_of_what_they_match():
  """lm_cotrain_text's 0.1 on the LM (arXiv v1 §4.4.3): the LM's update is a
  tenth of what it would be; other parameters are unchanged."""
  params = {'lm/blocks': {'w': jnp.full([3], 2.0)},
            'lm/eoc': {'w': jnp.full([3], 2.0)},
            'gated_xattn': {'w': jnp.full([3], 2.0)}}
  grads = jax.tree.map(lambda x: jnp.asarray([1.0, -2.0, 0.5]), params)
  config = optim.default_optim_config()
  config.warmup_steps = 0

  def first_update(multipliers):
    config.lr_multipliers = multipliers
    optimizer = optim.make_optimizer(config)
    updates, _ = optimizer.update(grads, optimizer.init(params), params)
    return updates

  plain = first_update([])
  scaled = first_update([('lm/eoc/.*', 1.0), ('lm/.*', 0.1)])
  np.testing.assert_allclose(scaled['lm/blocks']['w'],
                             0.1 * plain['lm/blocks']['w'], rtol=1e-6)
  for module in ('lm/eoc', 'gated_xattn'):
    np.testing.assert_array_equal(scaled[module]['w'], plain[module]['w'])
  assert np.abs(plain['lm/blocks']['w']).min() > 0
  with pytest.raises(ValueError, match='lr_multipliers'):
    first_update([('lm/.*', 'slow')])


def test_lr_multipliers_can_be_set_from_the_command_line():
  """ml_collections overrides tuples but not lists from the command line."""
  argv = ['train', '--config=experiments/tiny.py:smoke',
          "--config.optim.lr_multipliers=(('.*/ffw_gate', 0.0),)"]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', flag_values=values, sys_argv=argv)
  values(argv)
  assert values.config.optim.lr_multipliers == (('.*/ffw_gate', 0.0),)


def test_paper_defaults():
  config = optim.default_optim_config()
  assert (config.b1, config.b2, config.eps) == (0.9, 0.999, 1e-8)
  assert (config.weight_decay, config.clip_norm) == (0.1, 1.0)
  assert (config.learning_rate, config.warmup_steps) == (1e-4, 5000)


def test_frozen_params_have_no_optimizer_state(abstract):
  trainable, _ = optim.partition(abstract, RULES)
  tx = optim.make_optimizer(optim.default_optim_config())
  state = jax.eval_shape(tx.init, trainable)
  leaves = jax.tree_util.tree_leaves_with_path(state)
  moments = [jax.tree_util.keystr(p) for p, leaf in leaves
             if jnp.issubdtype(leaf.dtype, jnp.floating)]
  num_trainable = len(jax.tree.leaves(trainable))
  assert len(moments) == 2 * num_trainable  # Adam's mu and nu.
  assert not [p for p in moments if 'lm/blocks' in p or 'vision' in p]


# One training step, in mixed precision as the train step runs it.

B, L, NUM_MEDIA = 2, 8, 2


def _batch():
  rng = np.random.default_rng(0)
  vocab = TINY['lm']['vocab_size']
  tokens = rng.integers(0, vocab, [B, L]).astype(np.int32)
  tokens[:, -2] = vocab  # <EOC>, so its input embedding gets a gradient.
  size = TINY['image_size']
  media = rng.integers(0, 256, [B, NUM_MEDIA, 1, size, size, 3], np.uint8)
  media_index = np.tile(np.minimum(np.arange(L) // 3 + 1, NUM_MEDIA), (B, 1))
  return dict(tokens=tokens, targets=np.roll(tokens, -1, axis=1),
              media=media, media_mask=np.ones([B, NUM_MEDIA], bool),
              media_index=media_index.astype(np.int32))


@pytest.fixture(scope='module')
def one_step(abstract):
  batch = _batch()
  model = flamingo.transform(TINY)
  inputs = (batch['tokens'], batch['media'], batch['media_mask'],
            batch['media_index'])
  params = training_tests.random_params(abstract)
  trainable, frozen = optim.partition(params, RULES)
  frozen = precision.cast_frozen(frozen)
  config = optim.default_optim_config()
  config.warmup_steps = 0  # Else the first step's learning rate is 0.
  tx = optim.make_optimizer(config)
  bf16_model = precision.with_compute_dtype(model, jnp.bfloat16)

  def loss_fn(trainable, frozen):
    all_params = precision.compute_params(trainable, frozen, jnp.bfloat16)
    logits = bf16_model.apply(all_params, None, *inputs).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, batch['targets']).mean()

  @jax.jit
  def step(trainable, frozen, opt_state):
    grads = jax.grad(loss_fn)(trainable, frozen)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    new = optax.apply_updates(trainable, updates)
    return optim.merge(new, frozen), opt_state, grads

  opt_state = tx.init(trainable)
  new_params, new_state, grads = step(trainable, frozen, opt_state)
  return dict(trainable=trainable, frozen=frozen, new=new_params,
              state=new_state, grads=grads)


def test_step_changes_only_trainable_params(one_step):
  new = one_step['new']
  for module, leaves in one_step['frozen'].items():
    for name, old in leaves.items():
      assert new[module][name].dtype == jnp.bfloat16
      np.testing.assert_array_equal(new[module][name], old,
                                    err_msg=f'{module}/{name}')
  for module, leaves in one_step['trainable'].items():
    for name, old in leaves.items():
      assert new[module][name].dtype == jnp.float32
      assert not np.array_equal(new[module][name], old), f'{module}/{name}'


def test_gradients_and_moments_are_float32(one_step):
  dtypes = {leaf.dtype for leaf in jax.tree.leaves(one_step['grads'])}
  assert dtypes == {jnp.dtype(jnp.float32)}
  moments = [leaf for leaf in jax.tree.leaves(one_step['state'])
             if jnp.issubdtype(leaf.dtype, jnp.floating)]
  assert {m.dtype for m in moments} == {jnp.dtype(jnp.float32)}
