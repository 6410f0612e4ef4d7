"""Questions about scenes have right answers; annotator answers vary."""

import collections

import numpy as np
import pytest

from flamingo_jax.data.world import language
from flamingo_jax.data.world import questions
from flamingo_jax.data.world import scenes


def _scenes(num, split='train'):
  for index in range(num):
    rng = scenes.example_rng('test_language', split, index)
    yield scenes.sample_scene(rng), rng


def _subject(question):
  """The definite noun phrase a question asks about."""
  phrases = language.parse(question).phrases
  return [p for p in phrases if p.count is None]


def test_attribute_and_position_answers_are_right():
  seen = collections.Counter()
  for scene, rng in _scenes(200, 'qa'):
    for qtype in ('colour', 'shape', 'size', 'texture', 'position'):
      try:
        qa = questions.question(scene, rng, qtype)
      except ValueError:  # No object can be told apart from the others.
        assert qtype == 'position'
        continue
      assert qa.qtype == qtype
      (subject,) = _subject(qa.question)
      selected = subject.desc.select(scene.objects)
      assert selected, qa
      attr = 'region' if qtype == 'position' else qtype
      assert {getattr(o, attr) for o in selected} == {qa.answer}, qa
      seen[qtype] += 1
  assert min(seen.values()) > 120


def test_count_exists_and_relation_answers_are_right():
  answers = collections.Counter()
  for scene, rng in _scenes(200, 'qa2'):
    qa = questions.question(scene, rng, 'count')
    text = 'two ' + qa.question.lower().removeprefix('how many ')
    for verb in (' are there', ' are in the picture', ' can you see', ' are'):
      text = text.replace(verb, '')
    (phrase,) = language.parse(text).phrases  # 'two red squares on the left'
    assert str(phrase.desc.count(scene.objects)) == qa.answer, qa
    qa = questions.question(scene, rng, 'exists')
    answers[qa.answer] += 1
    text = qa.question.lower().replace('any ', 'two ')
    (phrase,) = language.parse(text).phrases
    assert (phrase.desc.count(scene.objects) > 0) == (qa.answer == 'yes'), qa
    try:
      qa = questions.question(scene, rng, 'relation')
    except ValueError:  # Fewer than two objects that can be told apart.
      pass
    else:
      (a, b) = _subject(qa.question)
      (rel,) = [t[1] for t in language.lex(qa.question)
                if t[0] == 'relation']
      holds = language.relation_holds(a.desc.select(scene.objects), rel,
                                      b.desc.select(scene.objects))
      assert holds == (qa.answer == 'yes'), qa
      answers['relation ' + qa.answer] += 1
  # Yes/no answers are roughly balanced.
  assert answers['yes'] > 60 and answers['no'] > 60
  assert answers['relation yes'] > 40 and answers['relation no'] > 40


def test_human_answers():
  rng = np.random.default_rng(0)
  for answer, qtype in (('2', 'count'), ('red', 'colour'), ('yes', 'exists'),
                        ('top left', 'position')):
    answers = questions.human_answers(answer, qtype, rng)
    assert len(answers) == 10
    assert answers.count(answer) >= 3
  many = [questions.human_answers('2', 'count', rng) for _ in range(100)]
  flat = [a for answers in many for a in answers]
  assert 'two' in flat and ('1' in flat or '3' in flat)  # Variants, errors.


def test_unknown_question_type_raises():
  scene, rng = next(_scenes(1))
  with pytest.raises(ValueError, match='Unknown question type'):
    questions.question(scene, rng, 'mood')
