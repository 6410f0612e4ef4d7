"""The training loop: sharded state, one jitted step, checkpoints, metrics.

  validate the config (every numeric field the loop uses, by name:
      validation.py)
  lock the workdir (W/trainer.lock: one trainer per workdir)
  resume from <workdir>/checkpoints if there is one (state + data position;
      the newest intact step, see checkpoint.py), restored straight into
      the shardings rules(eval_shape(init)) gives; else
      state = jit(init, out_shardings=rules(eval_shape(init)))(rng)
  write W/config.json (only now: a run that cannot resume leaves it)
  for step: batches -> global arrays -> train_step -> metrics / checkpoint
  after the final step is saved: W/finished.json, then `on_finished(W)` on
      process 0 (the recipe writes W/plots/ there; this room plots nothing)
  config.probe (optional): the binding and keyed probes (probe.py; in an
      'lm' run, the text probe; in a 'contrastive' one, the attribute probe
      of the vision encoder) before the first step and every
      config.probe.every steps, into the metrics

A run killed at any point resumes from its last checkpoint and continues
bit-exactly: the step rng is fold_in(rng, step), the data position and the
non-finite counters are saved with the state. SIGTERM (preemption) or Ctrl-C
saves a checkpoint and raises `Preempted`, for the caller to exit cleanly.

Non-finite steps: the step itself skips and counts them (`train_step.
next_state`); at log and checkpoint steps the loop stops the run, with
`NonFiniteError`, once `config.max_nonfinite_steps` came in a row, before
saving. `config.debug.poison_step` = N puts NaN into the loss masks of step
N's batches, to test exactly that from outside the process.
"""

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple, Optional

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from flamingo_jax import checkpoint as checkpoint_lib
from flamingo_jax import fs
from flamingo_jax.models import contrastive as contrastive_model
from flamingo_jax.models import flamingo
from flamingo_jax.models import precision
from flamingo_jax.training import contrastive
from flamingo_jax.training import flops as flops_lib
from flamingo_jax.training import init_from
from flamingo_jax.training import metrics as metrics_lib
from flamingo_jax.training import optim
from flamingo_jax.training import preemption
from flamingo_jax.training import probe as probe_lib
from flamingo_jax.training import sharding
from flamingo_jax.training import train_step as train_step_lib
from flamingo_jax.training import validation
from flamingo_jax.training import workdir as workdir_lib

TrainState = train_step_lib.TrainState
# make_data(config, start_step) -> iterator of {dataset: {key: np.ndarray}}
# (this process's share of each global batch) with a `state()` method.
DataFactory = Callable[[ml_collections.ConfigDict, int], Iterator[Any]]
# Called with the workdir once the final step is saved and marked.
FinishedHook = Callable[[str], Any]


DEFAULT_MAX_NONFINITE_STEPS = 5  # When config.max_nonfinite_steps is unset.


class NonFiniteError(FloatingPointError):
  """Too many consecutive steps had a non-finite loss, gradient or update."""


class Preempted(Exception):  # pylint: disable=g-bad-exception-name
  """SIGTERM or Ctrl-C stopped training after saving: exit, then rerun."""

  def __init__(self, workdir: str, step: int):
    self.workdir, self.step = workdir, step
    super().__init__(f'Preempted: saved step {step} in {workdir}.')


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
    return train_step_lib.new_state(
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
      rng=replicated,
      skipped_steps=replicated,
      consecutive_skips=replicated)


def _global_batches(local: Mapping[str, Mapping[str, np.ndarray]],
                    batch_sharding) -> dict[str, dict[str, jax.Array]]:
  """This process's rows -> global arrays sharded over the batch axes."""
  return {
      name: {key: jax.make_array_from_process_local_data(batch_sharding, value)
             for key, value in batch.items()}
      for name, batch in local.items()}


