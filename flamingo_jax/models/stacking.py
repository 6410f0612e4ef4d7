"""Stacks of identical Haiku layers, scanned, and interleaving of two stacks.

Flamingo interleaves its new GATED XATTN-DENSE layers between the blocks of a
frozen LM. Both kinds of layer are identical within their kind, so each is kept
as one `Stack`: a Haiku layer whose parameters are created once per copy and
stacked on a leading axis (through `hk.lift`, as `hk.layer_stack` does). The
LM's stack keeps the shape `[num_layers, ...]` whatever the cross-attention
placement, so a pretrained LM loads the same way into every ablation, and
`interleave` scans groups of layers so that compile time does not grow with
depth.

Under a mesh (`jax.set_mesh`), every layer's input stays split over the
batch axes (`constrain_batch`): with weights split over 'fsdp' on their
input dimension (FSDP), XLA would otherwise be free to split the
activations the same way instead and all-reduce the products -- every
device then computes and stores the whole batch.

Each stack has its own rematerialisation policy (`REMAT_POLICIES`: what a
scanned layer keeps for the backward pass): 'none' keeps everything, 'full'
keeps only the layer's input and recomputes its forward pass during the
backward one, and 'dots' keeps the outputs of the matmuls without batch
dimensions (the projections and feed-forward layers) and recomputes the rest:
norms, activations and attention (whose score matrices, [B, H, L, S] per
layer, are the largest activations and the cheapest to recompute).

Glossary of shapes:
  B: batch size.
  L: sequence length.
  D: width of the residual stream.
  N: number of layers in a stack.
"""

from collections.abc import Callable, Sequence
import functools
import math
from typing import Any, Optional

import haiku as hk
import jax

from flamingo_jax.models.layers import BATCH_AXES

Params = Any  # A Haiku parameter tree, every leaf with a leading [N] axis.

# Rematerialisation (activation checkpointing) of each scanned layer; see
# the module docstring. None (old configs) means 'none'.
REMAT_POLICIES = {
    'none': None,
    'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    'full': jax.checkpoint_policies.nothing_saveable,
}


def remat_policy(name: Optional[str]) -> Optional[Callable[..., bool]]:
  """The `jax.checkpoint` policy called `name` (None: no remat).

  Raises:
    ValueError: for a name not in REMAT_POLICIES.
  """
  if name is None:
    return None
  if name not in REMAT_POLICIES:
    raise ValueError(f'Unknown remat_policy {name!r}; expected one of '
                     f'{sorted(REMAT_POLICIES)}.')
  return REMAT_POLICIES[name]


