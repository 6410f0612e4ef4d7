"""The recipe's stage order: each stage after the stages it reads."""

import ml_collections
import pytest

from flamingo_jax.orchestration import recipe


def _config(stages, init_from):
  return ml_collections.ConfigDict(dict(
      stages={name: dict(total_steps=1, init_from=[
          dict(workdir=w) for w in reads]) for name, reads in stages.items()},
      init_from=[dict(workdir=w) for w in init_from]))


def test_stages_run_in_init_from_order_after_what_they_read():
  config = _config({'a': ['../b'], 'b': [], 'c': [], 'z': []},
                   ['c', 'gs://bucket/lm', 'a'])
  assert recipe.stage_order(config, 'W') == ['c', 'b', 'a', 'z']


def test_a_cycle_is_named():
  config = _config({'a': ['../b'], 'b': ['../a']}, ['a'])
  with pytest.raises(ValueError, match='a -> b -> a'):
    recipe.stage_order(config, 'W')


def test_stages_share_the_main_runs_data_location_and_tokenizer():
  from experiments import tiny  # pylint: disable=g-import-not-at-top
  config = tiny.get_config('smoke')
  config.data.data_dir = '/elsewhere/world'  # As --config.data.data_dir=...
  config.data.tokenizer = '/elsewhere/tok.model'
  for name in config.stages:
    stage = recipe.stage_config(config, name)
    assert stage.data.data_dir == '/elsewhere/world'
    assert stage.data.tokenizer == '/elsewhere/tok.model'
    # The rest is the stage's own.
    assert stage.task == config.stages[name].task
    assert stage.data.datasets.to_dict() == (
        config.stages[name].data.datasets.to_dict())
