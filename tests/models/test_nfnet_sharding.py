"""The NFNet's grouped convolutions are split over the batch devices.

XLA all-gathers a batch-sharded input of a grouped convolution and runs the
conv on the whole batch on every device; `batch_split.split_over_batch` runs those
convs under `jax.shard_map` instead (see the module docstring). On the 8 fake
CPU devices of tests/conftest.py, with the 'tiny' variant (8 grouped convs):
the compiled forward has no all-gather of activations and its per-device
FLOPs are the one-device FLOPs over the batch devices; values and gradients
equal the unsharded ones.
"""

import functools
import logging
import re

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flamingo_jax.models import batch_split
from flamingo_jax.models import nfnet
from flamingo_jax.training import sharding
from tests import training as training_tests

MESHES = {
    'data': [('data', -1), ('fsdp', 1), ('model', 1)],  # 8 batch devices.
    'mixed': [('data', 2), ('fsdp', 2), ('model', 2)],  # 4 batch devices.
}
BATCH, SIZE = 8, 64  # One image per device on the 'data' mesh.
# conv1 and conv1b of each block wider than one group (stage 0 is not).
NUM_GROUPED_CONVS = 2 * sum(
    spec.output_channels * nfnet.EXPANSION
    > nfnet.NFNET_PARAMS['tiny']['group_width']
    for spec in nfnet.block_schedule('tiny', 0.0))
# Ops that move activations between devices.
_COLLECTIVE = re.compile(
    r'= (\S+) (all-gather|all-to-all|collective-permute|all-reduce)'
    r'(-start)?\(')


def _model(is_training: bool) -> hk.Transformed:
  def forward(images):
    return nfnet.NFNet('tiny', name='vision_encoder')(
        images, is_training=is_training)['tokens']  # [B, S, C]
  return hk.transform(forward)


def _images(batch=BATCH):
  return jax.random.normal(jax.random.key(1), (batch, SIZE, SIZE, 3))


@functools.cache
def _abstract_params():
  images = jax.ShapeDtypeStruct((BATCH, SIZE, SIZE, 3), jnp.float32)
  return jax.eval_shape(_model(False).init, jax.random.key(0), images)


@pytest.fixture(scope='module')
def params():
  """Random parameters with open skip gains, so every block matters."""
  return training_tests.random_params(_abstract_params())


def _mesh(name):
  return sharding.make_mesh(MESHES[name])


@functools.cache
def _compiled_forward(mesh_name, split=True):
  """The compiled frozen forward, on `mesh_name` (None: one device).

  With `split=False` the grouped convs run as plain convs (BATCH_AXES
  emptied while tracing): what XLA does with them on its own.
  """
  apply = _model(False).apply
  images = jax.ShapeDtypeStruct((BATCH, SIZE, SIZE, 3), jnp.float32)
  abstract = _abstract_params()
  if mesh_name is None:
    return jax.jit(lambda p, x: apply(p, None, x)).lower(
        abstract, images).compile()
  mesh = _mesh(mesh_name)
  batch_axes = batch_split.BATCH_AXES if split else ()
  with jax.set_mesh(mesh), pytest.MonkeyPatch.context() as patch:
    patch.setattr(batch_split, 'BATCH_AXES', batch_axes)
    jitted = jax.jit(lambda p, x: apply(p, None, x),
                     in_shardings=(sharding.replicated(mesh),
                                   sharding.batch_sharding(mesh)),
                     out_shardings=sharding.batch_sharding(mesh))
    return jitted.lower(abstract, images).compile()


def _activation_collectives(compiled):
  """Collectives on arrays with the batch as leading dimension."""
  shapes = [m.group(1) for m in _COLLECTIVE.finditer(compiled.as_text())]
  return [s for s in shapes if re.match(rf'\w+\[{BATCH},', s)]


def _flops(compiled):
  return compiled.cost_analysis()['flops']


def test_frozen_forward_moves_no_activations_and_splits_its_flops():
  split = _compiled_forward('data')
  assert not _activation_collectives(split)
  one_device = _flops(_compiled_forward(None))
  # The one-device FLOPs over 8, plus the kernel standardisation that each
  # device does for itself (~5% here).
  assert _flops(split) < 1.1 * one_device / 8
  # Control: left to XLA, the grouped convs' inputs are all-gathered (one
  # all-gather per conv today) and the per-device FLOPs are 1.7x the split.
  plain = _compiled_forward('data', split=False)
  assert len(_activation_collectives(plain)) >= NUM_GROUPED_CONVS // 2
  assert _flops(plain) > 1.5 * one_device / 8


def test_mixed_mesh_splits_over_data_and_fsdp():
  compiled = _compiled_forward('mixed')
  assert not _activation_collectives(compiled)
  # 4 batch devices; the 'model' pairs compute the same rows.
  assert _flops(compiled) < 1.1 * _flops(_compiled_forward(None)) / 4


