"""A pickle reader that runs no code from the file.

A pickle is a program: its GLOBAL/STACK_GLOBAL opcodes import any callable
and REDUCE calls it, so `pickle.load` on a downloaded checkpoint can run
`os.system`. `RestrictedUnpickler` resolves every global through an allowlist
of our own harmless stand-ins (never through `importlib`), so a file that
names anything else stops with `RefusedGlobalError`, naming the global,
before anything is called.

The stand-ins rebuild data only: numpy arrays (not of object dtype), plain
containers, and, for PyTorch files, records of where each tensor's bytes lie
(`torch_file`). Haiku's old parameter containers (`FlatMapping`,
`frozendict`) become plain dicts.
"""

import collections
from collections.abc import Callable, Mapping
import pickle
from typing import Any, BinaryIO, Optional

import numpy as np


class RefusedGlobalError(pickle.UnpicklingError):
  """The pickle asked for a global outside the allowlist."""


# -- numpy ---------------------------------------------------------------------


class _ArrayBuilder:
  """Stands for `numpy.core.multiarray._reconstruct(ndarray, shape, dtype)`.

  The pickle then BUILDs it with ndarray's state tuple; we check that the
  dtype holds no Python objects before making the array.
  """

  def __init__(self, cls, shape, dtype):
    del shape, dtype  # The state carries the real ones.
    if cls is not np.ndarray:
      raise pickle.UnpicklingError(
          f'refusing to rebuild a numpy array of type {cls!r}.')
    self.array: Optional[np.ndarray] = None

  def __setstate__(self, state):
    _, shape, dtype, fortran, data = state
    dtype = _checked_dtype(dtype)
    if not isinstance(data, (bytes, bytearray)):
      raise pickle.UnpicklingError(
          f'numpy array data must be bytes; got {type(data).__name__}.')
    array = np.frombuffer(bytes(data), dtype=dtype)
    self.array = array.reshape(shape, order='F' if fortran else 'C').copy()


def _checked_dtype(dtype: Any) -> np.dtype:
  if not isinstance(dtype, np.dtype):
    raise pickle.UnpicklingError(f'not a numpy dtype: {dtype!r}.')
  if dtype.hasobject:
    raise pickle.UnpicklingError(
        f'refusing a numpy array of object dtype {dtype}: its items would be '
        'arbitrary Python objects.')
  return dtype


def _dtype(spec, align=False, copy=False):
  del copy
  if not isinstance(spec, str):
    raise pickle.UnpicklingError(f'unexpected numpy dtype spec {spec!r}.')
  return np.dtype(spec, align=bool(align))


def _scalar(dtype, data=b''):
  dtype = _checked_dtype(dtype)
  return np.frombuffer(bytes(data), dtype=dtype)[0]


def _frombuffer(buffer, dtype, shape, order):
  dtype = _checked_dtype(dtype)
  return np.frombuffer(bytes(buffer), dtype=dtype).reshape(
      shape, order=order).copy()


def _dill_create_array(builder, args, state, npdict=None):
  """dill's `_create_array(f, args, state, npdict)`: `f` is itself a global
  from this allowlist, so only `_ArrayBuilder` gets here."""
  if builder is not _ArrayBuilder:
    raise pickle.UnpicklingError('dill array with an unexpected constructor.')
  if npdict:
    raise pickle.UnpicklingError('refusing a numpy array with attributes.')
  array = _ArrayBuilder(*args)
  array.__setstate__(state)
  return array.array


def _encode(text, encoding='latin1'):
  """`_codecs.encode`, as protocol-2 pickles spell bytes; latin-1 only."""
  if encoding not in ('latin1', 'latin-1') or not isinstance(text, str):
    raise pickle.UnpicklingError(f'refusing _codecs.encode({encoding!r}).')
  return text.encode('latin1')


def _plain_mapping(data=()):
  """Haiku's old FlatMapping / frozendict: a (two-level) plain dict."""
  out = dict(data)
  return {k: _plain_mapping(v) if isinstance(v, Mapping) else v
          for k, v in out.items()}


NUMPY_GLOBALS: dict[tuple[str, str], Any] = {}
for _core in ('numpy.core', 'numpy._core'):
  NUMPY_GLOBALS.update({
      (f'{_core}.multiarray', '_reconstruct'): _ArrayBuilder,
      (f'{_core}.multiarray', 'scalar'): _scalar,
      (f'{_core}.numeric', '_frombuffer'): _frombuffer,
  })
NUMPY_GLOBALS.update({
    ('numpy', 'ndarray'): np.ndarray,
    ('numpy', 'dtype'): _dtype,
    ('_codecs', 'encode'): _encode,
    ('dill._dill', '_create_array'): _dill_create_array,
})

HAIKU_GLOBALS = {
    (module, name): _plain_mapping
    for module in ('haiku._src.data_structures', 'haiku.data_structures')
    for name in ('FlatMapping', 'frozendict')}

BUILTIN_GLOBALS = {
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('builtins', 'set'): set,
    ('builtins', 'frozenset'): frozenset,
    ('builtins', 'bytearray'): bytearray,
    ('builtins', 'complex'): complex,
    ('builtins', 'slice'): slice,
    ('__builtin__', 'set'): set,
}


class RestrictedUnpickler(pickle.Unpickler):
  """An Unpickler whose globals come only from `allowed`.

  Args:
    file: the binary stream holding the pickle.
    allowed: (module, name) -> the object to use for it.
    what: names the file in error messages.
    persistent_load: resolves persistent ids (PyTorch's storages), if any.
  """

  def __init__(self, file: BinaryIO, allowed: Mapping[tuple[str, str], Any],
               *, what: str,
               persistent_load: Optional[Callable[[Any], Any]] = None):
    super().__init__(file)
    self._allowed = allowed
    self._what = what
    self._persistent_load = persistent_load

  def find_class(self, module: str, name: str) -> Any:
    try:
      return self._allowed[(module, name)]
    except KeyError:
      raise RefusedGlobalError(
          f'{self._what} asks for the Python global {module}.{name}, which '
          'is not one of the tensor-rebuilding functions a weights file '
          'needs; refusing to read it (unpickling it could run arbitrary '
          'code). If you trust the file, convert it to safetensors with the '
          'code that wrote it.') from None

  def persistent_load(self, pid: Any) -> Any:
    if self._persistent_load is None:
      raise pickle.UnpicklingError(
          f'{self._what}: unexpected persistent id {pid!r}.')
    return self._persistent_load(pid)


def finish_arrays(tree: Any) -> Any:
  """Replaces the `_ArrayBuilder`s left in an unpickled tree by their arrays."""
  if isinstance(tree, _ArrayBuilder):
    if tree.array is None:
      raise pickle.UnpicklingError('a numpy array without data.')
    return tree.array
  if isinstance(tree, Mapping):
    return {k: finish_arrays(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return type(tree)(finish_arrays(v) for v in tree)
  return tree


def load(file: BinaryIO, allowed: Mapping[tuple[str, str], Any], *,
         what: str, persistent_load: Optional[Callable[[Any], Any]] = None
         ) -> Any:
  """Unpickles `file` with only the `allowed` globals (see the module doc)."""
  try:
    tree = RestrictedUnpickler(file, allowed, what=what,
                               persistent_load=persistent_load).load()
  except RefusedGlobalError:
    raise
  except (pickle.UnpicklingError, EOFError, ValueError, TypeError,
          AttributeError, IndexError, KeyError) as e:
    raise ValueError(f'{what} is not a readable weights pickle: '
                     f'{type(e).__name__}: {e}') from e
  return finish_arrays(tree)
