"""Sharding as data: a device mesh and regex rules from the config.

  config.mesh = [('data', -1), ('fsdp', 1), ('model', k)]   # -1: the rest
  config.param_rules = [(regex, spec), ...]                 # first match wins

A spec is a PartitionSpec written as a tuple, one entry per array dimension:
None, a mesh axis name, or a tuple of axis names. Patterns match whole
parameter paths (`re.fullmatch`, see `flamingo_jax.training`). Resolution is
forgiving so that one rule set serves every mesh and model size:

  * a parameter no rule matches is replicated (one warning lists them all);
  * axes the mesh does not have are dropped;
  * a dimension not divisible by the product of its axes' sizes is
    replicated instead (one log line lists them), so the tiny model runs on
    any mesh.

FLAMINGO_PARAM_RULES is Megatron-style tensor parallelism over 'model' for
the LM, the cross-attention layers and the resampler -- query/key/value and
feed-forward `hidden` kernels split by output columns, attention `output` and
feed-forward `output` kernels by input rows, the embedding and unembedding by
vocabulary -- with the other dimension of each big matrix sharded over
'fsdp' (FSDP/ZeRO-3: XLA all-gathers them where used). Stacked layers have a
leading layer axis, so their specs start with None. The frozen vision
encoder (0.9 GB in bf16 for NFNet-F6) is replicated, as are the small norms,
gates, biases, `<EOC>` rows, latents and time embeddings. Batches are split
over ('data', 'fsdp'), BATCH_AXES; the NFNet reads the same axes to run its
grouped convolutions per device under `jax.shard_map` (`models/nfnet.py`).

Optimizer state follows the parameters (`optimizer_state_shardings`): each
Adam moment gets its parameter's sharding; with `zero_axis='data'` moments
are additionally split over the data axis (ZeRO-1); XLA inserts the
collectives between the moments' and the parameters' layouts.

ZeRO-3 / FSDP is the 'fsdp' axis: each of the rules above puts 'fsdp' on the
largest dimension of its matrix that 'model' does not split, so with 'fsdp'
> 1 the trained and the frozen weights, their gradients and their Adam
moments are all split over it, and XLA gathers one layer group's weights at
a time inside the scanned stacks. That takes activations that stay split
over the batch: `models/stacking.py` constrains every layer's input to
BATCH_AXES (left alone, XLA met such weights by splitting the activations
the same way and all-reducing the products, every device then holding the
whole batch). `python -m flamingo_jax.plan` picks the size of 'fsdp': the
least that makes the step fit the chip (`training/mesh_choice.py`). The
vision encoder stays replicated: 0.9 GB in bf16, and its convolutions would
pose XLA the same choice with no layer input to constrain.

On several TPU slices (multislice), 'data' spans the slices and the other
axes stay inside one (`device_grid`).
"""

from collections.abc import Mapping, Sequence
import math
from typing import Any, Optional

from absl import logging
import jax
from jax.experimental import mesh_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from flamingo_jax import training
from flamingo_jax.models import layers

AxisEntry = Optional[str | tuple[str, ...]]  # One dimension of a spec.
Spec = Sequence[AxisEntry]
MeshConfig = Sequence[tuple[str, int]]

DEFAULT_MESH = (('data', -1), ('fsdp', 1), ('model', 1))
# config.auto_mesh: enabled, the loop replaces `mesh` at startup by the one
# the memory planner chooses for the devices it has (mesh_choice.py:
# the config's model degree, the least FSDP that fits); hbm_gib: memory per
# device to plan for (0: what the runtime reports; the CPU reports none).
AUTO_MESH = {'enabled': False, 'hbm_gib': 0.0}
# Mesh axes the batch dimension is split over: ('data', 'fsdp'), defined with
# the model layers that keep activations split over them.
BATCH_AXES = layers.BATCH_AXES

