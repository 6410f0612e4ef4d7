"""The recipe: the stages, the main stage, evaluation, then the report.

  python -m flamingo_jax.train --config ... --workdir W   (calls `run`)

  W/vision/    e.g. stage 'vision': the vision encoder, contrastively
  W/lm/        e.g. stage 'lm': the LM on text
  W/           the main stage, which may `init_from` the stages' checkpoints

Stages run before the main stage, each after the stages whose checkpoints it
reads (its own `init_from`), in the order the main stage's `init_from` names
them; stages nothing reads run last, by name. A stage is done once its final
step is saved and marked (W/<stage>/finished.json, written by the loop) and
is then skipped (its checkpoint is reused), so rerunning the recipe resumes
wherever it stopped. A preempted stage (SIGTERM, Ctrl-C) ends the recipe at
once -- `run` returns False, the process exits 0 -- and the rerun resumes
that stage: no stage ever starts from an unfinished one. Every stage's config
is validated before the first one trains, and the recipe holds W's lock
(W/trainer.lock) throughout. Each stage's plots (W/<stage>/plots/) are written
as its training finishes; then the few-shot evaluation of the main stage
(W/eval/) and the report (W/report.md).
"""


from absl import logging
import jax
import ml_collections

from flamingo_jax import checkpoint
from flamingo_jax import fs
from flamingo_jax.orchestration import plots
from flamingo_jax.orchestration import report
from flamingo_jax.training import init_from
from flamingo_jax.training import loop
from flamingo_jax.training import validation
from flamingo_jax.training import workdir as workdir_lib


# Where the data lives and the tokenizer: every stage shares the main run's
# (so that `--config.data.data_dir=...` moves them all, and the LM stage and
# Flamingo read one vocabulary).
SHARED_DATA_FIELDS = ('data_dir', 'tokenizer')


def _finished(stage: ml_collections.ConfigDict, workdir: str) -> bool:
  """Whether `stage` saved and marked its final step in `workdir`."""
  step = workdir_lib.finished_step(workdir)
  if step is None or step < stage.total_steps:
    return False
  if not fs.isdir(fs.join(workdir, 'checkpoints')):
    return False
  return step in checkpoint.saved_steps(workdir)


def stage_config(config: ml_collections.ConfigDict,
                 name: str) -> ml_collections.ConfigDict:
  """Stage `name` of `config.stages`, with the main run's shared data fields."""
  stage = ml_collections.ConfigDict(config.stages[name].to_dict())
  for field in SHARED_DATA_FIELDS:
    if field in config.get('data', {}) and field in stage.get('data', {}):
      stage.data[field] = config.data[field]
  return stage


def stage_order(config: ml_collections.ConfigDict, workdir: str) -> list[str]:
  """The names of `config.stages` in the order they must run.

  Raises:
    ValueError: if stages read each other's checkpoints in a cycle.
  """
  stages = config.get('stages', None) or {}
  stage_dirs = {fs.normpath(fs.join(workdir, name)): name
                for name in stages}

  def reads(cfg, cfg_dir):
    """The stages whose workdirs `cfg`'s init_from sources name, in order."""
    for source in cfg.get('init_from', None) or []:
      path = source['workdir']
      name = stage_dirs.get(fs.normpath(fs.join(cfg_dir, path)))
      if name is not None:
        yield name

  order, visiting = [], []

  def visit(name):
    if name in order:
      return
    if name in visiting:
      raise ValueError(f'Stages read each other\'s checkpoints in a cycle: '
                       f'{" -> ".join(visiting + [name])}.')
    visiting.append(name)
    for dependency in reads(stages[name], fs.join(workdir, name)):
      visit(dependency)
    visiting.pop()
    order.append(name)

  for name in reads(config, workdir):
    visit(name)
  for name in sorted(stages):
    visit(name)
  return order


def run(config: ml_collections.ConfigDict, workdir: str) -> bool:
  """Runs the recipe in `workdir`: its stages, the main stage, evaluation.

  Returns:
    True when everything ran; False when a stage was preempted (SIGTERM or
    Ctrl-C; its state is saved): the caller should exit, and a rerun of the
    same command resumes that stage.
  """
  order = stage_order(config, workdir)
  stages = {name: stage_config(config, name) for name in order}
  for name, stage in stages.items():  # Before anything trains.
    validation.validate_config(stage, f'config.stages.{name}')
  validation.validate_config(config)
  check_stage_parameters(config, stages, workdir)
  with workdir_lib.lock(workdir):
    try:
      _run_stages(config, workdir, stages)
    except loop.Preempted as e:
      logging.warning('%s Rerun the same command to resume it.', e)
      return False
    if config.get('eval') is not None and config.get('evaluate_at_end', True):
      evaluate_final(config, workdir)
    logging.info('Wrote %s', report.write_report(workdir))
  return True


