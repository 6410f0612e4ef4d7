"""Meshes, parameter rules, sharded init and a sharded forward pass.

On the 8 fake CPU devices of tests/conftest.py.
"""

import logging
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from experiments import flamingo as flamingo_config
from experiments import tiny
from flamingo_jax import bench_inputs
from flamingo_jax.models import flamingo
from flamingo_jax.models import stacking
from flamingo_jax.training import loop
from flamingo_jax.training import memory
from flamingo_jax.training import optim
from flamingo_jax.training import sharding
from tests import training as training_tests

TINY = flamingo.model_config('tiny')
RULES = sharding.FLAMINGO_PARAM_RULES
MESHES = {
    'data': [('data', -1), ('fsdp', 1), ('model', 1)],
    'mixed': [('data', 2), ('fsdp', 2), ('model', 2)],
    'model': [('data', -1), ('fsdp', 1), ('model', 8)],
}
MESH_SHAPES = {'data': (8, 1, 1), 'mixed': (2, 2, 2), 'model': (1, 1, 8)}
B, L, N = 8, 8, 2  # B: divisible by the 8 devices of the 'data' mesh.


@pytest.fixture(scope='module')
def meshes():
  return {name: sharding.make_mesh(config) for name, config in MESHES.items()}


@pytest.fixture(scope='module')
def abstract():
  return flamingo.abstract_params(TINY)


@pytest.mark.parametrize('name', sorted(MESHES))
def test_make_mesh(meshes, name):
  mesh = meshes[name]
  assert mesh.axis_names == ('data', 'fsdp', 'model')
  assert tuple(mesh.shape.values()) == MESH_SHAPES[name]
  assert set(mesh.axis_types) == {jax.sharding.AxisType.Auto}


@pytest.mark.parametrize('config,message', [
    ([('data', 3), ('model', 2)], 'jax.device_count.. is 8'),
    ([('data', -1), ('model', 3)], 'not divisible'),
    ([('data', -1), ('model', -1)], 'at most one -1'),
    ([('data', 4), ('data', 2)], 'unique'),
])
def test_bad_mesh_raises(config, message):
  with pytest.raises(ValueError, match=message):
    sharding.make_mesh(config)


EXPECTED_SPECS = {
    'mixed': {
        'lm/blocks/block/ffw/hidden/w': P(None, 'fsdp', 'model'),
        'lm/blocks/block/ffw/output/w': P(None, 'model', 'fsdp'),
        'lm/blocks/block/self_attention/query/w': P(None, 'fsdp', 'model'),
        'lm/blocks/block/self_attention/output/w': P(None, 'model', 'fsdp'),
        'lm/blocks/block/self_attention/content_bias': P(None, 'model', None),
        'lm/embed/embeddings': P('model', 'fsdp'),
        'lm/unembed/w': P('fsdp', 'model'),
        'lm/eoc_embedding': P(),
        'gated_xattn/block/cross_attention/key/w': P(None, 'fsdp', 'model'),
        'gated_xattn/block/attn_gate': P(),
        'gated_xattn/block/ffw_norm/scale': P(),
        'perceiver_resampler/layer_0/attention/value/w': P('fsdp', 'model'),
        'perceiver_resampler/layer_1/ffw/output/w': P('model', 'fsdp'),
        'perceiver_resampler/latents': P(),
        'vision_encoder/stem_conv0/w': P(),
    },
    'model': {
        'lm/blocks/block/ffw/hidden/w': P(None, 'fsdp', 'model'),
        # 4 heads over 8 devices: that dimension falls back to replicated.
        'lm/blocks/block/self_attention/content_bias': P(None, None, None),
        'lm/embed/embeddings': P('model', 'fsdp'),
    },
}


@pytest.mark.parametrize('mesh_name', sorted(EXPECTED_SPECS))
def test_param_specs(meshes, abstract, mesh_name):
  specs = sharding.param_specs(abstract, RULES, meshes[mesh_name])
  flat = {f'{m}/{n}': s for m, leaves in specs.items()
          for n, s in leaves.items()}
  for path, expected in EXPECTED_SPECS[mesh_name].items():
    assert flat[path] == expected, path