_STACKED = r'(lm/blocks|gated_xattn)/block'  # Leading [num_layers] axis.
_QKV = r'(query|key|value|relative_key)'
FLAMINGO_PARAM_RULES = (
    # LM and cross-attention layers (stacked): [N, D_in, D_out].
    (rf'{_STACKED}/(self|cross)_attention/{_QKV}/w', (None, 'fsdp', 'model')),
    (rf'{_STACKED}/(self|cross)_attention/output/w', (None, 'model', 'fsdp')),
    (rf'{_STACKED}/self_attention/(content|position)_bias',
     (None, 'model', None)),  # [N, H, K]: heads, as the query columns.
    (rf'{_STACKED}/ffw/(hidden|gate)/w', (None, 'fsdp', 'model')),
    (rf'{_STACKED}/ffw/output/w', (None, 'model', 'fsdp')),
    # Embeddings split over the vocabulary.
    (r'lm/embed/embeddings', ('model', 'fsdp')),  # [V, D]
    (r'lm/unembed/w', ('fsdp', 'model')),  # [D, V]
    # Perceiver Resampler (unstacked layers): [D_in, D_out].
    (rf'perceiver_resampler/.*/{_QKV}/w', ('fsdp', 'model')),
    (r'perceiver_resampler/.*/attention/output/w', ('model', 'fsdp')),
    (r'perceiver_resampler/.*/ffw/hidden/w', ('fsdp', 'model')),
    (r'perceiver_resampler/.*/ffw/output/w', ('model', 'fsdp')),
    # Not ('fsdp', 'model'): with the ffw/output rule and the batch over
    # ('data', 'fsdp') that miscompiles in XLA on meshes like (2, 2, 2)
    # (tests/training/test_sharded_training.py has the reproduction).
    (r'perceiver_resampler/input_projection/w', ('fsdp', None)),
    # Small or frozen-and-cheap: replicated.
    (r'vision_encoder/.*', ()),
    (r'.*_norm/(scale|offset)', ()),
    (r'.*_gate', ()),
    (r'.*/(b|bias)', ()),
    (r'lm/eoc_(un)?embedding', ()),
    (r'lm/position_embed/embeddings', ()),  # GPT-2's learned positions.
    (r'perceiver_resampler/(latents|time_embeddings)', ()),
)


def mesh_shape(mesh_config: MeshConfig,
               num_devices: int) -> tuple[tuple[str, ...], tuple[int, ...]]:
  """(axis names, sizes) with the one -1 size resolved to the rest.

  Raises:
    ValueError: if the sizes cannot multiply to `num_devices`.
  """
  names = tuple(name for name, _ in mesh_config)
  sizes = [int(size) for _, size in mesh_config]
  if len(set(names)) != len(names):
    raise ValueError(f'Mesh axis names must be unique; got {names}.')
  rest = [i for i, size in enumerate(sizes) if size == -1]
  if len(rest) > 1 or any(size == 0 or size < -1 for size in sizes):
    raise ValueError('Mesh sizes must be positive, with at most one -1 (the '
                     f'remaining devices); got {list(mesh_config)}.')
  fixed = math.prod(size for size in sizes if size != -1)
  if rest:
    if num_devices % fixed:
      raise ValueError(
          f'Mesh {list(mesh_config)}: {num_devices} devices are not '
          f'divisible by the fixed axes\' product {fixed}.')
    sizes[rest[0]] = num_devices // fixed
  if math.prod(sizes) != num_devices:
    raise ValueError(
        f'Mesh {list(mesh_config)} has {math.prod(sizes)} devices but '
        f'jax.device_count() is {num_devices}.')
  return names, tuple(sizes)


def make_mesh(mesh_config: MeshConfig = DEFAULT_MESH,
              devices: Optional[Sequence[jax.Device]] = None
              ) -> jax.sharding.Mesh:
  """A mesh over all devices (or `devices`) with Auto axis types.

  Auto, not the default Explicit: Haiku layers contract over sharded
  dimensions, which Explicit axes reject; under Auto, XLA propagates the
  parameter and batch shardings through the model. Devices of several TPU
  slices (multislice) get a hybrid mesh: see `device_grid`.
  """
  devices = list(devices if devices is not None else jax.devices())
  names, sizes = mesh_shape(mesh_config, len(devices))
  axis_types = (jax.sharding.AxisType.Auto,) * len(names)
  if len({getattr(d, 'slice_index', 0) for d in devices}) == 1:
    return jax.make_mesh(sizes, names, axis_types=axis_types,
                         devices=devices)
  return jax.sharding.Mesh(device_grid(names, sizes, devices), names,
                           axis_types=axis_types)


