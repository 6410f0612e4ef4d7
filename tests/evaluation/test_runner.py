"""The few-shot protocol: shot sampling, prompts, RICES order, end to end."""

import json
import os

import jax
import numpy as np
import pytest

from flamingo_jax.data import world
from flamingo_jax.evaluation import rices
from flamingo_jax.evaluation import runner
from flamingo_jax.evaluation import configs as eval_configs
from flamingo_jax.evaluation import tasks
from flamingo_jax.models import flamingo
from tests.data import test_tokenizer

IMAGE = np.zeros([8, 8, 3], np.uint8)


def _caption_task(num_support=5, num_queries=2):
  support = [tasks.Example(np.full([8, 8, 3], i, np.uint8),
                           f'<image>Output: caption {i}.<EOC>',
                           '<image>Output:', [f'caption {i}.'])
             for i in range(num_support)]
  queries = [tasks.Example(IMAGE, '', '<image>Output:', ['q'])
             for _ in range(num_queries)]
  return tasks.Task('caps', 'world_captions', 'captioning', 'cider', 1,
                    queries, support)


def test_sample_support_is_deterministic_per_seed():
  draw = lambda seed, query=0: runner.sample_support(
      100, 8, seed=seed, task='caps', query=query)
  np.testing.assert_array_equal(draw(0), draw(0))
  assert len(set(draw(0).tolist())) == 8  # Without replacement.
  assert draw(0).tolist() != draw(1).tolist()
  assert draw(0).tolist() != draw(0, query=1).tolist()
  repeated = runner.sample_support(3, 7, seed=0, task='nonce', query=0,
                                   repeat=True)
  assert sorted(repeated[:6].tolist()) == [0, 0, 1, 1, 2, 2]


def test_impossible_shots_name_the_task():
  with pytest.raises(ValueError, match="Task 'caps': 4 shots .* support set "
                     'is empty'):
    runner.sample_support(0, 4, seed=0, task='caps', query=0)
  with pytest.raises(ValueError, match="Task 'caps': 8 shots .* only 5 "
                     'support'):
    runner.check_shots(_caption_task(), [0, 8])


def test_zero_shot_prompt_is_two_text_only_examples():
  task = _caption_task()
  settings = runner.Settings(seed=3)
  shots, zero = runner.choose_shots(task, 0, 0, settings)
  assert not shots and len(zero) == 2
  prompt = runner.build_prompt(task.queries[0], shots, zero_shot=zero)
  i, j = runner.sample_support(5, 2, seed=3, task='caps', query=0)
  assert prompt.text == (f'Output: caption {i}.<EOC>Output: caption {j}.<EOC>'
                         '<image>Output:')
  assert len(prompt.media) == 1 and prompt.media[0] is IMAGE


def test_two_shot_prompt_is_the_shots_then_the_query():
  task = _caption_task()
  shots, zero = runner.choose_shots(task, 1, 2, runner.Settings(seed=3))
  prompt = runner.build_prompt(task.queries[1], shots, zero_shot=zero)
  i, j = runner.sample_support(5, 2, seed=3, task='caps', query=1)
  assert prompt.text == (f'<image>Output: caption {i}.<EOC>'
                         f'<image>Output: caption {j}.<EOC><image>Output:')
  assert [int(m[0, 0, 0]) for m in prompt.media[:2]] == [i, j]


def test_rices_prompt_puts_the_most_similar_shot_last():
  task = _caption_task()
  support = np.eye(5, dtype=np.float32)
  query = np.array([[0.1, 0.2, 0.9, 0.0, 0.5]], np.float32)
  query /= np.linalg.norm(query)
  retrieved = rices.nearest(query, support, 3)[0]
  shots, _ = runner.choose_shots(task, 0, 3, runner.Settings(),
                                 retrieved=retrieved)
  prompt = runner.build_prompt(task.queries[0], shots)
  assert prompt.text == ('<image>Output: caption 1.<EOC>'
                         '<image>Output: caption 4.<EOC>'
                         '<image>Output: caption 2.<EOC><image>Output:')