def test_default_rules_cover_every_parameter(meshes, abstract, caplog):
  with caplog.at_level(logging.WARNING):
    sharding.param_specs(abstract, RULES, meshes['mixed'])
  assert 'No sharding rule' not in caplog.text


@pytest.mark.parametrize('family', ['llama', 'gpt_neox', 'mpt', 'gpt2'])
def test_default_rules_cover_the_published_lm_layouts(meshes, family,
                                                       caplog):
  from flamingo_jax.models import lm_layout  # pylint: disable=g-import-not-at-top
  config = dict(TINY, lm=lm_layout.family_config(
      family, **dict(TINY['lm'], num_kv_heads=2 if family == 'llama' else None)))
  with caplog.at_level(logging.WARNING):
    specs = sharding.param_specs(flamingo.abstract_params(config), RULES,
                                 meshes['mixed'])
  assert 'No sharding rule' not in caplog.text
  if family == 'llama':
    assert specs['lm/blocks/block/ffw/gate']['w'] == P(None, 'fsdp', 'model')


def test_unmatched_params_are_replicated_with_a_warning(meshes, abstract,
                                                        caplog):
  rules = [rule for rule in RULES if not rule[0].startswith('vision')]
  with caplog.at_level(logging.WARNING):
    specs = sharding.param_specs(abstract, rules, meshes['mixed'])
  assert 'vision_encoder/stem_conv0/w' in caplog.text
  assert specs['vision_encoder/stem_conv0']['w'] == P()


def test_spec_longer_than_array_raises(meshes, abstract):
  rules = [('lm/eoc_embedding', (None, 'model'))] + list(RULES)
  with pytest.raises(ValueError, match='lm/eoc_embedding'):
    sharding.param_specs(abstract, rules, meshes['mixed'])


def test_missing_mesh_axes_are_dropped():
  mesh = sharding.make_mesh([('data', -1), ('model', 2)])
  spec, notes = sharding.fit_spec((None, 'fsdp', 'model'), (4, 64, 64),
                                  mesh.shape)
  assert spec == P(None, None, 'model') and not notes


def test_optimizer_state_follows_params(meshes, abstract):
  mesh = meshes['mixed']
  trainable_sh, _ = optim.partition(
      sharding.param_shardings(abstract, RULES, mesh),
      optim.FLAMINGO_FREEZE_RULES)
  trainable, _ = optim.partition(abstract, optim.FLAMINGO_FREEZE_RULES)
  tx = optim.make_optimizer(optim.default_optim_config())
  state = jax.eval_shape(tx.init, trainable)
  path = ('gated_xattn/block', 'w')

  for zero_axis, expected in ((None, P(None, 'fsdp', 'model')),
                              ('data', P('data', 'fsdp', 'model'))):
    state_sh = sharding.optimizer_state_shardings(state, trainable_sh,
                                                  zero_axis=zero_axis)
    adam = state_sh[1][0]  # chain(clip, adamw(scale_by_adam, ...)).
    assert isinstance(adam, optax.ScaleByAdamState)
    for moments in (adam.mu, adam.nu):
      assert moments['gated_xattn/block/ffw/hidden'][path[1]].spec == expected
    assert adam.count.spec == P()


def test_batch_sharding(meshes):
  assert sharding.batch_sharding(meshes['mixed']).spec == P(('data', 'fsdp'))


@pytest.mark.parametrize('name, size', [('data', 8), ('mixed', 4),
                                        ('model', 1)])
def test_data_parallel_size(meshes, name, size):
  assert sharding.data_parallel_size(meshes[name]) == size


def test_constrain_is_a_no_op_without_mesh():
  x = jnp.ones([4, 8])
  assert sharding.constrain(x, ('data', 'model')) is x


def test_constrain_under_mesh(meshes):
  mesh = meshes['mixed']
  with jax.set_mesh(mesh):
    # Dim 1 (3) is not divisible by 'model' (2): replicated instead.
    y = jax.jit(lambda x: sharding.constrain(x * 2, ('data', 'model')))(
        jnp.ones([4, 3]))
  assert y.sharding.is_equivalent_to(NamedSharding(mesh, P('data')), 2)