def device_grid(names: Sequence[str], sizes: Sequence[int],
                devices: Sequence[Any]) -> Any:
  """Devices of several slices arranged as a mesh of `sizes`.

  Slices talk over the data-centre network (DCN), far slower than the
  links inside a slice (ICI), so only the data-parallel axis (the first of
  BATCH_AXES, 'data') spans them: each gradient crosses DCN once per step,
  while FSDP gathers and model-parallel collectives stay inside a slice.

  Returns:
    An np.ndarray of `devices` of shape `sizes`.

  Raises:
    ValueError: if the mesh has no 'data' axis, or its size is not a
      multiple of the number of slices.
  """
  num_slices = len({d.slice_index for d in devices})
  if 'data' not in names or sizes[names.index('data')] % num_slices:
    raise ValueError(
        f'Mesh {dict(zip(names, sizes))} on {num_slices} slices: the '
        f"'data' axis spans the slices, so its size must be a multiple of "
        f'{num_slices}.')
  data = names.index('data')
  within = [size // num_slices if i == data else size
            for i, size in enumerate(sizes)]
  across = [num_slices if i == data else 1 for i in range(len(sizes))]
  return mesh_utils.create_hybrid_device_mesh(within, across, devices)


def _axes(entry: AxisEntry) -> tuple[str, ...]:
  if entry is None:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


def fit_spec(spec: Spec, shape: Sequence[int],
             axis_sizes: Mapping[str, int]) -> tuple[P, list[str]]:
  """`spec` made valid for an array of `shape` on a mesh of `axis_sizes`.

  Drops axes the mesh lacks and replicates dimensions that their axes do not
  divide.

  Returns:
    The PartitionSpec and a note per replicated dimension.

  Raises:
    ValueError: if `spec` has more entries than `shape` has dimensions.
  """
  if len(spec) > len(shape):
    raise ValueError(f'Spec {tuple(spec)} has {len(spec)} entries for an '
                     f'array of shape {tuple(shape)}.')
  entries, notes = [], []
  for dim, entry in enumerate(spec):
    axes = tuple(a for a in _axes(entry) if a in axis_sizes)
    size = math.prod(axis_sizes[a] for a in axes)
    if shape[dim] % size:
      notes.append(f'dim {dim} ({shape[dim]}) over {axes} ({size})')
      axes = ()
    entries.append(_entry(axes))
  return P(*entries), notes


def _entry(axes: tuple[str, ...]) -> AxisEntry:
  """The PartitionSpec entry for a dimension split over `axes`."""
  if not axes:
    return None
  return axes[0] if len(axes) == 1 else axes


def param_specs(abstract_params: Any, rules: training.Rules,
                mesh: jax.sharding.Mesh) -> Any:
  """A tree of PartitionSpecs for `abstract_params` (anything with .shape)."""
  rules = [(pattern, tuple(spec)) for pattern, spec in rules]
  unmatched, replicated_dims = [], []

  def spec_of(path, leaf):
    name = training.path_str(path)
    index = training.match_rule(name, rules)
    if index is None:
      unmatched.append(name)
      return P()
    try:
      spec, notes = fit_spec(rules[index][1], leaf.shape, mesh.shape)
    except ValueError as e:
      raise ValueError(f'Sharding rule {rules[index]} does not fit parameter '
                       f'{name!r}: {e}') from e
    replicated_dims.extend(f'{name} {note}' for note in notes)
    return spec

  specs = jax.tree_util.tree_map_with_path(spec_of, abstract_params)
  if unmatched:
    logging.warning('No sharding rule for %d parameter(s), replicated: %s',
                    len(unmatched), sorted(unmatched))
  if replicated_dims:
    logging.info('Mesh %s does not divide, replicated instead: %s',
                 dict(mesh.shape), '; '.join(replicated_dims))
  return specs