@pytest.mark.parametrize('text, kind, expected', [
    (' Two red circles.<EOC> junk', 'captioning', 'Two red circles.'),
    (' Yes<EOC>', 'vqa', 'yes'),
    (' Red Question: what?', 'video_qa', 'red'),
    (' Blicket! Look', 'nonce', 'blicket'),
])
def test_postprocess(text, kind, expected):
  assert runner.postprocess(text, kind) == expected


def test_overall_score_and_table():
  results = {'scores': {'a': {'0': 10.0, '4': 20.0}, 'b': {'0': 5.0,
                                                          '4': 5.0}}}
  overall = runner.overall_scores(results['scores'],
                                  {'a': {'4': 10.0}, 'b': 10.0})
  # 0-shot: only b has a reference (5 / 10); 4-shot: mean(20 / 10, 5 / 10).
  assert overall == {'0': 0.5, '4': 1.25}
  results['overall'] = overall
  table = runner.format_table(results)
  assert '4-shot' in table and '125.0%' in table


def test_settings_overrides_and_checks():
  config = eval_configs.default_eval_config('/d')
  settings = runner.Settings.from_config(config, shots=[0, 2], rices=None)
  assert settings.shots == (0, 2) and settings.beam_size == 3
  assert not settings.rices
  with pytest.raises(ValueError, match='batch_size must be >= 1'):
    runner.Settings.from_config(config, batch_size=0)


# ----------------------------------------------------------- end to end --


def random_params(config, seed=0):
  """Random weights of the model's shapes, without compiling its init.

  (`jax.jit(init)` of the tiny Flamingo takes ~30 s on a busy 2-core CPU.)
  Gates and biases 0 as at init, norms' scales 1, the rest ~ N(0, 1/fan_in).
  """
  rng = np.random.default_rng(seed)

  def leaf(path, abstract):
    name = str(path[-1].key)
    shape = abstract.shape
    if name in ('scale', 'gain'):
      return np.ones(shape, abstract.dtype)
    if name.endswith('_gate') or name in ('b', 'offset') or len(shape) < 2:
      return np.zeros(shape, abstract.dtype)
    std = 1.0 / np.sqrt(shape[-2])
    return (rng.normal(size=shape) * std).astype(abstract.dtype)

  return jax.tree_util.tree_map_with_path(
      leaf, flamingo.abstract_params(config))

TASKS = ('world_captions', 'world_classification', 'world_nonce')


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp('world')
  world.build_all(data_dir, 'tiny', datasets=TASKS, num_workers=1,
                  log=lambda line: None)
  tokenizer = test_tokenizer.train_tiny_tokenizer()
  config = flamingo.model_config('tiny')
  params = random_params(config)
  eval_config = eval_configs.default_eval_config(
      str(data_dir), sizes='tiny', shots=(0, 2), num_queries=3, batch_size=2)
  eval_config.tasks = {k: v for k, v in eval_config.tasks.items()
                       if v['dataset'] in TASKS}
  eval_config.decoding.max_new_tokens = 4
  eval_config.rices = True
  eval_config.ensemble = 2
  eval_config.reference = {'captions': 1.0, 'classification': {'2': 50.0}}
  return eval_config, params, config, tokenizer


def test_unknown_task_is_named(setup):
  eval_config, params, config, tokenizer = setup
  with pytest.raises(ValueError, match=r"Unknown tasks \['bogus'\]"):
    runner.evaluate(eval_config, params, config, tokenizer,
                    task_names=['captions', 'bogus'])


