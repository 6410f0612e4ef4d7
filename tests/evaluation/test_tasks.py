"""Evaluation tasks: the paper's prompt strings, specs, the default config."""

import numpy as np
import pytest

from flamingo_jax.evaluation import configs as eval_configs
from flamingo_jax.evaluation import tasks

IMAGE = np.zeros([8, 8, 3], np.uint8)


def test_captioning_example_uses_the_papers_prompt():
  example = tasks.make_example('captioning', {
      'image': IMAGE, 'captions': [b'A red circle.', b'One red disc.']})
  assert example.shot == '<image>Output: A red circle.<EOC>'
  assert example.query == '<image>Output:'
  assert example.target == ['A red circle.', 'One red disc.']
  assert tasks.text_only(example) == 'Output: A red circle.<EOC>'


@pytest.mark.parametrize('kind, target', [
    ('vqa', ['red', 'red', 'pink']), ('video_qa', 'red')])
def test_qa_example_uses_the_papers_prompt(kind, target):
  raw = {'question': b'What colour is it?', 'answer': b'red',
         'answers': [b'red', b'red', b'pink'],
         'image': IMAGE, 'video': [IMAGE] * 4}
  example = tasks.make_example(kind, raw)
  assert example.shot == '<image>Question: What colour is it? Answer: red<EOC>'
  assert example.query == '<image>Question: What colour is it? Answer:'
  assert example.target == target


def test_classification_example_is_a_caption_of_the_class_name():
  example = tasks.make_example('classification', {
      'image': IMAGE, 'label': 3, 'label_name': b'red circle'})
  assert example.shot == '<image>Output: red circle<EOC>'
  assert example.query == '<image>Output:'
  assert example.target == 'red circle'


def _episode():
  item = lambda words, texts: {'image': [IMAGE] * len(words), 'word': words,
                               'text': texts, 'value': ['x'] * len(words)}
  return {'template': b'Look, a {}!', 'words': [b'blicket', b'zorp'],
          'attribute': b'shape',
          'support': item([b'blicket', b'zorp'],
                          [b'Look, a blicket!', b'Look, a zorp!']),
          'query': item([b'zorp'], [b'Look, a zorp!'])}


def test_nonce_queries_carry_the_episode_support():
  (query,) = tasks.nonce_queries(_episode())
  assert query.query == '<image>Look, a'
  assert query.target == 'zorp'
  assert [s.shot for s in query.support] == [
      '<image>Look, a blicket!<EOC>', '<image>Look, a zorp!<EOC>']
  assert [s.target for s in query.support] == ['blicket', 'zorp']
  # Close-ended (nonce_choice): the episode's words, as its template ends.
  assert query.choices == ('blicket', 'zorp')
  assert query.choice_format.format('zorp') == ' zorp!<EOC>'


@pytest.mark.parametrize('spec, match', [
    ({'dataset': 'world_vqa', 'kind': 'poetry'}, "Task 't': unknown kind"),
    ({'dataset': 'world_vqa', 'kind': 'vqa', 'metric': 'bleu'},
     "Task 't': unknown metric 'bleu'"),
    ({'kind': 'vqa'}, "Task 't' names no dataset"),
    ({'dataset': 'world_vqa', 'kind': 'nonce'}, 'world_nonce'),
    ({'dataset': 'world_vqa', 'kind': 'nonce_choice'}, 'world_nonce'),
])
def test_bad_specs_are_named(spec, match):
  with pytest.raises(ValueError, match=match):
    tasks.check_spec('t', spec)


def test_metrics_are_on_the_papers_scale():
  assert tasks.METRICS['exact_match'](['Two', 'x'], ['2', 'y']) == 50.0
  assert tasks.METRICS['top1'](['a', 'b'], ['a', 'b']) == 100.0
  assert tasks.METRICS['vqa_accuracy'](['red'], [['red'] * 10]) == 100.0
  assert tasks.METRICS['cider'](['a red circle'], [['a red circle']]) >= 0


def test_okvqa_task_scores_stemmed_with_its_raw_answers():
  raw = {'question': b'What sport?', 'answer': b'race', 'image': IMAGE,
         'answers': [b'race'] * 9 + [b'fli'],
         'raw_answers': [b'racing'] * 9 + [b'flying']}
  query = tasks.make_example('vqa', raw)
  assert query.raw_answers == ('racing',) * 9 + ('flying',)
  task = tasks.Task(name='okvqa', dataset='vqa/okvqa', kind='vqa',
                    metric='okvqa_accuracy', frames=1, queries=[query] * 2,
                    support=[])
  assert task.score(['Racing', 'flying']) == pytest.approx((100 + 30) / 2)
  task.metric = 'vqa_accuracy'
  assert task.score(['racing']) == 0.0
  task.vqa_eval_version = '2021'
  assert task.score(['race']) == 100.0
  with pytest.raises(ValueError, match="vqa_eval_version must be one of"):
    tasks.check_spec('t', {'dataset': 'world_vqa', 'kind': 'vqa',
                           'vqa_eval_version': 'latest'})


def test_default_eval_config_covers_every_kind():
  config = eval_configs.default_eval_config('/data', reference={'vqa': 10.0})
  assert {spec['kind'] for spec in config.tasks.values()} == set(tasks.KINDS)
  for name, spec in config.tasks.items():
    tasks.check_spec(name, spec)
  assert list(config.shots) == [0, 4, 8]
  assert config.decoding.beam_size == 3
  assert config.reference.vqa == 10.0
  assert config.zero_shot_examples == 2