def constrain_batch(h: jax.Array) -> jax.Array:  # [B, ...] -> [B, ...]
  """`h` with its batch dimension kept split over the mesh's BATCH_AXES.

  Its other dimensions are left to XLA. A no-op without a mesh, inside a
  `shard_map` over those axes, or when they do not divide B.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return h
  axes = tuple(a for a in BATCH_AXES
               if mesh.shape.get(a, 1) > 1 and a not in mesh.manual_axes)
  if not axes or h.shape[0] % math.prod(mesh.shape[a] for a in axes):
    return h
  rest = (jax.sharding.PartitionSpec.UNCONSTRAINED,) * (h.ndim - 1)
  return jax.lax.with_sharding_constraint(
      h, jax.sharding.PartitionSpec(axes, *rest))


def tree_slice(params: Params, start: int, stop: int) -> Params:
  return jax.tree.map(lambda x: x[start:stop], params)


def _tree_group(params: Params, num_groups: int) -> Params:
  """[N*G, ...] -> [N, G, ...] on every leaf."""
  return jax.tree.map(
      lambda x: x.reshape(num_groups, x.shape[0] // num_groups, *x.shape[1:]),
      params)


class Stack:
  """`num_layers` copies of one Haiku layer with stacked parameters.

  `make_layer()` must build a fresh module (or function) mapping
  `(h, *args) -> h`; its parameter paths are prefixed with `name`. Call
  `params(...)` inside a Haiku transform: at init it creates the stacked
  parameters, at apply it fetches them.

  For generation, a layer also takes per-layer keyword inputs (its cache) and
  then returns `(h, per-layer output)`; see `scan(..., per_layer=...)`.
  """

  def __init__(self, make_layer: Callable[[], Callable[..., jax.Array]],
               num_layers: int, name: str,
               remat_policy: Optional[Callable[..., bool]] = None):
    self._layer = hk.transform(
        lambda *args, **kwargs: make_layer()(*args, **kwargs))
    self.num_layers = num_layers
    self.name = name
    self._remat_policy = remat_policy

  def params(self, *example_inputs: Any) -> Params:
    """The stacked parameters: created at init from example inputs
    `(h, *args)` of one layer; fetched at apply (inputs not needed)."""
    keys = None
    if hk.running_init():
      if not example_inputs:
        raise ValueError(f'Creating the parameters of {self.name!r} needs '
                         'example inputs of one layer.')
      keys = hk.next_rng_keys(self.num_layers)
    num_args = max(len(example_inputs) - 1, 0)
    init = jax.vmap(self._layer.init, in_axes=(0, None) + (None,) * num_args)
    return hk.lift(init, name=self.name)(keys, *example_inputs)

  def apply_one(self, params: Params, h: jax.Array, *args: Any,
                **kwargs: Any) -> Any:
    """Applies one copy (parameters without the stack axis), remat'd by the
    stack's policy."""
    # Callables (a layer run inside this one) are bound here, not traced.
    apply = functools.partial(self._layer.apply, **{
        k: v for k, v in kwargs.items() if callable(v)})
    kwargs = {k: v for k, v in kwargs.items() if not callable(v)}
    if self._remat_policy is not None:
      apply = jax.checkpoint(apply, policy=self._remat_policy)
    return apply(params, None, constrain_batch(h), *args, **kwargs)

  def scan(self, params: Params, h: jax.Array, *args: Any,
           per_layer: Optional[dict[str, Any]] = None) -> Any:
    """Applies the copies in `params` ([n, ...], any n >= 0) in order.

    `args` go to every copy. With `per_layer` (keyword inputs with a leading
    [n] axis, e.g. caches), copy i gets slice i of each and returns
    `(h, out_i)`; this returns `(h, outs)`, the outs stacked [n, ...].
    """
    if per_layer is None:
      if jax.tree.leaves(params)[0].shape[0] == 0:
        return h
      h, _ = jax.lax.scan(self._scan_body(args), h, params)  # [B, L, D]
      return h
    body = self._scan_body(args, with_outputs=True)
    return jax.lax.scan(body, h, (params, per_layer))  # [B, L, D], [n, ...]

  def _scan_body(self, args, with_outputs=False):
    def body(h, xs):
      if with_outputs:
        layer_params, kwargs = xs
        return self.apply_one(layer_params, h, *args, **kwargs)
      return self.apply_one(xs, h, *args), None
    return body


def _segments(num_main: int, positions: Sequence[int]):
  """(first main layer, lengths of the groups after each insertion)."""
  starts = list(positions) + [num_main]
  return positions[0], [b - a for a, b in zip(starts[:-1], starts[1:])]