def test_evaluate_end_to_end(setup, tmp_path):
  eval_config, params, config, tokenizer = setup
  out = str(tmp_path / 'eval')
  lines = []
  results = runner.evaluate(eval_config, params, config, tokenizer,
                            out_dir=out, step=7, log=lines.append)
  assert set(results['scores']) == {'captions', 'classification', 'nonce',
                                    'nonce_choice'}
  for task, by_shots in results['scores'].items():
    assert set(by_shots) == {'0', '2'}, task
    for score in by_shots.values():
      assert 0.0 <= score <= (1000.0 if task == 'captions' else 100.0)
  assert results['metadata']['num_queries'] == {
      'captions': 3, 'classification': 3, 'nonce': 3, 'nonce_choice': 3}
  assert results['metadata']['step'] == 7 and results['metadata']['rices']
  assert set(results['overall']) <= {'0', '2'}
  with open(os.path.join(out, 'results.json')) as f:
    assert json.load(f)['scores'] == results['scores']
  assert os.path.getsize(os.path.join(out, 'scores.png')) > 1000
  assert len(os.listdir(os.path.join(out, 'predictions'))) == 8
  cached = sorted(os.listdir(os.path.join(out, 'cache')))
  # One query and one support file per dataset: nonce and nonce_choice,
  # both on world_nonce, share theirs.
  assert len(cached) == 6 and all(c.endswith('.npy') for c in cached)
  assert sum(c.startswith('world_nonce_') for c in cached) == 2
  features = np.load(os.path.join(out, 'cache', cached[0]))  # The encoder's.
  np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, rtol=1e-5)
  assert any('2-shot' in line and 'ETA' in line for line in lines)
  with open(os.path.join(out, 'predictions', 'nonce_2shot.jsonl')) as f:
    record = json.loads(f.readline())
  assert record['prompt'].count('<image>') == 3
  # Close-ended nonce: each query picks one of its own episode's words.
  queries = tasks.load_task('nonce_choice', eval_config.tasks.nonce_choice,
                            data_dir=eval_config.data_dir, sizes='tiny',
                            image_size=eval_config.image_size, num_queries=3)
  with open(os.path.join(out, 'predictions', 'nonce_choice_2shot.jsonl')) as f:
    records = [json.loads(line) for line in f]
  for record, query in zip(records, queries.queries, strict=True):
    assert record['prediction'] in query.choices
    assert record['target'] == query.target in query.choices
  # A re-run reads the cached features and gives the same scores.
  mtimes = [os.path.getmtime(os.path.join(out, 'cache', c)) for c in cached]
  again = runner.evaluate(eval_config, params, config, tokenizer,
                          out_dir=out, step=7, log=lambda line: None)
  assert again['scores'] == results['scores']
  assert mtimes == [os.path.getmtime(os.path.join(out, 'cache', c))
                    for c in cached]


def test_choices_are_per_query_or_the_shared_class_names(setup):
  eval_config, params, config, tokenizer = setup
  evaluator = runner.Evaluator(
      params, config, tokenizer, runner.Settings.from_config(eval_config),
      image_size=eval_config.image_size)
  image = np.zeros([8, 8, 3], np.uint8)
  own = [tasks.Example(image, '', '<image>Look, a', 'zorp',
                       choices=('blicket', 'zorp'),
                       choice_format=' {}!<EOC>'),
         tasks.Example(image, '', '<image>It is', 'dax',
                       choices=('dax', 'wug', 'fep'))]
  task = tasks.Task('t', 'world_nonce', 'nonce_choice', 'top1', 1, own, [])
  choices = evaluator._choices(task)  # pylint: disable=protected-access
  assert choices.tokens.shape[:2] == (2, 3)  # Padded to the most choices.

  def text(query, index):
    tokens, valid = choices.of([query])
    return tokenizer.decode(tokens[0, index][valid[0, index]])

  assert text(0, 1).strip() == 'zorp!<EOC>'
  assert text(0, 2) == text(0, 0)  # The padding repeats the first choice.
  assert text(1, 1).strip() == 'wug<EOC>'
  assert [choices.label(1, i) for i in range(3)] == ['dax', 'wug', 'fep']

  shared = tasks.Task('c', 'world_classification', 'classification', 'top1',
                      1, [tasks.Example(image, '', '<image>Output:', 'b')] * 5,
                      [], class_names=('a', 'b'))
  choices = evaluator._choices(shared)  # pylint: disable=protected-access
  assert choices.tokens.shape[:2] == (1, 2)  # One row, whatever the queries.
  assert choices.of([0, 4])[0].shape[:2] == (2, 2)
  assert choices.label(4, 1) == 'b'
