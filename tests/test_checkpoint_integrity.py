"""checkpoint_integrity: the converter's slice-by-slice checks give the
checkpointer's values."""

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from flamingo_jax import checkpoint_integrity


def test_checks_in_slices_equal_the_jitted_pass(monkeypatch):
  monkeypatch.setattr(checkpoint_integrity, 'SLICE_BYTES', 1000)
  rng = np.random.default_rng(0)
  bad = rng.normal(size=(600, 2)).astype(np.float32)
  bad[517, 1] = np.nan  # In a late slice.
  tree = {'bf16': rng.normal(size=(37, 5, 3)).astype(ml_dtypes.bfloat16),
          'f32': rng.normal(size=(41, 7)).astype(np.float32),
          'i8': rng.integers(-9, 9, (300, 5)).astype(np.int8),
          'bool': rng.integers(0, 2, (301,)).astype(bool),
          'scalar': np.int32(5), 'bad': bad,
          'nested': {'small': np.ones([2], np.float16)}}
  jitted = checkpoint_integrity.integrity(
      {k: jnp.asarray(v) if not isinstance(v, dict) else v
       for k, v in tree.items()})
  assert checkpoint_integrity.integrity(tree, in_slices=True) == jitted
  assert jitted[1] == ['bad']