def _tokens_per_step(batches) -> tuple[int, int]:
  tokens = sum(int(np.prod(b['tokens'].shape)) for b in batches.values())
  examples = sum(int(b['tokens'].shape[0]) for b in batches.values())
  return tokens, examples


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       make_data: Optional[DataFactory] = None, *,
                       on_finished: Optional[FinishedHook] = None
                       ) -> TrainState:
  """Trains `config` in `workdir`, resuming from its last intact checkpoint.

  Args:
    config: the run's config (`validation.validate_config` checks it).
    workdir: its directory, local or gs://.
    make_data: (config, first step) -> batches; default: the config's
      datasets through `data.pipeline`.
    on_finished: called on process 0 with `workdir` once the final step is
      saved and W/finished.json written (e.g. the recipe's plots), also when
      a preemption came at the final step.

  Returns:
    The final train state (W/finished.json is then written).

  Raises:
    Preempted: SIGTERM or Ctrl-C stopped training; the state is saved.
    NonFiniteError: `config.max_nonfinite_steps` non-finite steps in a row.
    ValueError: a bad config field, or a checkpoint that does not fit it.
    WorkdirLockedError: another trainer holds the workdir.
  """
  validation.validate_config(config)
  with workdir_lib.lock(workdir):
    if make_data is None:
      # pylint: disable=g-import-not-at-top
      from flamingo_jax.data import pipeline
      from flamingo_jax.data import prepare
      # pylint: enable=g-import-not-at-top
      prepare.ensure_data(config)
      make_data = pipeline.make_train_data
    config = resolve_mesh(config)
    mesh = sharding.make_mesh(config.mesh)
    with jax.set_mesh(mesh):
      return _train(config, workdir, mesh, make_data, on_finished)


def resolve_mesh(config: ml_collections.ConfigDict,
                 devices: Optional[Sequence[jax.Device]] = None
                 ) -> ml_collections.ConfigDict:
  """`config`, or with `config.auto_mesh.enabled` a copy whose `mesh` is the
  one the memory planner chooses for these devices (the least FSDP that
  fits; training/mesh_choice.py), logged with the plans it tried. The resolved
  mesh is what W/config.json records."""
  if not config.get('auto_mesh', {}).get('enabled', False):
    return config
  from flamingo_jax.training import mesh_choice  # pylint: disable=g-import-not-at-top
  chosen, tried = mesh_choice.auto_mesh(config, devices)
  for line in mesh_choice.reasons(chosen, tried):
    logging.info('auto_mesh: %s', line)
  return mesh_choice.with_mesh(config, chosen.mesh)


def _check_batch_sizes(config, mesh) -> None:
  parallel = sharding.data_parallel_size(mesh)
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


def _restore_or_create(config, workdir, checkpointer, model, optimizer, mesh
                       ) -> tuple[TrainState, TrainState, dict[str, Any]]:
  """(state, its shardings, data position): the newest intact checkpoint's,
  restored straight into sharded arrays (the model's init never runs); or,
  for a new run, the initial state with `config.init_from`'s parameters."""
  init = _state_init(config, model, optimizer)
  rng = jax.random.PRNGKey(config.seed)
  abstract = jax.eval_shape(init, rng)
  shardings = state_shardings(abstract, config, mesh)
  if not checkpointer.all_steps():
    state = jax.jit(init, out_shardings=shardings)(rng)
    return init_from.apply(state, config, workdir), shardings, {}
  target = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      abstract, shardings)
  try:
    state, position, step = checkpointer.restore_intact(
        target, zero_if_missing=train_step_lib.COUNTERS)
  except checkpoint_lib.CheckpointMismatchError as e:
    changed = workdir_lib.config_differences(config, workdir)
    raise ValueError(
        f'Cannot resume {workdir}: {e} The config differs from the run\'s '
        f'{workdir_lib.CONFIG_FILE} in '
        + ('; '.join(changed[:8]) if changed else 'no field') +
        '. Undo the change, or train in another --workdir (this one and '
        'its config are left as they were).') from None
  logging.info('Resuming from step %d (checkpoint in %s).', step,
               checkpointer.directory)
  return state, shardings, position


def _poisoned(batches, step: int):
  """`batches` with NaN loss masks (config.debug.poison_step)."""
  logging.warning('config.debug.poison_step=%d: the loss masks of this '
                  'step\'s batches are NaN.', step)
  return {name: {key: (np.full_like(value, np.nan) if key == 'loss_mask'
                       else value) for key, value in batch.items()}
          for name, batch in batches.items()}


def _check_skips(state: TrainState, step: int, limit: int,
                 checkpointer: checkpoint_lib.Checkpointer) -> None:
  """Raises NonFiniteError once `limit` steps in a row were skipped."""
  run = int(jax.device_get(state.consecutive_skips))
  if run < limit:
    return
  first = step - run + 1
  raise NonFiniteError(
      f'Steps {first}-{step}: {run} steps in a row had a non-finite loss, '
      'gradient norm or update (each was skipped, the parameters left as '
      f'they were; config.max_nonfinite_steps={limit}). Stopping without '
      f'saving: the last checkpoint, step {checkpointer.latest_step()} in '
      f'{checkpointer.directory}, holds only finite values. A rerun resumes '
      'from it and meets the same batches: lower optim.learning_rate or '
      'look at the data of these steps first.')


