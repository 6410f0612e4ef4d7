"""The runner's outputs: VQAv2 answer types and the server's results file.

A tiny VQAv2 in its published layout (val2014 with answers, test-dev2015
questions only) is built with the `vqa` format and evaluated with canned
generations (the model is not run), so the scores are known exactly.
"""

import json
import os

import pytest

from flamingo_jax.data import formats
from flamingo_jax.evaluation import results as results_lib
from flamingo_jax.evaluation import runner
from flamingo_jax.evaluation import shots as shots_lib
from flamingo_jax.evaluation import configs as eval_configs
from flamingo_jax.evaluation import tasks
from flamingo_jax.models import flamingo
from tests.data import test_tokenizer
from tests.data.formats import util

# (question, answer_type, the 10 annotators' answers, canned prediction).
VAL = [('is it a cat', 'yes/no', ['yes'] * 10, 'Yes'),  # 1.0
       ('is it a dog', 'yes/no', ['no'] * 10, 'yes'),  # 0.0
       ('how many cats', 'number', ['2'] * 10, 'two'),  # 1.0 (2016 code)
       ('what color', 'other', ['red'] * 3 + ['blue'] * 7, 'red')]  # 0.9
TEST_DEV = [('why is it here', 'because'), ('who is it', 'a cat')]


def _write_vqav2(src):
  """v2_* question/annotation files and COCO images, as distributed."""

  def write(subset, rows, with_answers):
    questions = [{'image_id': i + 1, 'question': f'{row[0]}?',
                  'question_id': 100 * (i + 1) + 7}
                 for i, row in enumerate(rows)]
    util.write(src / f'v2_OpenEnded_mscoco_{subset}_questions.json',
               json.dumps({'data_subtype': subset, 'questions': questions}))
    if with_answers:
      annotations = [{
          'question_id': q['question_id'], 'image_id': q['image_id'],
          'question_type': 'what', 'answer_type': row[1],
          'multiple_choice_answer': row[2][-1],
          'answers': [{'answer': a, 'answer_id': k + 1,
                       'answer_confidence': 'yes'}
                      for k, a in enumerate(row[2])]}
                     for q, row in zip(questions, rows)]
      util.write(src / f'v2_mscoco_{subset}_annotations.json',
                 json.dumps({'annotations': annotations}))
    images = 'test2015' if subset.startswith('test') else subset
    for q in questions:
      util.write(src / images / f'COCO_{images}_{q["image_id"]:012d}.jpg',
                 util.encode(util.image(q['image_id'], 8, 8)))

  write('train2014', VAL[:2], True)
  write('val2014', VAL, True)
  write('test-dev2015', TEST_DEV, False)


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp('vqav2')
  _write_vqav2(root / 'src')
  formats.build('vqa', str(root / 'src'), str(root / 'tfds'), name='vqav2',
                subsets={'support': 'train2014', 'query': 'val2014',
                         'test': 'test-dev2015'}, log=lambda line: None)
  eval_config = eval_configs.default_eval_config(
      str(root / 'tfds'), shots=(0, 1), num_queries=None, batch_size=1,
      image_size=8, tasks={
          'vqav2': dict(dataset='vqa/vqav2', kind='vqa'),
          'vqav2_test_dev': dict(dataset='vqa/vqav2', kind='vqa',
                                 query_split='test')})
  return eval_config, test_tokenizer.train_tiny_tokenizer()


def _canned(monkeypatch):
  """Generations by the query's question (the prompt's last one)."""
  answers = {q: p for q, _, _, p in VAL} | dict(TEST_DEV)

  def generate(self, task, batch):
    del task
    (row,) = batch['tokens'][:, batch['valid'][0]]
    question = self.tokenizer.decode(row).split('Question:')[-1]
    return [answers[question.split('?')[0].strip()] + '<EOC>']

  monkeypatch.setattr(runner.Evaluator, '_generate', generate)


