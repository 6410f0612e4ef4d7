"""The per-index permutation for datasets too large to shuffle in memory."""

import numpy as np
import pytest

from flamingo_jax.data import index_shuffle


@pytest.mark.parametrize('size', [1, 2, 3, 7, 64, 1000, 4097])
def test_every_index_once(size):
  order = [index_shuffle.IndexShuffle(size, [0, 1, 2])[i] for i in range(size)]
  assert sorted(order) == list(range(size))


def test_keys_give_other_orders_and_the_same_key_the_same():
  def order(key):
    shuffle = index_shuffle.IndexShuffle(1000, key)
    return [shuffle[i] for i in range(1000)]
  assert order([0, 1, 2]) == order([0, 1, 2])
  orders = [order([0, 1, epoch]) for epoch in range(3)] + [order([1, 1, 0])]
  assert len({tuple(o) for o in orders}) == 4
  # Not the identity, nor a rotation of it: few fixed points, ~1 expected.
  assert sum(i == j for i, j in enumerate(orders[0])) < 10


def test_positions_spread_over_the_dataset():
  """Where position 0 lands, over many keys, is close to uniform (a
  chi-square test over 10 bins, p > 0.001 when uniform)."""
  size, keys = 5000, 2000
  landed = [index_shuffle.IndexShuffle(size, [7, k])[0] for k in range(keys)]
  counts = np.bincount(np.array(landed) * 10 // size, minlength=10)
  chi2 = float(np.sum((counts - keys / 10) ** 2 / (keys / 10)))
  assert chi2 < 27.9, counts  # The 0.001 quantile of chi-square, 9 dof.


def test_huge_sizes_take_no_memory():
  size = 1_800_000_000  # ALIGN's pairs.
  shuffle = index_shuffle.IndexShuffle(size, [0, 0, 0])
  picked = [shuffle[i] for i in (0, 1, size - 1)]
  assert len(set(picked)) == 3 and all(0 <= p < size for p in picked)
  with pytest.raises(IndexError, match=r'outside \[0, 1800000000\)'):
    shuffle[size]
