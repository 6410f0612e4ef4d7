"""The training loop: sharded state, one jitted step, checkpoints, metrics.

  state = jit(init, out_shardings=rules(eval_shape(init)))(rng)   # sharded
  resume from <workdir>/checkpoints if there is one (state + data position)
  for step: batches -> global arrays -> train_step -> metrics / checkpoint

A run killed at any point resumes from its last checkpoint and continues
bit-exactly: the step rng is fold_in(rng, step) and the data position is
saved with the state. SIGTERM (preemption) saves a checkpoint and exits.
"""

from collections.abc import Callable, Iterator, Mapping
import os
import re
from typing import Any, NamedTuple, Optional

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from flamingo_jax import checkpoint as checkpoint_lib
from flamingo_jax import plot
from flamingo_jax.models import contrastive as contrastive_model
from flamingo_jax.models import flamingo
from flamingo_jax.training import contrastive
from flamingo_jax.training import flops as flops_lib
from flamingo_jax.training import metrics as metrics_lib
from flamingo_jax.training import optim
from flamingo_jax.training import precision
from flamingo_jax.training import sharding
from flamingo_jax.training import train_step as train_step_lib

TrainState = train_step_lib.TrainState
# make_data(config, start_step) -> iterator of {dataset: {key: np.ndarray}}
# (this process's share of each global batch) with a `state()` method.
DataFactory = Callable[[ml_collections.ConfigDict, int], Iterator[Any]]


class NonFiniteLossError(FloatingPointError):
  pass


class Task(NamedTuple):
  """What `config.task` selects: the model and its train step."""
  transform: Callable[[Any], Any]  # config.model -> hk.Transformed
  example_inputs: Callable[[Any], tuple[jax.Array, ...]]  # For init.
  make_train_step: Callable[..., Any]  # (apply, optimizer, weights, ...)


# config.task (default 'flamingo'); 'contrastive' pretrains the vision
# encoder (flamingo_jax/training/contrastive.py), 'lm' the LM alone on text
# (Flamingo's batches; no vision encoder runs).
TASKS = {
    'flamingo': Task(flamingo.transform, flamingo.example_inputs,
                     train_step_lib.make_train_step),
    'lm': Task(flamingo.transform_lm, flamingo.example_inputs,
               train_step_lib.make_train_step),
    'contrastive': Task(contrastive_model.transform,
                        contrastive_model.example_inputs,
                        contrastive.make_train_step),
}


def task_of(config: ml_collections.ConfigDict) -> Task:
  name = config.get('task', 'flamingo')
  if name not in TASKS:
    raise ValueError(f'Unknown config.task {name!r}; expected one of '
                     f'{sorted(TASKS)}.')
  return TASKS[name]


def _state_init(config: ml_collections.ConfigDict, model, optimizer):
  """rng -> the initial train state (pure; for eval_shape and jit)."""
  inputs = task_of(config).example_inputs(config.model)

  def init(rng):
    init_rng, state_rng = jax.random.split(rng)
    params = model.init(init_rng, *inputs)
    trainable, frozen = optim.partition(params, config.freeze)
    return TrainState(
        step=jnp.zeros([], jnp.int32),
        trainable=trainable,
        frozen=precision.cast_frozen(frozen),
        opt_state=optimizer.init(trainable),
        rng=state_rng)

  return init


def abstract_train_state(config: ml_collections.ConfigDict, model,
                         optimizer) -> TrainState:
  """The train state's shapes and dtypes (`jax.eval_shape`, no memory)."""
  return jax.eval_shape(_state_init(config, model, optimizer),
                        jax.random.PRNGKey(config.seed))


def create_train_state(config: ml_collections.ConfigDict, mesh, model,
                       optimizer):
  """The train state, created already sharded, and its shardings."""
  init = _state_init(config, model, optimizer)
  rng = jax.random.PRNGKey(config.seed)
  abstract = jax.eval_shape(init, rng)
  shardings = state_shardings(abstract, config, mesh)
  state = jax.jit(init, out_shardings=shardings)(rng)
  return state, shardings


def make_optimizer(config: ml_collections.ConfigDict):
  """`config.optim`'s optimizer; round-robin makes M updates per step."""
  return optim.make_optimizer(
      config.optim,
      optim.updates_per_step(config.optim, len(config.data.datasets)))


