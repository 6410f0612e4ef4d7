r"""Few-shot evaluation of a trained workdir: python -m flamingo_jax.evaluate.

  python -m flamingo_jax.evaluate --workdir /tmp/w
  python -m flamingo_jax.evaluate --workdir /tmp/w --shots 0,4,8 \
      --tasks captions,nonce --num_queries 64 --rices

Reads the run's config (W/config.json, or --config experiments/tiny.py with
`--config.eval.x=...` overrides), its latest checkpoint (or --step) and the
tokenizer of config.data.tokenizer; builds the embedded world's evaluation
datasets if they are missing; runs every task of config.eval x every shots
(`evaluation/runner.py` describes the protocol) and writes

  W/eval/results.json   {'scores': {task: {shots: score}}, 'overall': ...,
                         'overall_score': ..., 'answer_types': {task:
                         {shots: {'yes/no': ..., 'number': ..., 'other':
                         ...}}}, 'vqa_results': ..., 'metadata': {step, ...}}
  W/eval/scores.png     score vs shots, one panel per task
  W/eval/predictions/   per task and shots: prompt, generation, target
  W/eval/vqa_results/   VQA tasks without answers (VQAv2 test-dev), or all
                        with --vqa_results: the evaluation server's file
  W/eval/cache/         RICES vision features (re-runs skip the encoding)

and prints a table of the scores (VQAv2: one row per answer type). A config
whose `eval` names no tasks (an older run, or a checkpoint converted by
`flamingo_jax.weights.convert`) gets `evaluation.configs.default_eval_config`:
the embedded world's tasks, in --data_dir (default the world's cache).
"""

import json
import os

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags

from flamingo_jax import cli
from flamingo_jax import fs

_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'The training workdir: W/config.json and '
    'W/checkpoints/ are read, W/eval/ is written.')
_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'A config file to use instead of W/config.json, e.g. '
    'experiments/tiny.py (overrides: --config.eval.num_queries=8).',
    lock_config=False)
_SHOTS = flags.DEFINE_list(
    'shots', None, 'Numbers of shots, e.g. 0,4,8 (default: config.eval.shots).')
_TASKS = flags.DEFINE_list(
    'tasks', None, 'Tasks to run, e.g. captions,vqa (default: all of '
    'config.eval.tasks).')
_NUM_QUERIES = flags.DEFINE_integer(
    'num_queries', None, 'Queries per task (default: config.eval.num_queries).')
_RICES = flags.DEFINE_boolean(
    'rices', None, 'Retrieve the shots by vision-feature similarity (RICES) '
    'instead of at random (default: config.eval.rices).')
_VQA_RESULTS = flags.DEFINE_boolean(
    'vqa_results', None, 'Also write the VQA evaluation server\'s results '
    'file (W/eval/vqa_results/) for VQA tasks with answers; a split without '
    'answers (test-dev) always gets one (default: config.eval.vqa_results).')
_DATA_DIR = flags.DEFINE_string(
    'data_dir', None, 'Where the evaluation datasets are (the embedded '
    "world's are built there if missing); default config.eval.data_dir, "
    "else config.data.data_dir, else the world's cache "
    '(~/.cache/flamingo_jax/world): a converted checkpoint has none.')
_SIZES = flags.DEFINE_enum(
    'sizes', None, ['default', 'tiny'], "The world's split table, for the "
    "world's datasets (default: config.eval.sizes, else 'default').")
_STEP = flags.DEFINE_integer(
    'step', None, 'Checkpoint step to evaluate (default: the latest).')
_OUT = flags.DEFINE_string(
    'out_dir', None, 'Where to write the results (default: W/eval).')
