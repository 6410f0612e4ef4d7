"""Reads Haiku parameter files: DeepMind's NFNet `F*_haiku.npz` and npz.

Despite the name, the NFNet release (deepmind-research `nfnets/`,
`https://storage.googleapis.com/dm-nfnets/F{0..6}_haiku.npz`) is not a
numpy `.npz`: it is a `dill` pickle of the two-level Haiku parameter dict,
`{'NFNet/~/nf_block_3/~/conv1': {'w': ndarray, 'gain': .., 'bias': ..}}`,
read there with `dill.load` (their `utils.load_haiku_file`). We read it with
`safe_pickle`: numpy arrays, plain dicts and Haiku's old containers only.
Tensors are named `'<module>/<param>'`.

A true `.npz` (a zip of `.npy` files, e.g. `np.savez(path, **flat)`) is
read with `np.load(allow_pickle=False)`, each array when indexed, under the
names it was saved with.
"""

import os
import zipfile

import numpy as np

from flamingo_jax.weights import safe_pickle
from flamingo_jax.weights import tensors as tensors_lib

_ALLOWED = {**safe_pickle.NUMPY_GLOBALS, **safe_pickle.HAIKU_GLOBALS,
            **safe_pickle.BUILTIN_GLOBALS}


def is_pickle(path: str) -> bool:
  """Whether `path` starts as a pickle (protocol >= 2) rather than a zip."""
  with open(path, 'rb') as f:
    return f.read(1) == b'\x80'


def read(path: str) -> tensors_lib.TensorStore:
  """The `'<module>/<param>'` arrays of a Haiku parameter pickle or npz."""
  path = os.fspath(path)
  if zipfile.is_zipfile(path):
    return _read_npz(path)
  with open(path, 'rb') as f:
    tree = safe_pickle.load(f, _ALLOWED, what=path)
  if not isinstance(tree, dict) or not all(
      isinstance(v, dict) for v in tree.values()):
    raise ValueError(f'{path} holds a {type(tree).__name__}, not a Haiku '
                     'parameter dict {module: {name: array}}.')
  arrays = {}
  for module, params in tree.items():
    for name, value in params.items():
      if isinstance(value, np.generic):  # A numpy scalar, e.g. a skip gain.
        value = np.asarray(value)
      if not isinstance(value, np.ndarray):
        raise ValueError(f'{path}: {module}/{name} is a '
                         f'{type(value).__name__}, not an array.')
      arrays[f'{module}/{name}'] = value
  return tensors_lib.from_arrays(arrays, source=path)


def _read_npz(path: str) -> tensors_lib.TensorStore:
  npz = np.load(path, allow_pickle=False)
  infos = {}
  for name in npz.files:
    # The header gives shape and dtype without reading the data.
    with npz.zip.open(f'{name}.npy') as f:
      version = np.lib.format.read_magic(f)
      read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                     else np.lib.format.read_array_header_2_0)
      shape, _, dtype = read_header(f)
    infos[name] = tensors_lib.TensorInfo(tuple(shape), dtype, path)
  return tensors_lib.TensorStore(infos, npz.__getitem__,
                                 releasers={path: npz.close}, source=path)
