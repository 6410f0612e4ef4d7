"""The NFNet structures of the parity fixtures, registered for each test."""

import pytest

from flamingo_jax.models import nfnet
from tests.weights import fixtures


@pytest.fixture(autouse=True)
def parity_nfnet_variants(monkeypatch):
  for name, params in fixtures.NFNET_VARIANTS.items():
    monkeypatch.setitem(nfnet.NFNET_PARAMS, name, params)
