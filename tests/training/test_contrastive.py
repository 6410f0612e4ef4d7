"""Contrastive pretraining: the two-term loss, and the tiny recipe's stage
whose checkpoint initialises Flamingo's vision encoder."""

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import tiny
from flamingo_jax import checkpoint
from flamingo_jax.models import flamingo
from flamingo_jax.training import contrastive
from flamingo_jax.training import loop
from flamingo_jax.training import optim
from flamingo_jax.training import recipe
from flamingo_jax.training import sharding
from flamingo_jax.training import train_step as train_step_lib


def _log_softmax(x, axis):
  x = x - x.max(axis=axis, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


def test_aligned_pairs_at_low_temperature_cost_nothing():
  embeddings = jnp.eye(4, 8)  # [B, E]: four orthonormal pairs.
  loss, metrics = contrastive.contrastive_loss(embeddings, embeddings, 100.0)
  # Each wrong candidate costs exp(-100): the loss is 3 exp(-100) ~ 0.
  np.testing.assert_allclose(loss, 0.0, atol=1e-6)
  assert metrics['i2t_accuracy'] == 1.0 and metrics['t2i_accuracy'] == 1.0


def test_identical_embeddings_cost_log_batch():
  same = jnp.ones([5, 3]) / np.sqrt(3.0)
  loss, metrics = contrastive.contrastive_loss(same, same, 10.0)
  np.testing.assert_allclose(loss, np.log(5.0), rtol=1e-6)
  np.testing.assert_allclose(metrics['i2t_loss'], np.log(5.0), rtol=1e-6)


def test_loss_is_the_mean_of_both_directions():
  rng = np.random.default_rng(0)
  image = rng.normal(size=[4, 6])
  text = rng.normal(size=[4, 6])
  image /= np.linalg.norm(image, axis=-1, keepdims=True)
  text /= np.linalg.norm(text, axis=-1, keepdims=True)
  scale = 3.0
  logits = scale * image @ text.T  # [B, B]
  i2t = -np.diagonal(_log_softmax(logits, axis=1)).mean()
  t2i = -np.diagonal(_log_softmax(logits, axis=0)).mean()
  assert abs(i2t - t2i) > 1e-3  # Not symmetric: both terms matter.
  loss, metrics = contrastive.contrastive_loss(jnp.asarray(image),
                                               jnp.asarray(text), scale)
  np.testing.assert_allclose(metrics['i2t_loss'], i2t, rtol=1e-5)
  np.testing.assert_allclose(metrics['t2i_loss'], t2i, rtol=1e-5)
  np.testing.assert_allclose(loss, (i2t + t2i) / 2, rtol=1e-5)
  top1 = (logits.argmax(axis=1) == np.arange(4)).mean()
  np.testing.assert_allclose(metrics['i2t_accuracy'], top1)

  # A row without a pair (a skipped example) is neither query nor candidate.
  padded_image = np.concatenate([image, np.zeros([1, 6])])
  padded_text = np.concatenate([text, np.zeros([1, 6])])
  valid = jnp.array([True] * 4 + [False])
  padded, _ = contrastive.contrastive_loss(
      jnp.asarray(padded_image), jnp.asarray(padded_text), scale, valid)
  np.testing.assert_allclose(padded, loss, rtol=1e-6)


def test_unsupported_step_options_are_named():
  with pytest.raises(ValueError, match='microbatches=1'):
    contrastive.make_train_step(None, None, {}, jnp.float32, None,
                                microbatches=2)


class _Pairs:
  """'pairs' batches (like the pipeline's) as a pure function of the step."""

  def __init__(self, config, start_step):
    self.spec, self.next_step = config.data.datasets.pairs, start_step

  def __iter__(self):
    return self

  def __next__(self):
    rng = np.random.default_rng([self.next_step])
    spec = self.spec
    b, l, size = spec.batch_size, spec.seq_len, spec.image_size
    tokens = rng.integers(5, 500, [b, l]).astype(np.int32)
    tokens[:, l // 2:] = 0  # Padding.
    self.next_step += 1
    return {'pairs': dict(
        tokens=tokens, targets=np.roll(tokens, -1, axis=1),
        loss_mask=np.ones([b, l], np.float32),
        media=rng.integers(0, 255, [b, 1, 1, size, size, 3]).astype(np.uint8),
        media_mask=np.ones([b, 1], bool),
        media_index=np.ones([b, l], np.int32))}


def _flamingo_state(config, mesh):
  """A Flamingo train state of zeros, sharded like the loop's (no init)."""
  abstract = flamingo.abstract_params(config.model)
  trainable, frozen = optim.partition(abstract, config.freeze)
  zeros = lambda tree, dtype=None: jax.tree.map(
      lambda s: np.zeros(s.shape, dtype or s.dtype), tree)
  place = lambda tree: jax.device_put(tree, sharding.param_shardings(
      tree, config.param_rules, mesh))
  return train_step_lib.new_state(
      step=np.zeros([], np.int32), trainable=place(zeros(trainable)),
      frozen=place(zeros(frozen, jnp.bfloat16)),  # As precision.cast_frozen.
      opt_state=(), rng=jax.random.PRNGKey(0))


_REPO = pathlib.Path(__file__).resolve().parents[2]


def run_smoke_stage(workdir: str) -> None:
  """Trains the smoke recipe's vision stage for 2 steps (in a subprocess).

  Saves the final trainable parameters to <workdir>/final.npz.
  """
  stage = tiny.get_config('smoke').stages.vision
  stage.total_steps = 2
  stage.checkpoint.every = 2
  stage.log_every = 1
  state = loop.train_and_evaluate(stage, workdir, _Pairs)
  final = jax.device_get(state.trainable)
  np.savez(os.path.join(workdir, 'final.npz'), **{
      f'{module}/{name}': value for module, leaves in final.items()
      for name, value in leaves.items()})


def test_vision_stage_initialises_flamingos_vision_encoder(tmp_path):
  config = tiny.get_config('smoke')
  assert recipe.stage_order(config, str(tmp_path)) == ['vision', 'lm']
  assert config.stages.vision.task == 'contrastive'
  # One CPU device and quick XLA:CPU compiles (like test_multiprocess): the
  # stage compiles the NFNet's init and train step in ~25 s instead of ~60.
  env = dict(os.environ, JAX_PLATFORMS='cpu', JAX_NUM_CPU_DEVICES='1',
             XLA_FLAGS=(os.environ.get('XLA_FLAGS', '')
                        + ' --xla_backend_optimization_level=0').strip())
  workdir = tmp_path / 'vision'
  code = ('from tests.training import test_contrastive as t; '
          f't.run_smoke_stage({str(workdir)!r})')
  result = subprocess.run([sys.executable, '-c', code], cwd=_REPO, env=env,
                          capture_output=True, text=True, timeout=300,
                          check=False)
  assert result.returncode == 0, result.stderr[-3000:]

  rows = loop.read_metrics(str(workdir))
  assert [r['step'] for r in rows] == [1, 2]
  for key in ('loss', 'loss/pairs', 'i2t_accuracy/pairs',
              't2i_accuracy/pairs', 'logit_scale', 'grad_norm'):
    assert np.isfinite(rows[-1][key]), key
  assert (workdir / 'plots' / 'loss.png').exists()
  with np.load(workdir / 'final.npz') as final:
    final = dict(final)
  saved = checkpoint.load_params(str(workdir))
  assert {f'{m}/{n}' for m in saved for n in saved[m]} == set(final)
  for path, value in final.items():  # The last checkpoint is the final state.
    module, name = path.rsplit('/', 1)
    np.testing.assert_array_equal(saved[module][name], value)

  # Flamingo's init_from, as the recipe's main stage runs it.
  config.init_from = [s for s in config.init_from
                      if s['workdir'] == 'vision']
  mesh = sharding.make_mesh(config.mesh)
  with jax.set_mesh(mesh):
    state = loop._init_from(  # pylint: disable=protected-access
        _flamingo_state(config, mesh), config, str(tmp_path))
  vision = {path: value for path, value in final.items()
            if path.startswith('vision_encoder/')}
  # Frozen in Flamingo, so stored in bf16; the same modules and names.
  assert {f'{m}/{n}' for m, leaves in state.frozen.items() for n in leaves
          if m.startswith('vision_encoder/')} == set(vision)
  for path, value in vision.items():
    module, name = path.rsplit('/', 1)
    loaded = np.asarray(state.frozen[module][name])
    assert loaded.dtype == jnp.bfloat16
    np.testing.assert_array_equal(loaded, value.astype(loaded.dtype))
  # Everything else is untouched (still zeros).
  assert not np.asarray(state.trainable['perceiver_resampler']['latents']).any()
  assert not np.asarray(state.frozen['lm/embed']['embeddings']).any()