@pytest.mark.parametrize('mesh_name', sorted(MESHES))
def test_sharded_forward_equals_unsharded(params, mesh_name):
  expected = _compiled_forward(None)(params, _images())
  mesh = _mesh(mesh_name)
  params = jax.device_put(params, sharding.replicated(mesh))
  images = jax.device_put(_images(), sharding.batch_sharding(mesh))
  tokens = _compiled_forward(mesh_name)(params, images)
  np.testing.assert_allclose(tokens, expected, rtol=1e-5, atol=1e-5)


# Gradients, on one strided NFBlock (two grouped convs, a projection
# shortcut, squeeze-excite and stochastic depth): the shard_maps are per
# conv, and one block compiles in a fraction of the whole encoder's time.
_BLOCK_INPUT = (BATCH, 16, 16, 16)  # [B, Hs, Ws, Cin]


def _block(images, is_training=True):
  block = nfnet.NFBlock(32, stride=2, group_width=8, stochastic_depth_rate=0.5,
                        name='block')
  return block(images, is_training=is_training)  # [B, Hs/2, Ws/2, 32]


def _block_inputs():
  """(params, images, rng, weights of the scalar) for the block's gradients."""
  block = hk.transform(_block)
  images = jax.random.normal(jax.random.key(4), _BLOCK_INPUT)
  abstract = jax.eval_shape(block.init, jax.random.key(0), images)
  assert abstract['block/conv1']['w'].shape[2] == 8  # 2 groups of 8.
  weights = jax.random.normal(jax.random.key(3), (BATCH, 8, 8, 32))
  return (training_tests.random_params(abstract), images,
          jax.random.key(2, impl='rbg'), weights)


def _loss_and_grads(params, images, rng, weights):
  """A scalar of the trained block and its gradients (params, images)."""
  def loss(params, images):
    out = hk.transform(_block).apply(params, rng, images)  # [B, 8, 8, 32]
    return jnp.sum(out * weights)
  return jax.value_and_grad(loss, argnums=(0, 1))(params, images)


@pytest.fixture(scope='module')
def one_device_grads():
  return jax.jit(_loss_and_grads)(*_block_inputs())


@pytest.mark.parametrize('mesh_name', sorted(MESHES))
def test_trainable_block_gradients_equal_unsharded(one_device_grads,
                                                   mesh_name):
  """The contrastive stage and `vision_unfrozen` train through the convs."""
  inputs = _block_inputs()
  mesh = _mesh(mesh_name)
  with jax.set_mesh(mesh):
    batch = sharding.batch_sharding(mesh)
    jitted = jax.jit(_loss_and_grads, in_shardings=(
        sharding.replicated(mesh), batch, None, batch))
    compiled = jitted.lower(*inputs).compile()
    jaxpr = str(jax.make_jaxpr(_loss_and_grads)(*inputs))
  assert jaxpr.count('shard_map[') == 2 * 2  # conv1, conv1b; and transposed.
  # The backward too: only parameter gradients are summed over devices.
  assert not _activation_collectives(compiled)
  loss, grads = compiled(*inputs)
  expected_loss, expected_grads = one_device_grads
  np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
  # Gradients of the parameters, then of the images.
  for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(grads),
                               jax.tree.leaves(expected_grads)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5,
                               err_msg=jax.tree_util.keystr(path))


def _shard_maps(fn, *args) -> int:
  return str(jax.make_jaxpr(fn)(*args)).count('shard_map[')


def _tiny_forward(images):
  params = training_tests.random_params(_abstract_params())
  return _model(False).apply(params, None, images)


def test_plain_convs_without_mesh_or_batch_devices():
  images = _images()
  assert _shard_maps(_tiny_forward, images) == 0
  with jax.set_mesh(sharding.make_mesh([('data', 1), ('model', 8)])):
    assert _shard_maps(_tiny_forward, images) == 0
  with jax.set_mesh(_mesh('data')):
    assert _shard_maps(_tiny_forward, images) == NUM_GROUPED_CONVS


def test_indivisible_batch_runs_plain_convs_and_says_why(caplog):
  # On absl's logger: a CLI run in-process earlier may have set its verbosity.
  with (jax.set_mesh(_mesh('data')),
        caplog.at_level(logging.INFO, logger='absl')):
    assert _shard_maps(_tiny_forward, _images(batch=6)) == 0
  assert ('batch of 6 images is not divisible by the 8 devices of the batch '
          "axes ('data',)") in caplog.text


def test_inside_a_shard_map_over_the_batch_convs_are_plain():
  """Already manual batch axes are not split again."""
  mesh = _mesh('data')
  spec = jax.sharding.PartitionSpec('data')
  with jax.set_mesh(mesh):
    inner = jax.shard_map(_tiny_forward, in_specs=spec, out_specs=spec)
    assert _shard_maps(inner, _images()) == 1  # Only the outer one.