def param_shardings(abstract_params: Any, rules: training.Rules,
                    mesh: jax.sharding.Mesh) -> Any:
  """A tree of NamedShardings for `abstract_params`, by `rules`.

  E.g. `jax.jit(init, out_shardings=param_shardings(jax.eval_shape(init,
  ...), config.param_rules, mesh))` creates the parameters already sharded.
  """
  specs = param_specs(abstract_params, rules, mesh)
  return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs,
                      is_leaf=lambda x: isinstance(x, P))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Every device holds the whole array."""
  return NamedSharding(mesh, P())


def _add_axis(spec: P, shape: Sequence[int], axis: str,
              mesh: jax.sharding.Mesh) -> P:
  """`spec` also split over `axis`, where the array allows.

  On the largest dimension that is not split yet (its axes, if any, all of
  size 1 on this mesh) and that `axis` divides; failing that, on the
  largest split one whose split `axis` further divides. Unchanged if the
  mesh lacks `axis` or already splits over it.
  """
  entries = list(spec) + [None] * (len(shape) - len(spec))
  if axis not in mesh.shape or any(axis in _axes(e) for e in entries):
    return spec
  size = lambda axes: math.prod(mesh.shape[a] for a in axes)
  free = [d for d, e in enumerate(entries)
          if size(_axes(e)) == 1 and shape[d] % mesh.shape[axis] == 0]
  if free:
    dim = max(free, key=lambda d: shape[d])
    entries[dim] = axis
    return P(*entries)
  split = [d for d, e in enumerate(entries)
           if shape[d] % (size(_axes(e)) * mesh.shape[axis]) == 0]
  if not split:
    return spec
  dim = max(split, key=lambda d: shape[d] // size(_axes(entries[d])))
  entries[dim] = _entry(_axes(entries[dim]) + (axis,))
  return P(*entries)


def optimizer_state_shardings(opt_state_abstract: Any,
                              shardings: Any,
                              zero_axis: Optional[str] = None) -> Any:
  """Shardings for an optimizer state whose moments follow their params.

  Every subtree of the state shaped like the parameter tree (Adam's mu, nu)
  takes `shardings`; everything else (step counts) is replicated.

  Args:
    opt_state_abstract: `jax.eval_shape(optimizer.init, trainable)`.
    shardings: NamedShardings of the same (trainable) parameters,
      e.g. the trainable part of `optim.partition(param_shardings(...))`.
    zero_axis: if set (e.g. 'data'), moments are also split over this axis
      (ZeRO-1) on their largest dimension that is free and divisible.

  Returns:
    A tree of NamedShardings like `opt_state_abstract`.
  """
  leaves = jax.tree.leaves(shardings)
  if not leaves:
    raise ValueError('optimizer_state_shardings needs at least one parameter '
                     'sharding.')
  mesh = leaves[0].mesh
  params_def = jax.tree.structure(shardings)

  def is_params(node):
    return jax.tree.structure(node) == params_def

  def moment_sharding(sharding, leaf):
    spec = sharding.spec
    if len(spec) > leaf.ndim:  # Not a copy of its parameter after all.
      return replicated(mesh)
    if zero_axis is not None:
      spec = _add_axis(spec, leaf.shape, zero_axis, mesh)
    return NamedSharding(mesh, spec)

  def shard(node):
    if is_params(node):
      return jax.tree.map(moment_sharding, shardings, node)
    return replicated(mesh)

  return jax.tree.map(shard, opt_state_abstract, is_leaf=is_params)


def batch_axes(mesh: jax.sharding.Mesh) -> tuple[str, ...]:
  """The BATCH_AXES that `mesh` has, in order."""
  return tuple(a for a in BATCH_AXES if a in mesh.shape)


def data_parallel_size(mesh: jax.sharding.Mesh) -> int:
  """How many ways `mesh` splits a batch: the product of its batch axes."""
  return math.prod(mesh.shape[a] for a in batch_axes(mesh))


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Leading (batch) dimension over ('data', 'fsdp'), the rest replicated."""
  return NamedSharding(mesh, P(batch_axes(mesh)))


def constrain(x: jax.Array, spec: Spec) -> jax.Array:
  """`with_sharding_constraint(x, spec)` under the current mesh, if any.

  A no-op when no mesh is set (`jax.set_mesh`), so models call it freely;
  the spec is fitted to `x` as the parameter rules are (see `fit_spec`).
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  spec, _ = fit_spec(tuple(spec), x.shape, dict(mesh.shape))
  return jax.lax.with_sharding_constraint(x, spec)
