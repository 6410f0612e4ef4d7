"""Rematerialisation per stack (model.lm.remat_policy, model.xattn.remat_policy).

Every policy recomputes the same function: loss and gradients equal those
without remat. The tiny Flamingo runs from given visual tokens (the vision
encoder and resampler are not in a remat'd stack).
"""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flamingo_jax.models import flamingo
from flamingo_jax.models import stacking

B, L, N = 2, 12, 2


def _config(lm_policy, xattn_policy):
  config = flamingo.model_config('tiny')
  config['lm']['remat_policy'] = lm_policy
  config['xattn']['remat_policy'] = xattn_policy
  return config


def _inputs(config):
  rng = np.random.default_rng(0)
  tokens = rng.integers(5, 500, size=(B, L)).astype(np.int32)
  resampler = config['resampler']
  visual = rng.normal(size=(B, N, resampler['num_latents'],
                            resampler['width'])).astype(np.float32)
  media_mask = np.ones([B, N], bool)
  media_index = np.minimum(np.arange(L) // 5, N)[None].repeat(B, 0)
  return tokens, visual, media_mask, media_index.astype(np.int32)


def _model(config):
  def forward(tokens, visual, media_mask, media_index):
    return flamingo.Flamingo(config).decode(tokens, visual, media_mask,
                                            media_index)
  return hk.without_apply_rng(hk.transform(forward))


@pytest.fixture(scope='module')
def params():
  config = _config('none', 'none')
  params = _model(config).init(jax.random.PRNGKey(0), *_inputs(config))
  # Open the gates, so that the xattn layers shape the loss.
  return {module: {name: value + 0.5 if name.endswith('_gate') else value
                   for name, value in leaves.items()}
          for module, leaves in params.items()}


def _loss_and_grads(config, params):
  model = _model(config)
  tokens, visual, media_mask, media_index = _inputs(config)

  def loss(params, visual):
    logits = model.apply(params, tokens, visual, media_mask, media_index)
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1))

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, visual)


@pytest.fixture(scope='module')
def reference(params):
  return _loss_and_grads(_config('none', 'none'), params)


@pytest.mark.parametrize('lm_policy,xattn_policy', [
    ('dots', 'dots'), ('full', 'full'), ('full', 'dots')])
def test_remat_policies_give_the_same_loss_and_gradients(
    params, reference, lm_policy, xattn_policy):
  loss, grads = _loss_and_grads(_config(lm_policy, xattn_policy), params)
  want_loss, want_grads = reference
  np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(got, want, rtol=1e-5,
                               atol=1e-6 * float(np.abs(want).max()))


def _remat_policies(jaxpr) -> list:
  """The policies of the checkpoint equations, outermost first."""
  found = []
  for eqn in jaxpr.eqns:
    if 'policy' in eqn.params:  # jax.checkpoint's equation ('remat2').
      found.append(eqn.params['policy'])
    for value in eqn.params.values():
      for sub in value if isinstance(value, (list, tuple)) else [value]:
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          found += _remat_policies(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          found += _remat_policies(sub)
  return found


@pytest.mark.parametrize('lm_policy,xattn_policy', [
    ('none', 'full'), ('dots', 'none'), ('full', 'dots')])
def test_each_stack_gets_its_own_policy(params, lm_policy, xattn_policy):
  config = _config(lm_policy, xattn_policy)
  jaxpr = jax.make_jaxpr(_model(config).apply)(params, *_inputs(config))
  want = [stacking.REMAT_POLICIES[p] for p in (xattn_policy, lm_policy)
          if p != 'none']
  # The tiny model interleaves one xattn layer before each LM layer: one
  # scan of groups, each applying an xattn layer then scanning LM layers.
  assert _remat_policies(jaxpr.jaxpr) == want


def test_configs_without_an_xattn_policy_follow_the_lm():
  config = _config('full', 'none')
  del config['xattn']['remat_policy']
  jaxpr = jax.make_jaxpr(_model(config).apply)(
      *[jax.eval_shape(_model(config).init, jax.random.PRNGKey(0),
                       *_inputs(config))], *_inputs(config))
  full = stacking.REMAT_POLICIES['full']
  assert _remat_policies(jaxpr.jaxpr) == [full, full]


def test_unknown_policy_is_an_error():
  with pytest.raises(ValueError, match="remat_policy 'some'"):
    stacking.remat_policy('some')
