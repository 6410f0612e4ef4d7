"""Multi-stage recipes: each stage of `config.stages` trains in W/<stage>.

  W/lm/        stage 'lm' (e.g. the LM on text)
  W/           the main stage, which may `init_from` the stages' checkpoints

A stage that already reached its total_steps is skipped (its checkpoint is
reused), so rerunning the recipe resumes wherever it stopped.
"""

import os

from absl import logging
import ml_collections

from flamingo_jax import checkpoint
from flamingo_jax.training import loop


def _finished(stage: ml_collections.ConfigDict, workdir: str) -> bool:
  directory = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(directory):
    return False
  steps = checkpoint.Checkpointer(directory, save_every=1).all_steps()
  return bool(steps) and max(steps) >= stage.total_steps


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
  stages = config.get('stages', None) or {}
  for name, stage in stages.items():
    stage_dir = os.path.join(workdir, name)
    if _finished(stage, stage_dir):
      logging.info('Stage %r already done in %s.', name, stage_dir)
      continue
    logging.info('Stage %r (%d steps) in %s.', name, stage.total_steps,
                 stage_dir)
    loop.train_and_evaluate(stage, stage_dir)
  logging.info('Main stage (%d steps) in %s.', config.total_steps, workdir)
  loop.train_and_evaluate(config, workdir)