def param_shapes(config: ml_collections.ConfigDict) -> dict[str, tuple]:
  """{'module/param': shape} of `config`'s model (`jax.eval_shape`)."""
  task = loop.task_of(config)
  params = jax.eval_shape(task.transform(config.model).init,
                          jax.random.PRNGKey(0),
                          *task.example_inputs(config.model))
  return {f'{module}/{name}': tuple(leaf.shape)
          for module, leaves in params.items()
          for name, leaf in leaves.items()}


def check_stage_parameters(config: ml_collections.ConfigDict,
                           stages: dict[str, ml_collections.ConfigDict],
                           workdir: str) -> None:
  """Every parameter a run reads from a stage (`init_from`) is one the
  stage's model has, in the same shape: checked before anything trains.

  Raises:
    ValueError: naming the stage, the parameter and both shapes. The usual
      cause: a `--config.model...` override changes the main model, not the
      stages' (each stage's config is built with the config file's).
  """
  stage_dirs = {fs.normpath(fs.join(workdir, name)): name for name in stages}
  runs = [('config', config, workdir)] + [
      (f'config.stages.{name}', stage, fs.join(workdir, name))
      for name, stage in stages.items()]
  shapes = {}
  for label, run_config, run_dir in runs:
    for source in run_config.get('init_from', None) or []:
      name = stage_dirs.get(fs.normpath(fs.join(run_dir, source['workdir'])))
      if name is None:
        continue
      for cfg_key in (label, name):
        if cfg_key not in shapes:
          shapes[cfg_key] = param_shapes(
              run_config if cfg_key == label else stages[name])
      reads = init_from.reads(source)
      for key, shape in shapes[label].items():
        if not reads(key):
          continue
        found = shapes[name].get(key)
        if found != shape:
          raise ValueError(
              f'{label} reads {key} from stage {name!r} (init_from), but '
              f'the stage\'s model ' + (
                  f'has it in shape {found}, not {shape}'
                  if found is not None else 'has no such parameter') +
              f'. A --config.model... override changes the main model only: '
              f'set config.stages.{name}.model... to match.')


def write_plots(workdir: str) -> None:
  """The training loop's `on_finished`: W/plots/ of a finished stage."""
  for path in plots.write_plots(workdir):
    logging.info('Wrote %s', path)


def _run_stages(config, workdir, stages) -> None:
  """Each unfinished stage in order, then the main stage."""
  for name, stage in stages.items():
    stage_dir = fs.join(workdir, name)
    if _finished(stage, stage_dir):
      logging.info('Stage %r already done in %s.', name, stage_dir)
      continue
    logging.info('Stage %r (%d steps) in %s.', name, stage.total_steps,
                 stage_dir)
    loop.train_and_evaluate(stage, stage_dir, on_finished=write_plots)
    if not _finished(stage, stage_dir):  # The loop marks it; never expected.
      raise RuntimeError(f'Stage {name!r} in {stage_dir} ended unfinished.')
  logging.info('Main stage (%d steps) in %s.', config.total_steps, workdir)
  loop.train_and_evaluate(config, workdir, on_finished=write_plots)


def evaluate_final(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Few-shot evaluation of the main stage's last checkpoint into W/eval,
  unless W/eval/results.json already holds that step's results."""
  # pylint: disable=g-import-not-at-top
  import json
  import jax.numpy as jnp
  from flamingo_jax.data import tokenizer as tokenizer_lib
  from flamingo_jax.evaluation import runner
  # pylint: enable=g-import-not-at-top
  step = checkpoint.latest_step(workdir)
  out_dir = fs.join(workdir, 'eval')
  results_path = fs.join(out_dir, 'results.json')
  if fs.exists(results_path):
    if json.loads(fs.read_text(results_path)).get('metadata', {}).get(
        'step') == step:
        logging.info('Few-shot results of step %d already in %s.', step,
                     results_path)
        return
  logging.info('Few-shot evaluation of step %d into %s.', step, out_dir)
  results = runner.evaluate(
      config.eval, checkpoint.load_params(workdir, step), config.model.to_dict(),
      tokenizer_lib.Tokenizer.load(config.data.tokenizer), out_dir=out_dir,
      step=step, compute_dtype=jnp.dtype(config.get('compute_dtype',
                                                    'float32')))
  logging.info('Few-shot scores:\n%s', runner.format_table(results))