flags.mark_flag_as_required('workdir')


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """--config if given, else W/config.json, with an `eval` section."""
  if _CONFIG.value is not None:
    config = _CONFIG.value
  else:
    path = fs.join(workdir, 'config.json')
    if not fs.exists(path):
      raise FileNotFoundError(f'No {path}: pass --config, or a workdir made '
                              'by flamingo_jax.train.')
    config = ml_collections.ConfigDict(json.loads(fs.read_text(path)))
  if config.get('task', 'flamingo') != 'flamingo':
    raise ValueError(f'{workdir} trained a {config.task!r} model; evaluate a '
                     'Flamingo workdir (the recipe\'s top-level W).')
  config.eval = _eval_section(config)
  return config


def _eval_section(config: ml_collections.ConfigDict
                  ) -> ml_collections.ConfigDict:
  """config.eval, with --data_dir / --sizes. A config without one, or with
  one that names no tasks (an older run; a converted checkpoint, whose eval
  section holds only max_len), gets `default_eval_config`'s world tasks,
  its own fields kept over the defaults."""
  given = config.get('eval', None) or ml_collections.ConfigDict()
  data = config.get('data', None) or ml_collections.ConfigDict()
  data_dir = (_DATA_DIR.value or given.get('data_dir', None)
              or data.get('data_dir', None))
  sizes = _SIZES.value or given.get('sizes', None) or data.get('sizes',
                                                               'default')
  if 'tasks' in given:
    section = ml_collections.ConfigDict(given.to_dict())
  else:
    # pylint: disable=g-import-not-at-top
    from flamingo_jax.data import prepare
    from flamingo_jax.evaluation import configs as eval_configs
    # pylint: enable=g-import-not-at-top
    logging.info('The config names no evaluation tasks; using '
                 'evaluation.configs.default_eval_config (the world\'s).')
    frames = [spec.frames for spec in data.get('datasets', {}).values()
              if spec.frames > 1]
    section = eval_configs.default_eval_config(
        data_dir or prepare.default_world_dir(), sizes=sizes,
        image_size=config.model.image_size, frames=max(frames or [4]))
    section.update(given.to_dict())
  if data_dir:
    section.data_dir = data_dir
  section.sizes = sizes
  return section


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not jax.config.jax_compilation_cache_dir:
    # Re-runs skip recompiling the decoders (tens of seconds on a CPU).
    jax.config.update('jax_compilation_cache_dir', os.path.join(
        os.path.expanduser('~'), '.cache', 'flamingo_jax', 'jax_cache'))
  # pylint: disable=g-import-not-at-top
  from flamingo_jax import checkpoint
  from flamingo_jax.data import tokenizer as tokenizer_lib
  from flamingo_jax.evaluation import runner
  # pylint: enable=g-import-not-at-top
  workdir = _WORKDIR.value
  config = load_config(workdir)
  unknown = sorted(set(_TASKS.value or ()) - set(config.eval.tasks))
  if unknown:  # Before loading anything.
    raise ValueError(f'Unknown tasks {unknown}; config.eval.tasks has '
                     f'{sorted(config.eval.tasks)}.')
  step = (_STEP.value if _STEP.value is not None
          else checkpoint.latest_step(workdir))
  logging.info('Evaluating %s at step %d.', workdir, step)
  params = checkpoint.load_params(workdir, step)
  tokenizer = tokenizer_lib.Tokenizer.load(config.data.tokenizer)
  out_dir = _OUT.value or fs.join(workdir, 'eval')
  shots = [int(s) for s in _SHOTS.value] if _SHOTS.value else None
  results = runner.evaluate(
      config.eval, params, config.model, tokenizer, out_dir=out_dir,
      task_names=_TASKS.value, step=step,
      compute_dtype=jnp.dtype(config.get('compute_dtype', 'float32')),
      shots=shots, num_queries=_NUM_QUERIES.value, rices=_RICES.value,
      vqa_results=_VQA_RESULTS.value)
  table = runner.format_table(results)
  print(table)
  if results['overall_score'] is not None:
    print(f'overall score ({results["metadata"]["overall_shots"]}-shot, '
          f'vs config.eval.reference): {100 * results["overall_score"]:.1f}%')
  logging.info('Wrote %s', fs.join(out_dir, 'results.json'))


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