def _save_final(config, workdir, state) -> None:
  """Saves `state` as the final step unless it is saved already."""
  checkpointer = checkpoint_lib.Checkpointer(
      fs.join(workdir, 'checkpoints'),
      save_every=config.checkpoint.every, keep=config.checkpoint.keep)
  try:
    checkpointer.save(config.total_steps, state,
                      {'next_step': config.total_steps}, force=True)
  finally:
    checkpointer.close()


def _train(config, workdir, mesh, make_data, on_finished) -> TrainState:
  """The body of train_and_evaluate, under the mesh and the workdir lock."""
  _check_batch_sizes(config, mesh)
  model = task_of(config).transform(config.model)
  optimizer = make_optimizer(config)
  checkpointer = checkpoint_lib.Checkpointer(
      fs.join(workdir, 'checkpoints'),
      save_every=config.checkpoint.every, keep=config.checkpoint.keep)
  try:
    state, shardings, data_position = _restore_or_create(
        config, workdir, checkpointer, model, optimizer, mesh)
    first_step = int(jax.device_get(state.step))
    if data_position.get('next_step', first_step) != first_step:
      raise RuntimeError(f'Checkpoint data position {data_position} does '
                         f'not match its state step {first_step}.')
  except BaseException:
    checkpointer.close()
    raise
  workdir_lib.write_config(config, workdir)  # Only now: the run fits W.
  data = make_data(config, first_step)

  step_fn = make_step_fn(config, model, optimizer)
  batch_sharding = sharding.batch_sharding(mesh)
  jitted = jax.jit(step_fn, in_shardings=(shardings, batch_sharding),
                   out_shardings=(shardings, None), donate_argnums=0)

  logger = metrics_lib.MetricLogger(workdir, config.total_steps, first_step)
  probe, probe_every = probe_lib.from_config(config, model)
  if probe is not None and first_step == 0:
    logger.write(0, probe(optim.merge(state.trainable, state.frozen)))
  preempted = preemption.PreemptionFlag().install()
  compiled, flops = None, None
  peak = metrics_lib.peak_flops_per_device()
  max_skips = config.get('max_nonfinite_steps', DEFAULT_MAX_NONFINITE_STEPS)
  poison_step = (config.get('debug', None) or {}).get('poison_step', 0)
  stopped_at = None
  try:
    for step in range(first_step, config.total_steps):
      local = next(data)
      if step + 1 == poison_step:
        local = _poisoned(local, poison_step)
      batches = _global_batches(local, batch_sharding)
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
      log = done % config.log_every == 0 or done == config.total_steps
      if log:
        scalars = jax.device_get(step_metrics)
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
      if probe is not None and done % probe_every == 0:
        probe_row = probe(optim.merge(state.trainable, state.frozen))
        logger.write(done, probe_row)
      stop = preempted.is_set() or checkpointer.reached_preemption(done)
      save = (stop or done == config.total_steps
              or checkpointer.should_save(done))
      if log or save:
        _check_skips(state, done, max_skips, checkpointer)
      if save:
        checkpointer.save(done, state, {'next_step': done}, force=True)
        logger.flush()  # The rows up to a checkpoint outlive a crash.
      if stop:
        checkpointer.wait_until_finished()
        logging.warning('Preempted: saved step %d; exiting.', done)
        stopped_at = done
        break
  finally:
    preempted.uninstall()
    checkpointer.close()
    logger.close()
    if hasattr(data, 'close'):
      data.close()
  if stopped_at is not None and stopped_at < config.total_steps:
    raise Preempted(workdir, stopped_at)
  if first_step == config.total_steps:  # Nothing to train (e.g. 0 steps).
    _save_final(config, workdir, state)
  # The final step is saved and committed (close() waited for it).
  workdir_lib.mark_finished(workdir, config.total_steps)
  if on_finished is not None and jax.process_index() == 0:
    on_finished(workdir)
  if stopped_at is not None:  # Preempted at the final step: done, but exit.
    raise Preempted(workdir, stopped_at)
  return state


def read_metrics(workdir: str) -> list[dict[str, float]]:
  """The rows of `<workdir>/metrics.jsonl`, in order (see `metrics.py`)."""
  return metrics_lib.read_metrics(workdir)