def _evaluate(setup, out, **overrides):
  eval_config, tokenizer = setup
  return runner.evaluate(eval_config, {}, flamingo.model_config('tiny'),
                         tokenizer, out_dir=str(out), log=lambda line: None,
                         **overrides)


def test_vqav2_answer_types_and_test_dev_server_file(setup, tmp_path,
                                                     monkeypatch):
  _canned(monkeypatch)
  results = _evaluate(setup, tmp_path)
  # Test-dev has no answers: no score, the server's file instead.
  assert set(results['scores']) == {'vqav2'}
  expected = {'overall': 72.5, 'yes/no': 50.0, 'number': 100.0,
              'other': 90.0}
  for shots in ('0', '1'):
    assert results['scores']['vqav2'][shots] == pytest.approx(72.5)
    assert results['answer_types']['vqav2'][shots] == pytest.approx(
        expected)
  assert results['vqa_results'] == {'vqav2_test_dev': {
      '0': 'vqa_results/vqav2_test_dev_0shot.json',
      '1': 'vqa_results/vqav2_test_dev_1shot.json'}}
  with open(tmp_path / 'vqa_results' / 'vqav2_test_dev_1shot.json') as f:
    server = json.load(f)
  assert sorted(server, key=lambda r: r['question_id']) == [
      {'question_id': 107, 'answer': 'because'},
      {'question_id': 207, 'answer': 'a cat'}]
  with open(tmp_path / 'results.json') as f:
    written = json.load(f)
  assert written['answer_types'] == results['answer_types']
  assert written['vqa_results'] == results['vqa_results']
  with open(tmp_path / 'predictions' / 'vqav2_0shot.jsonl') as f:
    ids = sorted(json.loads(line)['question_id'] for line in f)
  assert ids == [107, 207, 307, 407]
  table = runner.format_table(results)
  lines = {line.split()[0]: line for line in table.splitlines()}
  assert lines['yes/no'].split()[-2:] == ['50.00', '50.00']
  assert lines['number'].split()[-1] == '100.00'
  assert lines['other'].split()[-1] == '90.00'
  assert 'no answers: server results in vqa_results/' in (
      lines['vqav2_test_dev'])


def test_vqa_results_flag_writes_the_file_of_answered_tasks(setup, tmp_path,
                                                            monkeypatch):
  _canned(monkeypatch)
  results = _evaluate(setup, tmp_path, task_names=['vqav2'], shots=[0],
                      vqa_results=True)
  assert results['vqa_results'] == {'vqav2': {
      '0': 'vqa_results/vqav2_0shot.json'}}
  with open(tmp_path / 'vqa_results' / 'vqav2_0shot.json') as f:
    server = {r['question_id']: r['answer'] for r in json.load(f)}
  assert server == {107: 'yes', 207: 'yes', 307: 'two', 407: 'red'}
  assert not os.path.exists(tmp_path / 'vqa_results' /
                            'vqav2_test_dev_0shot.json')  # Not asked for.


def test_a_vqa_split_without_answers_is_not_scored():
  example = tasks.make_example('vqa', {
      'image': None, 'question': 'q', 'answer': '', 'answers': [],
      'id': 3, 'answer_type': b''})
  assert (example.target, example.question_id, example.answer_type) == (
      [], 3, '')
  task = tasks.Task('t', 'd', 'vqa', 'vqa_accuracy', 1, [example], [])
  assert not task.answered and task.score_by_answer_type(['x']) is None


def test_runner_still_exports_the_names_moved_to_shots_and_results():
  for name in ('Prompt', 'Retriever', 'build_prompt', 'check_shots',
               'choose_shots', 'query_rng', 'sample_support'):
    assert getattr(runner, name) is getattr(shots_lib, name), name
  for name in ('format_table', 'overall_scores', 'write_vqa_results'):
    assert getattr(runner, name) is getattr(results_lib, name), name