def interleave(
    h: jax.Array,  # [B, L, D]
    *,
    main: Stack,
    main_params: Params,  # [num_main, ...]
    main_args: Sequence[Any],
    inserted: Stack,
    inserted_params: Params,  # [len(positions), ...]
    inserted_args: Sequence[Any],
    positions: Sequence[int],
    main_per_layer: Optional[dict[str, Any]] = None,  # [num_main, ...]
    inserted_per_layer: Optional[dict[str, Any]] = None,  # [len(positions), ...]
    inside: bool = False,
) -> Any:  # [B, L, D], or (h, main outs, inserted outs)
  """Runs `main`, with inserted layer j placed before main layer positions[j].

  With `inside`, inserted layer j runs inside main layer positions[j]
  instead: the main layer takes it as its `between` keyword (see
  `lm.DecoderBlock`) and returns its outputs last.

  Consecutive groups (one inserted layer, then the main layers up to the next
  insertion) of equal length are scanned together; a regular placement such as
  every 7th of 80 layers therefore compiles as one scan of 11 groups of 7 and
  one group of 3.

  With `main_per_layer` / `inserted_per_layer` (generation: per-layer caches,
  see `Stack.scan`), every layer returns `(h, out)` and this returns
  `(h, main_outs, inserted_outs)`, each stacked in layer order.
  """
  if list(positions) != sorted(set(positions)) or not positions:
    raise ValueError(f'Insertion positions must be sorted, unique and '
                     f'non-empty; got {positions}.')
  num_main = main.num_layers
  if positions[-1] >= num_main or positions[0] < 0:
    raise ValueError(f'Insertion positions {positions} out of range for '
                     f'{num_main} layers.')
  stateful = main_per_layer is not None or inserted_per_layer is not None
  main_xs = (main_params, main_per_layer or {})
  inserted_xs = (inserted_params, inserted_per_layer or {})
  first, lengths = _segments(num_main, positions)

  def run_main(h, xs):
    if stateful:
      return main.scan(xs[0], h, *main_args, per_layer=xs[1])
    return main.scan(xs[0], h, *main_args), None

  def group(h, xs):
    (ins_params, ins_kwargs), layer_xs = xs
    if inside:
      return inside_group(h, ins_params, ins_kwargs, layer_xs)
    if stateful:
      h, ins_out = inserted.apply_one(ins_params, h, *inserted_args,
                                      **ins_kwargs)  # [B, L, D]
    else:
      h, ins_out = inserted.apply_one(ins_params, h, *inserted_args), None
    h, main_out = run_main(h, layer_xs)  # [B, L, D]
    return h, (ins_out, main_out)

  def inside_group(h, ins_params, ins_kwargs, layer_xs):
    """Main layer 0 of the group with the inserted layer in it, then the
    rest of the group."""
    between = lambda y: inserted.apply_one(ins_params, y, *inserted_args,
                                           **ins_kwargs)
    first_params, first_kwargs = jax.tree.map(lambda x: x[0], layer_xs)
    out = main.apply_one(first_params, h, *main_args, between=between,
                         **first_kwargs)
    if stateful:
      h, first_out, ins_out = out  # [B, L, D], main layer 0's, inserted's
    else:
      h, first_out, ins_out = out, None, None
    h, rest_out = run_main(h, tree_slice(layer_xs, 1, None))  # [B, L, D]
    main_out = None
    if stateful:
      main_out = _tree_concat([jax.tree.map(lambda x: x[None], first_out),
                               rest_out])
    return h, (ins_out, main_out)

  h, out = run_main(h, tree_slice(main_xs, 0, first))  # [B, L, D]
  main_outs, inserted_outs = [out], []
  group_index, layer_index = 0, first
  while group_index < len(lengths):
    length = lengths[group_index]
    run = 1
    while (group_index + run < len(lengths)
           and lengths[group_index + run] == length):
      run += 1
    ins = tree_slice(inserted_xs, group_index, group_index + run)
    layers = _tree_group(
        tree_slice(main_xs, layer_index, layer_index + run * length), run)
    h, (ins_out, main_out) = jax.lax.scan(group, h, (ins, layers))  # [B, L, D]
    inserted_outs.append(ins_out)
    main_outs.append(_tree_ungroup(main_out))
    group_index += run
    layer_index += run * length
  if not stateful:
    return h
  return h, _tree_concat(main_outs), _tree_concat(inserted_outs)


def _tree_ungroup(tree: Any) -> Any:
  """[G, n, ...] -> [G*n, ...] on every leaf."""
  return jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), tree)


def _tree_concat(trees: Sequence[Any]) -> Any:
  """Leaf-wise concatenation along the layer axis."""
  return jax.tree.map(lambda *xs: jax.numpy.concatenate(xs), *trees)
