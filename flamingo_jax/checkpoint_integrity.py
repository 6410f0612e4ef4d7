"""What makes a checkpoint step intact, and what is wrong when it is not.

A step is intact when its metadata files are there, every array reads back,
matches the digest saved with it and is finite. `checkpoint.py` saves the
digests and calls `read_guarded`, which turns whatever goes wrong into a
`CheckpointDamagedError` that says it in words (no tensorstore spec).

The digest of an array is sum_i w_i * (2i + 1) mod 2^32 over its 32-bit
words w_i (16- and 8-bit values widened): any one changed byte changes it,
it needs one pass over the array on its devices, and, being a sum, it does
not depend on how the array is sharded, so every process of a multi-host
run computes (and checks) the same value.

`integrity(tree)` gives every array's digest and the paths of those holding
a NaN or an inf, in one jitted pass (compiled once per tree structure);
`integrity(tree, in_slices=True)` gives the same values array by array, in
numpy, over slices of the leading axis (word i of a slice starting at flat
word index o weighs 2(o + i) + 1), so that its temporaries stay a few times
a slice and nothing is compiled: the converter's, whose tree is a whole
model in host memory.
"""

from collections.abc import Callable, Mapping, Sequence
import contextlib
import gc
import hashlib
import json
import logging as py_logging
import re
import sys
from typing import Any, Optional

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from flamingo_jax import fs

PyTree = Any
# The files a step's items must have (orbax's own, besides the arrays').
METADATA_FILES = ('state/_METADATA', 'data/metadata', 'checksums/metadata')


def _words(x: jax.Array) -> jax.Array:
  """The array's bits as uint32 words (8- and 16-bit values widened)."""
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  if x.dtype.itemsize < 4:
    unsigned = jnp.dtype(f'uint{8 * x.dtype.itemsize}')
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
  return jax.lax.bitcast_convert_type(x, jnp.uint32)  # 8 bytes: [..., 2].


def _digest(x: jax.Array) -> jax.Array:
  """[] uint32: sum_i w_i (2i + 1) mod 2^32 over the flat word index i."""
  words = _words(x)
  shape = words.shape
  index = jnp.zeros(shape, jnp.uint32)  # No reshape: keeps the sharding.
  stride = 1
  for axis in reversed(range(len(shape))):
    index += (jax.lax.broadcasted_iota(jnp.uint32, shape, axis)
              * jnp.uint32(stride % 2**32))
    stride *= shape[axis]
  return jnp.sum(words * (2 * index + 1), dtype=jnp.uint32)


def _finite(x: jax.Array) -> jax.Array:
  if jnp.issubdtype(x.dtype, jnp.inexact):
    return jnp.isfinite(x).all()
  return jnp.bool_(True)


@jax.jit
def _integrity(tree: PyTree) -> tuple[PyTree, PyTree]:
  return jax.tree.map(_digest, tree), jax.tree.map(_finite, tree)


# Bytes per slice of `integrity(..., in_slices=True)`.
SLICE_BYTES = 16 * 2**20


def _host_words(x: np.ndarray) -> np.ndarray:
  """`_words` in numpy: the same words, flattened."""
  if x.dtype == np.bool_:
    return x.astype(np.uint32).reshape(-1)
  if x.dtype.itemsize < 4:
    return x.view(f'uint{8 * x.dtype.itemsize}').astype(np.uint32).reshape(-1)
  return x.reshape(-1).view(np.uint32)  # 8 bytes: two words each, in order.


def _host_sums(x: np.ndarray, offset: int) -> tuple[int, bool]:
  """(the digest terms of words offset.., finite) of one slice, in numpy
  (uint32 arithmetic wraps mod 2^32 as the jitted digest's does)."""
  words = _host_words(np.ascontiguousarray(x))
  index = np.arange(words.size, dtype=np.uint32)
  index *= np.uint32(2)
  index += np.uint32((2 * offset + 1) % 2**32)
  index *= words
  finite = (not np.issubdtype(x.dtype, np.inexact)
            or bool(np.isfinite(x).all()))
  return int(index.sum(dtype=np.uint32)), finite


