"""A checkpoint written a part of the state at a time (the weight converter's).

The layout is `checkpoint.Checkpointer.save`'s, so every reader in
`checkpoint.py` restores it as any other step.
"""

from collections.abc import Iterable, Mapping
import ctypes
import gc
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from flamingo_jax import checkpoint_integrity as integrity
from flamingo_jax import fs

PyTree = Any


def save_in_parts(directory: str, step: int, parts: Iterable[PyTree],
                  data: Mapping[str, Any]) -> None:
  """Writes step `step` under `directory` as `Checkpointer.save` lays it
  out, from disjoint parts of the state (numpy arrays), each written before
  the next is made.

  For a state too big to hold whole in host memory (the converter's: a
  model): orbax's partial saves (`orbax.checkpoint.experimental.v1.partial`)
  merge the parts into one `state` item, which the readers here restore as
  any other; each part's checksums are taken in host memory, slice by slice
  (`integrity.integrity(..., in_slices=True)`), before it goes to orbax as
  device arrays; `data` and `checksums` are orbax JSON items as
  `Checkpointer.save` writes them. A part with a non-finite value stops the
  save (NonFiniteStateError); the caller removes what was written.
  """
  from orbax.checkpoint.experimental.v1 import partial  # pylint: disable=g-import-not-at-top
  step_dir = fs.join(fs.absolute(directory), str(step))
  digests = {}
  for part in parts:
    sums, nonfinite = integrity.integrity(part, in_slices=True)
    if nonfinite:
      raise integrity.NonFiniteStateError(
          f'Refusing to save step {step}: {len(nonfinite)} arrays hold NaN '
          f'or inf (e.g. {", ".join(nonfinite[:3])}).')
    digests.update(sums)
    _to_device_in_place(part)
    gc.collect()  # device_put leaves the host arrays in reference cycles.
    partial.save(step_dir, part)
    del part  # Before the next part is made.
    _return_freed_memory()
  partial.finalize(step_dir)
  writer = ocp.Checkpointer(ocp.JsonCheckpointHandler())
  sums = {'state': digests, 'data': integrity.data_digest(data)}
  for item, value in (('data', dict(data)), ('checksums', sums)):
    writer.save(fs.join(step_dir, item), args=ocp.args.JsonSave(value))
  writer.close()


def _to_device_in_place(tree: dict[str, Any]) -> None:
  """Replaces a nested dict's numpy arrays by device arrays, one by one.

  Orbax copies numpy leaves more than once, so it is given device arrays;
  replacing each in the dict itself (not in a new tree) drops the host
  array (once garbage-collected) while the caller still holds the dict (a
  suspended generator), so orbax's write of the part finds it there once.
  """
  for key, value in tree.items():
    if isinstance(value, dict):
      _to_device_in_place(value)
    elif np.ndim(value):
      tree[key] = jax.device_put(value).block_until_ready()


def _return_freed_memory() -> None:
  """Gives the heap's free pages back to the system (glibc only).

  Orbax's writers free many small buffers per save; left in malloc's
  arenas they add about one part's size to every later peak.
  """
  try:
    ctypes.CDLL('libc.so.6').malloc_trim(0)
  except (OSError, AttributeError):  # Not glibc: nothing to do.
    pass