def make_step_fn(config: ml_collections.ConfigDict, model, optimizer):
  """The (unjitted) train step of `config`: its task, lambdas, precision,
  and `config.optim.dataset_updates` / `microbatches` where not default."""
  weights = {name: ds.weight for name, ds in config.data.datasets.items()}
  compute_dtype = jnp.dtype(config.compute_dtype)
  apply_fn = precision.with_compute_dtype(model, compute_dtype).apply
  options = {}  # Only what departs from the default (any task takes those).
  if config.optim.get('dataset_updates', 'accumulate') != 'accumulate':
    options['dataset_updates'] = config.optim.dataset_updates
  if config.optim.get('microbatches', 1) != 1:
    options['microbatches'] = config.optim.microbatches
  return task_of(config).make_train_step(
      apply_fn, optimizer, weights, compute_dtype,
      optim.learning_rate_fn(config.optim), **options)


def state_shardings(abstract: TrainState, config, mesh) -> TrainState:
  rules = config.param_rules
  trainable = sharding.param_shardings(abstract.trainable, rules, mesh)
  frozen = sharding.param_shardings(abstract.frozen, rules, mesh)
  replicated = sharding.replicated(mesh)
  return TrainState(
      step=replicated,
      trainable=trainable,
      frozen=frozen,
      # config.zero_axis (e.g. 'data'): ZeRO-1, moments split over it too.
      opt_state=sharding.optimizer_state_shardings(
          abstract.opt_state, trainable,
          zero_axis=config.get('zero_axis', None)),
      rng=replicated)


def _init_from(state: TrainState, config, workdir: str) -> TrainState:
  """Overwrites parameters with those of other runs (`config.init_from`).

  Each source is {'workdir': path (relative to this run's workdir, absolute,
  or a URL such as gs://...), 'include': [regex], 'exclude': [regex]} over
  'module/param' paths; e.g. a pretrained LM: include ['lm/.*'], exclude
  ['lm/eoc_.*'].
  """
  trainable, frozen = state.trainable, state.frozen
  for source in config.get('init_from', None) or []:
    path = source['workdir']
    if '://' not in path:  # gs://... is absolute too.
      path = os.path.join(workdir, path)
    loaded = checkpoint_lib.load_params(path)
    include = [re.compile(r) for r in source.get('include', ['.*'])]
    exclude = [re.compile(r) for r in source.get('exclude', [])]

    def replace(params):
      count = 0
      out = {}
      for module, leaves in params.items():
        out[module] = dict(leaves)
        for name, old in leaves.items():
          key = f'{module}/{name}'
          if (not any(r.fullmatch(key) for r in include)
              or any(r.fullmatch(key) for r in exclude)):
            continue
          if name not in loaded.get(module, {}):
            raise ValueError(f'init_from {path}: it has no parameter {key}.')
          new = loaded[module][name]
          if new.shape != old.shape:
            raise ValueError(f'init_from {path}: {key} has shape {new.shape}, '
                             f'this model needs {old.shape}.')
          new = new.astype(old.dtype)
          out[module][name] = jax.make_array_from_callback(
              old.shape, old.sharding, lambda index, new=new: new[index])
          count += 1
      return out, count

    trainable, count_t = replace(trainable)
    frozen, count_f = replace(frozen)
    count = count_t + count_f
    if not count:
      raise ValueError(f'init_from {path}: include {source.get("include")} '
                       'matched no parameter of this model.')
    logging.info('Initialised %d parameters from %s.', count, path)
  return state._replace(trainable=trainable, frozen=frozen)


def _global_batches(local: Mapping[str, Mapping[str, np.ndarray]],
                    batch_sharding) -> dict[str, dict[str, jax.Array]]:
  """This process's rows -> global arrays sharded over the batch axes."""
  return {
      name: {key: jax.make_array_from_process_local_data(batch_sharding, value)
             for key, value in batch.items()}
      for name, batch in local.items()}


def _write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))


def _tokens_per_step(batches) -> tuple[int, int]:
  tokens = sum(int(np.prod(b['tokens'].shape)) for b in batches.values())
  examples = sum(int(b['tokens'].shape[0]) for b in batches.values())
  return tokens, examples


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       make_data: Optional[DataFactory] = None) -> TrainState:
  """Trains `config` in `workdir`, resuming from its last checkpoint."""
  if make_data is None:
    # pylint: disable=g-import-not-at-top
    from flamingo_jax.data import pipeline
    from flamingo_jax.data import prepare
    # pylint: enable=g-import-not-at-top
    prepare.ensure_data(config)
    make_data = pipeline.make_train_data
  os.makedirs(workdir, exist_ok=True)
  _write_config(config, workdir)
  mesh = sharding.make_mesh(config.mesh)
  with jax.set_mesh(mesh):
    return _train(config, workdir, mesh, make_data)