def _sliced(x: Any) -> tuple[int, bool]:
  """One host array's (digest, finite), slice by slice of its leading axis
  (no compilation; temporaries ~6x a slice)."""
  x = np.asarray(x)  # A CPU jax.Array's own memory.
  if x.ndim == 0:
    return _host_sums(x, 0)
  words_per_row = _host_words(x[:1]).size
  rows = max(1, SLICE_BYTES // max(1, x.nbytes // max(1, x.shape[0])))
  digest, finite = 0, True
  for start in range(0, x.shape[0], rows):
    part, ok = _host_sums(x[start:start + rows], start * words_per_row)
    digest, finite = digest + part, finite and ok
  return digest % 2**32, finite


def flat(tree: PyTree) -> dict[str, Any]:
  """{'trainable/lm/embed/embeddings': leaf, ...} ('/'-joined tree paths)."""
  return {jax.tree_util.keystr(path, simple=True, separator='/'): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _local(x: jax.Array) -> np.ndarray:
  """A replicated result's value (also where other processes hold parts)."""
  return np.asarray(x.addressable_data(0))


def integrity(tree: PyTree, *, in_slices: bool = False
              ) -> tuple[dict[str, str], list[str]]:
  """The digest of every array of `tree`, and the paths of those holding a
  NaN or an inf: ({path: 8 hex digits}, [path]).

  `in_slices`: array by array in slices, in numpy (see the module
  docstring), for arrays in host memory; the same values.
  """
  if in_slices:
    checked = {path: _sliced(x) for path, x in flat(tree).items()}
    return ({path: f'{d:08x}' for path, (d, _) in checked.items()},
            [path for path, (_, ok) in checked.items() if not ok])
  digests, finite = _integrity(tree)
  return ({path: f'{int(_local(d)):08x}' for path, d in flat(digests).items()},
          [path for path, ok in flat(finite).items() if not _local(ok)])


def data_digest(data: Mapping[str, Any]) -> str:
  text = json.dumps(dict(data), sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


# -- Damage ------------------------------------------------------------------


class CheckpointDamagedError(ValueError):
  """A saved step that cannot be read back as it was written (step None:
  no step of the directory can; `problem` then lists each one's)."""

  def __init__(self, directory: str, step: Optional[int], problem: str):
    self.step, self.problem = step, problem
    super().__init__(
        f'Checkpoint {directory}/{step} is damaged: {problem}.'
        if step is not None else
        f'No intact checkpoint in {directory}: {problem}.')


class NotATrainStateError(ValueError):
  pass


class Damage(Exception):
  """What is wrong with a step, in words (becomes CheckpointDamagedError)."""


class CheckpointMismatchError(ValueError):
  """A readable step whose arrays are not those the caller expects."""

  def __init__(self, directory: str, step: int,
               differences: Sequence[tuple[str, Any, Any]]):
    self.step, self.differences = step, list(differences)
    shown = '; '.join(f'{path}: {saved} in the checkpoint, {wanted} now'
                      for path, saved, wanted in self.differences[:5])
    more = len(self.differences) - 5
    super().__init__(
        f'Checkpoint {directory}/{step} does not fit this model: {shown}'
        + (f' (and {more} more)' if more > 0 else '') + '.')


class NonFiniteStateError(FloatingPointError):
  pass


def exists(path: str) -> bool:
  return fs.exists(path)


def describe(error: BaseException) -> str:
  """One line on why orbax/tensorstore could not read: the innermost cause,
  without the tensorstore spec it appends."""
  while error.__cause__ is not None or error.__context__ is not None:
    error = error.__cause__ or error.__context__
  text = str(error).split('\n')[0]
  text = re.split(r' \[tensorstore_spec|\. See full TensorStore', text)[0]
  read = re.search(r'Error reading "([^"]+?)/(\.z\w+|[\d.]+)" in OCDBT', text)
  if read:
    name = read.group(1).replace('.', '/')
    return (f'the array {name} cannot be read (a file under state/ is '
            f'truncated or damaged: {text.split(": ")[-1]})')
  missing = re.search(r'File (\S+) not found', text)
  if missing:
    return f'its file {missing.group(1)} is missing'
  if len(text) > 240:
    text = text[:240] + '...'
  return f'it cannot be read ({type(error).__name__}: {text})'


def check_files(step_dir: str) -> None:
  """Raises Damage naming a missing folder or metadata file of a step."""
  for item in ('state', 'data'):
    if not exists(fs.join(step_dir, item)):
      raise Damage(f'its {item}/ folder is missing')
  for name in METADATA_FILES:
    folder = fs.dirname(fs.join(step_dir, name))
    if exists(folder) and not exists(fs.join(step_dir, name)):
      raise Damage(f'its metadata file {name} is missing')


def verify(restored: PyTree, data: Optional[Mapping[str, Any]],
            checksums: Optional[Mapping[str, Any]]) -> None:
  """Raises Damage if `restored` (a subtree of the saved state, same paths)
  or `data` differ from the saved checksums (None: an older checkpoint
  without them), or hold a NaN or an inf."""
  digests, nonfinite = integrity(restored)
  if checksums is not None:
    saved = checksums.get('state', {})
    for path, digest in digests.items():
      if path not in saved:
        raise Damage(f'its checksums have no entry for {path}')
      if saved[path] != digest:
        raise Damage(f'the array {path} does not match its checksum '
                      '(flipped bytes?)')
    if data is not None and checksums.get('data') != data_digest(data):
      raise Damage('its data position does not match its checksum')
  if nonfinite:
    raise Damage(f'{len(nonfinite)} of its arrays hold NaN or inf (e.g. '
                  f'{nonfinite[0]})')


@contextlib.contextmanager
def muted():
  """Mutes orbax's INFO and WARNING chatter (e.g. about a damaged step,
  which our own messages name)."""
  absl_logger = logging.get_absl_logger()
  level = absl_logger.level
  absl_logger.setLevel(py_logging.ERROR)
  try:
    yield
  finally:
    absl_logger.setLevel(level)


class _FailedReadFilter(py_logging.Filter):
  """Drops asyncio's 'exception was never retrieved' records of failed
  tensorstore reads (orbax leaves the sibling reads of a failed one behind;
  our CheckpointDamagedError says what went wrong)."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    error = record.exc_info[1] if record.exc_info else None
    text = f'{record.getMessage()} {error}'
    return not _is_failed_read(text)


_FAILED_READS = _FailedReadFilter()


def _is_failed_read(text: str) -> bool:
  return 'tensorstore_spec' in text or 'TensorStore' in text


def _drop_failed_reads() -> None:
  """Keeps the reads orbax leaves behind when one fails from printing the
  tensorstore spec ('Exception ignored', 'Task exception was never
  retrieved'), now or when they are collected later: our
  CheckpointDamagedError says what went wrong."""
  asyncio_logger = py_logging.getLogger('asyncio')
  if _FAILED_READS not in asyncio_logger.filters:
    asyncio_logger.addFilter(_FAILED_READS)
  if not getattr(sys.unraisablehook, 'drops_failed_reads', False):
    previous = sys.unraisablehook

    def hook(unraisable):
      if not _is_failed_read(str(unraisable.exc_value)):
        previous(unraisable)

    hook.drops_failed_reads = True
    sys.unraisablehook = hook
  gc.collect()


def read_guarded(directory: str, step: int, read: Callable[[], Any]) -> Any:
  """`read()`, with whatever goes wrong as a CheckpointDamagedError."""
  try:
    return read()
  except (NotATrainStateError, CheckpointMismatchError):
    raise
  except Damage as e:
    raise CheckpointDamagedError(directory, step, str(e)) from None
  except Exception as e:  # pylint: disable=broad-except
    _drop_failed_reads()
    raise CheckpointDamagedError(directory, step, describe(e)) from None


def has_checksums(step_dir: str) -> bool:
  if exists(fs.join(step_dir, 'checksums')):
    return True
  logging.warning('Checkpoint %s has no checksums (saved by an older '
                  'version): its values are not verified.', step_dir)
  return False


def shape_differences(saved: PyTree, abstract: PyTree,
                      first: tuple[str, ...] = ()
                      ) -> list[tuple[str, Any, Any]]:
  """(path, saved shape, wanted shape) of the arrays that differ, those
  under the `first` prefixes first."""
  saved_flat = {p: tuple(x.shape) for p, x in flat(saved).items()}
  wanted_flat = {p: tuple(x.shape) for p, x in flat(abstract).items()}
  out = []
  paths = sorted(set(saved_flat) | set(wanted_flat),  # Parameters first.
                 key=lambda p: (not p.startswith(first), p))
  for path in paths:
    have, want = saved_flat.get(path), wanted_flat.get(path)
    if have != want:
      out.append((path, have if have is not None else 'absent',
                  want if want is not None else 'absent'))
  return out
