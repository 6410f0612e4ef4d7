"""The suite runs on 8 fake CPU devices (sharding tests depend on it)."""

import jax


def test_eight_cpu_devices():
  assert jax.device_count() == 8, jax.devices()
  assert jax.default_backend() == 'cpu'
