"""Stacks of identical Haiku layers, scanned, and interleaving of two stacks.

Flamingo interleaves its new GATED XATTN-DENSE layers between the blocks of a
frozen LM. Both kinds of layer are identical within their kind, so each is kept
as one `Stack`: a Haiku layer whose parameters are created once per copy and
stacked on a leading axis (through `hk.lift`, as `hk.layer_stack` does). The
LM's stack keeps the shape `[num_layers, ...]` whatever the cross-attention
placement, so a pretrained LM loads the same way into every ablation, and
`interleave` scans groups of layers so that compile time does not grow with
depth.

Glossary of shapes:
  B: batch size.
  L: sequence length.
  D: width of the residual stream.
  N: number of layers in a stack.
"""

from collections.abc import Callable, Sequence
from typing import Any, Optional

import haiku as hk
import jax

Params = Any  # A Haiku parameter tree, every leaf with a leading [N] axis.


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
  """

  def __init__(self, make_layer: Callable[[], Callable[..., jax.Array]],
               num_layers: int, name: str,
               remat_policy: Optional[Callable[..., bool]] = None):
    self._layer = hk.transform(lambda *args: make_layer()(*args))
    self.num_layers = num_layers
    self.name = name
    self._remat_policy = remat_policy

  def params(self, h: jax.Array, *args: Any) -> Params:
    init = jax.vmap(self._layer.init,
                    in_axes=(0, None) + (None,) * len(args))
    keys = hk.next_rng_keys(self.num_layers) if hk.running_init() else None
    return hk.lift(init, name=self.name)(keys, h, *args)

  def apply_one(self, params: Params, h: jax.Array, *args: Any) -> jax.Array:
    """Applies one copy (parameters without the stack axis)."""
    return self._layer.apply(params, None, h, *args)

  def scan(self, params: Params, h: jax.Array, *args: Any) -> jax.Array:
    """Applies the copies in `params` ([n, ...], any n >= 0) in order."""
    num = jax.tree.leaves(params)[0].shape[0]
    if num == 0:
      return h
    body = self._scan_body(args)
    h, _ = jax.lax.scan(body, h, params)  # [B, L, D]
    return h

  def _scan_body(self, args):
    def body(h, layer_params):
      return self.apply_one(layer_params, h, *args), None
    if self._remat_policy is not None:
      body = jax.checkpoint(body, policy=self._remat_policy)
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
) -> jax.Array:  # [B, L, D]
  """Runs `main`, with inserted layer j placed before main layer positions[j].

  Consecutive groups (one inserted layer, then the main layers up to the next
  insertion) of equal length are scanned together; a regular placement such as
  every 7th of 80 layers therefore compiles as one scan of 11 groups of 7 and
  one group of 3.
  """
  if list(positions) != sorted(set(positions)) or not positions:
    raise ValueError(f'Insertion positions must be sorted, unique and '
                     f'non-empty; got {positions}.')
  num_main = main.num_layers
  if positions[-1] >= num_main or positions[0] < 0:
    raise ValueError(f'Insertion positions {positions} out of range for '
                     f'{num_main} layers.')
  first, lengths = _segments(num_main, positions)
  h = main.scan(tree_slice(main_params, 0, first), h, *main_args)  # [B, L, D]

  def group(h, group_params):
    ins_params, layer_params = group_params
    h = inserted.apply_one(ins_params, h, *inserted_args)  # [B, L, D]
    return main.scan(layer_params, h, *main_args), None

  group_index, layer_index = 0, first
  while group_index < len(lengths):
    length = lengths[group_index]
    run = 1
    while (group_index + run < len(lengths)
           and lengths[group_index + run] == length):
      run += 1
    ins = tree_slice(inserted_params, group_index, group_index + run)
    layers = _tree_group(
        tree_slice(main_params, layer_index, layer_index + run * length), run)
    h, _ = jax.lax.scan(group, h, (ins, layers))  # [B, L, D]
    group_index += run
    layer_index += run * length
  return h
