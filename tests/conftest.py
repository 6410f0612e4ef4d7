"""Test setup: 8 fake CPU devices, set before JAX initialises its backends."""

import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('JAX_NUM_CPU_DEVICES', '8')
# XLA:CPU compiles 2-3x faster without its backend optimisations, and the
# suite is mostly compilation; results stay fp32-accurate (the tests compare
# runs with each other, never with timings). The subprocesses inherit it.
_FAST_COMPILE = '--xla_backend_optimization_level=0'
if _FAST_COMPILE not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (
      f"{os.environ.get('XLA_FLAGS', '')} {_FAST_COMPILE}".strip())
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  # One compilation cache per test run, shared by the xdist workers and the
  # subprocesses (they inherit the environment): tests that compile the same
  # step again (resume, preemption, multi-process) skip the recompilation.
  # A fresh directory, so that no run depends on what an earlier one left.
  import atexit  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  _CACHE = tempfile.mkdtemp(prefix='flamingo_jax_tests_jax_cache_')
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _CACHE
  atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)

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


@pytest.fixture(scope='session')
def smoke_workdir(tmp_path_factory):
  """A workdir laid out as a smoke run of the tiny recipe leaves it, built
  once per test run (the xdist workers share it through a file lock).

  config.json (experiments/tiny.py:smoke), checkpoints/1 and the tokenizer.
  The checkpoint is the training loop's own train state structure
  (`loop.abstract_train_state`) saved by the loop's `Checkpointer`, filled
  with seeded random values (the xattn gates open, so the media change what
  is generated) rather than run through `init`: compiling the model's init
  or a train step would take the better part of a minute on 2 cores. The
  tokenizer is trained on a small world corpus into the workdir:
  `config.data.data_dir` and `config.data.tokenizer` point into the tests'
  tmp, never the user's cache.
  """
  import fcntl  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.getbasetemp()
  if os.environ.get('PYTEST_XDIST_WORKER'):
    root = root.parent  # Shared by the workers.
  workdir = root / 'smoke_workdir'
  with open(root / 'smoke_workdir.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not (workdir / 'READY').exists():
      _build_smoke_workdir(workdir)
      (workdir / 'READY').touch()
  return workdir


def _build_smoke_workdir(workdir) -> None:
  """See `smoke_workdir`."""
  # pylint: disable=g-import-not-at-top
  import numpy as np
  from experiments import tiny
  from flamingo_jax import checkpoint as checkpoint_lib
  from flamingo_jax.data import prepare
  from flamingo_jax.data import tokenizer as tokenizer_lib
  from flamingo_jax.training import loop
  # pylint: enable=g-import-not-at-top
  config = tiny.get_config('smoke')
  config.stages, config.init_from = {}, []
  config.data.data_dir = str(workdir / 'world')
  config.data.tokenizer = str(workdir / 'tokenizer.model')
  tokenizer_lib.Tokenizer.train(
      prepare.world_corpus(num_scenes=300, num_videos=100, num_documents=100),
      config.data.vocab_size, path=config.data.tokenizer)
  abstract = loop.abstract_train_state(
      config, loop.task_of(config).transform(config.model),
      loop.make_optimizer(config))
  rng = np.random.default_rng(0)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path, simple=True, separator='/')
    shape = leaf.shape
    if name.startswith(('opt_state', 'step', 'rng')):
      value = np.zeros(shape)
    elif name.endswith('_gate'):
      value = rng.uniform(0.5, 1.0, shape)
    elif name.endswith(('scale', 'gain')):
      value = np.ones(shape)
    elif len(shape) >= 2:
      value = rng.normal(0.0, shape[-2] ** -0.5, shape)
    else:
      value = rng.normal(0.0, 0.02, shape)
    return jax.numpy.asarray(value, leaf.dtype)

  state = jax.tree_util.tree_map_with_path(fill, abstract)
  state = state._replace(step=jax.numpy.ones([], jax.numpy.int32))
  checkpointer = checkpoint_lib.Checkpointer(
      str(workdir / 'checkpoints'), save_every=1, keep=1, async_save=False)
  checkpointer.save(1, state, {'next_step': 1}, force=True)
  checkpointer.close()
  (workdir / 'config.json').write_text(
      config.to_json_best_effort(indent=2, sort_keys=True))
