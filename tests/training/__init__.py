"""Helpers shared by the training tests."""

import haiku as hk
import numpy as np


def random_params(abstract: hk.Params, gate: float = 1.0,
                  seed: int = 0) -> hk.Params:
  """Parameters drawn like Haiku's initialisers, without compiling init.

  Compiling the tiny Flamingo's init takes ~10 s on a CPU, and these tests
  only need values of a sane scale. Gates and NFNet skip gains are `gate`
  instead of 0, so that every component contributes and gets gradients.

  Args:
    abstract: ShapeDtypeStructs, e.g. `flamingo.abstract_params(config)`.
    gate: the value of every `*_gate` and `skip_gain`.
    seed: numpy seed.

  Returns:
    numpy parameters of the same structure, shapes and dtypes.
  """
  rng = np.random.default_rng(seed)

  def draw(module, name, leaf):
    del module  # Unused.
    shape = leaf.shape
    if name.endswith(('_gate', 'skip_gain')):
      value = np.full(shape, gate)
    elif name in ('scale', 'gain'):
      value = np.ones(shape)
    elif name in ('offset', 'b', 'bias') or name.endswith('_bias'):
      value = np.zeros(shape)
    elif name == 'w':  # Dense [.., Din, Dout] or conv [k, k, Cin, Cout].
      value = rng.standard_normal(shape) / np.sqrt(shape[-2])
    elif name in ('embeddings', 'eoc_embedding'):
      value = rng.standard_normal(shape)
    else:  # Latents, time embeddings, the <EOC> output row.
      value = 0.02 * rng.standard_normal(shape)
    return value.astype(leaf.dtype)

  return hk.data_structures.map(draw, abstract)
