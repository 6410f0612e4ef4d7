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


def test_a_model_override_the_stages_lack_is_named_before_training(tmp_path):
  """--config.model.lm.num_layers=2 changes the main model, not the LM stage
  it reads: the recipe says so before any stage trains."""
  from experiments import tiny  # pylint: disable=g-import-not-at-top
  config = tiny.get_config('smoke')
  stages = {name: recipe.stage_config(config, name) for name in config.stages}
  recipe.check_stage_parameters(config, stages, str(tmp_path))  # Matches.
  config.model.lm.num_layers = 2
  with pytest.raises(ValueError, match=r"lm/blocks/.* from stage 'lm'.*"
                     r"\(4, 64\), not \(2, 64\).*config\.stages\.lm\.model"):
    recipe.run(config, str(tmp_path))
  assert not (tmp_path / 'lm').exists() and not (tmp_path / 'vision').exists()