# Sharded init and forward pass.


def _inputs():
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, TINY['lm']['vocab_size'], [B, L]).astype(np.int32)
  size = TINY['image_size']
  media = rng.integers(0, 256, [B, N, 1, size, size, 3]).astype(np.uint8)
  media_index = np.tile(np.minimum(np.arange(L) // 3 + 1, N), (B, 1))
  return tokens, media, np.ones([B, N], bool), media_index.astype(np.int32)


@pytest.fixture(scope='module')
def sharded_init(meshes):
  """Parameters created sharded on the (2, 2, 2) mesh, and their shardings."""
  model = flamingo.transform(TINY)
  key, inputs = jax.random.PRNGKey(0), _inputs()
  shardings = sharding.param_shardings(
      jax.eval_shape(model.init, key, *inputs), RULES, meshes['mixed'])
  params = jax.jit(model.init, out_shardings=shardings)(key, *inputs)
  return params, shardings


def test_state_created_already_sharded(sharded_init):
  params, shardings = sharded_init
  leaves = jax.tree.leaves(params)
  for leaf, expected in zip(leaves, jax.tree.leaves(shardings)):
    assert leaf.sharding == expected
  split = params['lm/blocks/block/ffw/hidden']['w']
  assert split.addressable_shards[0].data.shape == (4, 32, 128)


@pytest.fixture(scope='module')
def forward_inputs(abstract):
  """Parameters with open gates (so the media matter) and unsharded logits."""
  params = training_tests.random_params(abstract)
  model = flamingo.transform(TINY)
  expected = jax.jit(model.apply)(params, None, *_inputs())
  return model, params, np.asarray(expected)


@pytest.mark.parametrize('mesh_name', sorted(MESHES))
def test_sharded_forward_matches_unsharded(meshes, abstract, forward_inputs,
                                           mesh_name):
  model, params, expected = forward_inputs
  mesh = meshes[mesh_name]
  param_sh = sharding.param_shardings(abstract, RULES, mesh)
  batch_sh = sharding.batch_sharding(mesh)
  params = jax.device_put(params, param_sh)
  with jax.set_mesh(mesh):
    forward = jax.jit(model.apply,
                      in_shardings=(param_sh, None) + (batch_sh,) * 4)
    logits = forward(params, None, *_inputs())
  np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)


# ZeRO-3 / FSDP.


def test_fsdp_forward_keeps_the_batch_split(abstract):
  """Under a pure-FSDP mesh the weights are gathered, not the batch.

  Without `stacking.constrain_batch`, XLA split the activations over 'fsdp'
  like the weights' input dimension and all-reduced [B, L, 4D] partial
  products: every device computed the whole batch.
  """
  batch, length = 16, 12  # Distinct from every other dimension.
  rng = np.random.default_rng(1)
  size = TINY['image_size']
  inputs = (
      rng.integers(0, TINY['lm']['vocab_size'], [batch, length]).astype(
          np.int32),
      rng.integers(0, 256, [batch, N, 1, size, size, 3]).astype(np.uint8),
      np.ones([batch, N], bool),
      np.tile(np.minimum(np.arange(length) // 4 + 1, N),
              (batch, 1)).astype(np.int32))
  params = training_tests.random_params(abstract)
  model = flamingo.transform(TINY)
  expected = jax.jit(model.apply)(params, None, *inputs)
  mesh = sharding.make_mesh([('data', 1), ('fsdp', 8), ('model', 1)])
  param_sh = sharding.param_shardings(abstract, RULES, mesh)
  with jax.set_mesh(mesh):
    forward = jax.jit(model.apply, in_shardings=(param_sh, None) + (
        sharding.batch_sharding(mesh),) * 4)
    compiled = forward.lower(params, None, *inputs).compile()
    logits = compiled(jax.device_put(params, param_sh), None, *inputs)
  np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
  reduced = re.findall(r'= \w+\[([\d,]*)\]\S* all-reduce\(', compiled.as_text())
  assert not [s for s in reduced if s.split(',')[0] == str(batch)], reduced
  assert 'all-gather(' in compiled.as_text()  # The weights, instead.


def test_3b_state_per_device_drops_with_fsdp():
  """Full-size shapes only (eval_shape): ZeRO-3 divides the weights too."""
  config = flamingo_config.get_config('3B')
  state = memory.StateModel(config)
  per_device = {}
  for mesh in ((8, 1, 1), (1, 8, 1)):
    shardings = state.shardings(mesh)
    per_device[mesh] = {
        part: memory.shard_bytes(getattr(state.abstract, part),
                                 getattr(shardings, part))
        for part in ('trainable', 'frozen', 'opt_state')}
  data, fsdp = per_device[(8, 1, 1)], per_device[(1, 8, 1)]
  vision = sum(x.size * x.dtype.itemsize for module, leaves in
               state.abstract.frozen.items() if module.startswith('vision')
               for x in leaves.values())  # Replicated on purpose.
  assert fsdp['trainable'] < data['trainable'] / 7.5  # 5.0 -> 0.63 GiB.
  assert fsdp['frozen'] - vision < (data['frozen'] - vision) / 7.5
  # Adam moments: ZeRO-1 already split them over 'data'; 'fsdp' does too.
  assert fsdp['opt_state'] == pytest.approx(data['opt_state'], rel=0.02)
  assert sum(fsdp.values()) < sum(data.values()) / 3  # 9.8 -> 3.0 GiB.


def test_multislice_mesh_puts_data_across_slices():
  devices = [types.SimpleNamespace(id=i, slice_index=i // 8, platform='cpu',
                                   device_kind='cpu') for i in range(16)]
  grid = sharding.device_grid(('data', 'fsdp', 'model'), (4, 2, 2), devices)
  slice_of = np.vectorize(lambda d: d.slice_index)(grid)
  assert grid.shape == (4, 2, 2)
  # Each slice is a contiguous half of 'data'; fsdp and model stay inside.
  assert (slice_of[:2] == 0).all() and (slice_of[2:] == 1).all()
  with pytest.raises(ValueError, match='multiple of 2'):
    sharding.device_grid(('data', 'fsdp', 'model'), (1, 8, 2), devices)


def test_batch_axes_agree_with_the_models():
  assert stacking.BATCH_AXES == sharding.BATCH_AXES


def test_zero1_splits_moments_of_matrices_the_rules_name_fully(meshes,
                                                               abstract):
  """A [D_in, D_out] kernel with spec ('fsdp', 'model') on a mesh where both
  are 1 still gets its moments split over 'data' (ZeRO-1)."""
  mesh = meshes['data']  # (8, 1, 1).
  trainable_sh, _ = optim.partition(
      sharding.param_shardings(abstract, RULES, mesh),
      optim.FLAMINGO_FREEZE_RULES)
  trainable, _ = optim.partition(abstract, optim.FLAMINGO_FREEZE_RULES)
  tx = optim.make_optimizer(optim.default_optim_config())
  state_sh = sharding.optimizer_state_shardings(
      jax.eval_shape(tx.init, trainable), trainable_sh, zero_axis='data')
  adam = state_sh[1][0]
  kernel = 'perceiver_resampler/layer_0/attention/query'
  assert trainable_sh[kernel]['w'].spec == P('fsdp', 'model')
  assert adam.mu[kernel]['w'].spec == P('data', 'model')


def test_batch_checks_name_the_data_parallel_size(meshes):
  config = tiny.get_config('smoke')
  config.data.datasets.pairs.batch_size = 6  # Not a multiple of 4.
  with pytest.raises(bench_inputs.BenchFlagError, match='the 4 data-parallel'):
    bench_inputs.check_batches(config, meshes['mixed'])
  with pytest.raises(ValueError, match='the 4 data-parallel'):
    loop._check_batch_sizes(config, meshes['mixed'])  # pylint: disable=protected-access