def _check_batch_sizes(config, mesh) -> None:
  parallel = int(np.prod([mesh.shape[a] for a in sharding.BATCH_AXES
                          if a in mesh.shape]))
  for name, spec in config.data.datasets.items():
    if spec.batch_size % parallel:
      raise ValueError(
          f'config.data.datasets.{name}.batch_size={spec.batch_size} is not '
          f'divisible by the {parallel} data-parallel devices of mesh '
          f'{dict(mesh.shape)}.')
    microbatches = config.optim.get('microbatches', 1)
    if spec.batch_size % (parallel * microbatches):
      raise ValueError(
          f'config.data.datasets.{name}.batch_size={spec.batch_size} is not '
          f'divisible by optim.microbatches={microbatches} times the '
          f'{parallel} data-parallel devices of mesh {dict(mesh.shape)}.')


def _train(config, workdir, mesh, make_data) -> TrainState:
  """The body of train_and_evaluate, under the mesh."""
  _check_batch_sizes(config, mesh)
  model = task_of(config).transform(config.model)
  optimizer = make_optimizer(config)
  state, shardings = create_train_state(config, mesh, model, optimizer)

  checkpointer = checkpoint_lib.Checkpointer(
      os.path.join(workdir, 'checkpoints'),
      save_every=config.checkpoint.every, keep=config.checkpoint.keep)
  data_position: dict[str, Any] = {}
  if checkpointer.latest_step() is None:
    state = _init_from(state, config, workdir)
  else:
    resumed = checkpointer.latest_step()
    state, data_position = checkpointer.restore(
        checkpoint_lib.abstract_like(state))
    logging.info('Resuming from step %d (checkpoint in %s).', resumed,
                 checkpointer.directory)
  first_step = int(jax.device_get(state.step))
  data = make_data(config, first_step)
  if data_position.get('next_step', first_step) != first_step:
    raise RuntimeError(f'Checkpoint data position {data_position} does not '
                       f'match its state step {first_step}.')

  step_fn = make_step_fn(config, model, optimizer)
  batch_sharding = sharding.batch_sharding(mesh)
  jitted = jax.jit(step_fn, in_shardings=(shardings, batch_sharding),
                   out_shardings=(shardings, None), donate_argnums=0)

  logger = metrics_lib.MetricLogger(workdir, config.total_steps, first_step)
  preempted = checkpoint_lib.PreemptionFlag().install()
  compiled, flops = None, None
  peak = metrics_lib.peak_flops_per_device()
  try:
    for step in range(first_step, config.total_steps):
      batches = _global_batches(next(data), batch_sharding)
      if compiled is None:
        compiled = jitted.lower(state, batches).compile()
        # Model FLOPs of the global batch (not XLA's per-device count).
        flops = flops_lib.train_step_flops(
            config, optim.merge(state.trainable, state.frozen), strict=False)
        tokens, examples = _tokens_per_step(batches)
        logger.timing(step)  # Do not count compilation in steps/s.
      with jax.profiler.StepTraceAnnotation('train', step_num=step):
        state, step_metrics = compiled(state, batches)
      done = step + 1
      if done % config.log_every == 0 or done == config.total_steps:
        scalars = jax.device_get(step_metrics)
        if not np.isfinite(scalars['loss']):
          raise NonFiniteLossError(
              f'Loss is {scalars["loss"]} at step {done}; stopping. The last '
              f'good checkpoint is step {checkpointer.latest_step()} in '
              f'{checkpointer.directory}.')
        timing = logger.timing(done)
        rate = timing['steps_per_sec']
        timing.update(tokens_per_sec=rate * tokens,
                      examples_per_sec=rate * examples)
        if flops and peak:
          timing['mfu'] = metrics_lib.mfu(flops, rate, peak,
                                          jax.device_count())
        if hasattr(data, 'stats'):
          timing.update(data.stats())
        logger.write(done, {**scalars, **timing})
      saved = checkpointer.save(done, state, {'next_step': done},
                                force=done == config.total_steps)
      if preempted.is_set() or checkpointer.reached_preemption(done):
        if not saved:
          checkpointer.save(done, state, {'next_step': done}, force=True)
        checkpointer.wait_until_finished()
        logging.warning('Preempted: saved step %d; exiting.', done)
        break
  finally:
    preempted.uninstall()
    checkpointer.close()
    logger.close()
    if hasattr(data, 'close'):
      data.close()
  if jax.process_index() == 0:
    for path in plot.write_plots(workdir):
      logging.info('Wrote %s', path)
  return state


def read_metrics(workdir: str) -> list[dict[str, float]]:
  """The rows of `<workdir>/metrics.jsonl`, in order."""
  return plot.read_metrics(workdir)
