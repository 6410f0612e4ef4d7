"""Test setup: 8 fake CPU devices, set before JAX initialises its backends."""

import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('JAX_NUM_CPU_DEVICES', '8')

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position


def pytest_collection_modifyitems(config, items):
  del config  # Unused.
  if jax.default_backend() == 'tpu':
    return
  skip_tpu = pytest.mark.skip(reason='needs TPU hardware')
  for item in items:
    if 'tpu' in item.keywords:
      item.add_marker(skip_tpu)
