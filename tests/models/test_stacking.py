"""Interleaved scanning of stacked layers equals the plain unrolled loop."""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flamingo_jax.models import stacking


def _layer(h, scale):
  return jnp.tanh(hk.Linear(h.shape[-1], name='dense')(h)) * scale


def _model(num_main, positions):
  main = stacking.Stack(lambda: hk.to_module(_layer)(name='main'),
                        num_main, name='main_stack')
  inserted = stacking.Stack(lambda: hk.to_module(_layer)(name='ins'),
                            len(positions), name='inserted_stack')

  def forward(h):
    main_params = main.params(h, 1.0)
    inserted_params = inserted.params(h, 2.0)
    interleaved = stacking.interleave(
        h, main=main, main_params=main_params, main_args=(1.0,),
        inserted=inserted, inserted_params=inserted_params,
        inserted_args=(2.0,), positions=positions)
    # Reference: a Python loop over single layers.
    reference = h
    for i in range(num_main):
      if i in positions:
        j = positions.index(i)
        layer = jax.tree.map(lambda x, j=j: x[j], inserted_params)
        reference = inserted.apply_one(layer, reference, 2.0)
      layer = jax.tree.map(lambda x, i=i: x[i], main_params)
      reference = main.apply_one(layer, reference, 1.0)
    return interleaved, reference

  return hk.transform(forward)


@pytest.mark.parametrize('num_main,positions', [
    (4, (0, 1, 2, 3)),  # every layer (3B)
    (8, (0, 4)),  # every 4th (9B)
    (10, (0, 3, 6, 9)),  # every 3rd with a remainder group (like 80B)
    (6, (3,)),  # single in the middle
    (5, (1, 2, 4)),  # irregular
])
def test_interleave_matches_loop(num_main, positions):
  model = _model(num_main, positions)
  h = jax.random.normal(jax.random.PRNGKey(0), [2, 8])
  params = model.init(jax.random.PRNGKey(1), h)
  interleaved, reference = model.apply(params, None, h)
  np.testing.assert_allclose(interleaved, reference, rtol=1e-5, atol=1e-5)
  assert params['main_stack/main/dense']['w'].shape == (num_main, 8, 8)
  assert params['inserted_stack/ins/dense']['w'].shape == (len(positions), 8, 8)


def test_bad_positions_raise():
  model = _model(4, (2, 1))
  h = jnp.zeros([1, 8])
  with pytest.raises(ValueError, match='sorted'):
    model.init(jax.random.PRNGKey(0), h)


def _two_part_layer(h, scale, between=None):
  """A main layer with a slot for an inserted one (as lm.DecoderBlock)."""
  h = h + jnp.tanh(hk.Linear(h.shape[-1], name='first')(h)) * scale
  if between is not None:
    h = between(h)
  return h + jnp.sin(hk.Linear(h.shape[-1], name='second')(h))


@pytest.mark.parametrize('num_main,positions', [(4, (0, 1, 2, 3)),
                                                (10, (0, 3, 6, 9))])
def test_interleave_inside_runs_inserted_layers_within_main_ones(
    num_main, positions):
  main = stacking.Stack(lambda: hk.to_module(_two_part_layer)(name='main'),
                        num_main, name='main_stack')
  inserted = stacking.Stack(lambda: hk.to_module(_layer)(name='ins'),
                            len(positions), name='inserted_stack')

  def forward(h):
    main_params = main.params(h, 1.0)
    inserted_params = inserted.params(h, 2.0)
    run = lambda inside: stacking.interleave(
        h, main=main, main_params=main_params, main_args=(1.0,),
        inserted=inserted, inserted_params=inserted_params,
        inserted_args=(2.0,), positions=positions, inside=inside)
    reference = h
    for i in range(num_main):
      layer = jax.tree.map(lambda x, i=i: x[i], main_params)
      between = None
      if i in positions:
        ins = jax.tree.map(lambda x, j=positions.index(i): x[j],
                           inserted_params)
        between = lambda y, ins=ins: inserted.apply_one(ins, y, 2.0)
      reference = main.apply_one(layer, reference, 1.0, between=between)
    return run(True), run(False), reference

  model = hk.transform(forward)
  h = jax.random.normal(jax.random.PRNGKey(0), [2, 8])
  params = model.init(jax.random.PRNGKey(1), h)
  inside, before, reference = model.apply(params, None, h)
  np.testing.assert_allclose(inside, reference, rtol=1e-5, atol=1e-5)
  assert np.abs(np.asarray(inside) - np.asarray(before)).max() > 1e-3
