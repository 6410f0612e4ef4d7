"""Running a per-example function with each batch device on its own rows.

Why (NFNet, nfnet.py): XLA's SPMD partitioner does not split a grouped
convolution (`feature_group_count > 1`) over a batch-sharded input; it
all-gathers the input and runs the conv on the whole batch on every device.
NFNet-F6 has 154 of them: at 320 px, 40 images over 8 devices cost 4.21
TFLOP per device instead of 1.15. So when a mesh is set (`jax.set_mesh`)
whose batch axes (BATCH_AXES) span more than one device, the grouped convs
run under `jax.shard_map` over those axes, each device on its own rows, with
the standardised kernel passed in replicated (other mesh axes stay
automatic); values and gradients are those of the plain conv. Without a
mesh, or with a batch that the batch devices do not divide (logged once per
trace), the plain conv runs. Everything else, stochastic depth included,
is outside the shard_maps, so it is the same program with or without them.
"""

from collections.abc import Callable
import math

from absl import logging
import jax

from flamingo_jax.models.layers import BATCH_AXES


def batch_parallel_axes() -> tuple[str, ...]:
  """The BATCH_AXES of the current mesh that split a batch, if any.

  Axes of size 1, and axes already manual (inside a `shard_map`), are left
  out; () without a mesh.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return ()
  return tuple(a for a in BATCH_AXES
               if a in mesh.shape and mesh.shape[a] > 1
               and a not in mesh.manual_axes)


def _batch_devices(axes: tuple[str, ...]) -> int:
  mesh = jax.sharding.get_abstract_mesh()
  return math.prod(mesh.shape[a] for a in axes)


def split_over_batch(fn: Callable[..., jax.Array], x: jax.Array,
                     *replicated: jax.Array) -> jax.Array:
  """`fn(x, *replicated)`, each batch device on its own rows of `x`.

  Under `jax.shard_map` over `batch_parallel_axes()` when they span more
  than one device and divide x's leading (batch) dimension; otherwise a
  plain call. `fn` must treat the rows of `x` independently. Other mesh axes
  stay automatic.
  """
  axes = batch_parallel_axes()
  if not axes or x.shape[0] % _batch_devices(axes):
    return fn(x, *replicated)
  batch = jax.sharding.PartitionSpec(axes)
  replicated_specs = (jax.sharding.PartitionSpec(),) * len(replicated)
  # The gradient of a replicated input comes out summed over the devices.
  return jax.shard_map(fn, in_specs=(batch, *replicated_specs),
                       out_specs=batch, axis_names=set(axes))(x, *replicated)


def log_unsplit_batch(batch: int, what: str) -> None:
  """Says (once per trace) why `what`'s batch of `batch` is not split."""
  axes = batch_parallel_axes()
  if axes and batch % _batch_devices(axes):
    logging.info(
        '%s: the batch of %d images is not divisible by the %d devices of '
        'the batch axes %s, so every device runs the grouped convolutions on '
        'all of them.', what, batch, _batch_devices(axes), axes)
