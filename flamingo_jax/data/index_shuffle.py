"""A random permutation of [0, n) that is evaluated one index at a time.

The input pipeline reads epoch e's example at offset i as permutation_e(i).
Holding that permutation costs 8 bytes an example per host (M3W's 43M
documents: 344 MB; ALIGN's 1.8B pairs: 14 GB), so beyond
`pipeline.MAX_SHUFFLE_IN_MEMORY` examples the loader uses `IndexShuffle`:
a keyed 4-round Feistel network on the smallest even number of bits that
holds n, walked along its cycle until it lands back in [0, n) (cycle
walking, Black & Rogaway 2002, "Ciphers with arbitrary finite domains").
A Feistel network is a bijection for any round function, and cycle walking
keeps it one on [0, n), so an epoch still reads every example once; the
domain is under 4n, so a lookup takes under 4 walks on average, each 4
rounds of a 64-bit mix (SplitMix64's finaliser), a few microseconds in
Python, and no memory.
"""

from collections.abc import Sequence

import numpy as np

ROUNDS = 4  # Luby-Rackoff: 4 rounds make a strong pseudorandom permutation.
_MASK64 = (1 << 64) - 1


def _mix(z: int) -> int:
  """SplitMix64's finaliser: a 64-bit bijection that spreads every bit."""
  z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
  z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
  return z ^ (z >> 31)


class IndexShuffle:
  """permutation(i) for i in [0, size), drawn from `key` (e.g. (seed,
  dataset, epoch)); indexable like the array it stands in for."""

  def __init__(self, size: int, key: Sequence[int]):
    if size < 1:
      raise ValueError(f'size must be >= 1; got {size}.')
    self._size = size
    bits = (size - 1).bit_length()
    self._half_bits = max(1, (bits + 1) // 2)
    self._half_mask = (1 << self._half_bits) - 1
    self._round_keys = [int(k) for k in np.random.default_rng(key).integers(
        0, 1 << 63, size=ROUNDS)]

  def __len__(self) -> int:
    return self._size

  def __getitem__(self, index: int) -> int:
    index = int(index)
    if not 0 <= index < self._size:
      raise IndexError(f'index {index} is outside [0, {self._size}).')
    x = self._permute(index)
    while x >= self._size:  # Ends: the cycle through `index` returns to it.
      x = self._permute(x)
    return x

  def _permute(self, x: int) -> int:
    """One pass of the Feistel network over [0, 2 ** (2 * half_bits))."""
    left, right = x >> self._half_bits, x & self._half_mask
    for key in self._round_keys:
      left, right = right, left ^ (_mix((right + key) & _MASK64) &
                                   self._half_mask)
    return (left << self._half_bits) | right
