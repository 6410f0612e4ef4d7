"""Captions parse back to the scene's facts; questions have right answers."""

import collections

import numpy as np
import pytest

from flamingo_jax.data.world import language
from flamingo_jax.data.world import scenes


def _scenes(num, split='train'):
  for index in range(num):
    rng = scenes.example_rng('test_language', split, index)
    yield scenes.sample_scene(rng), rng


def _check_facts(text, scene):
  parsed = language.parse(text)
  assert parsed.phrases, text
  for phrase in parsed.phrases:
    assert phrase.count == phrase.desc.count(scene.objects), (text, phrase)
  for a, relation, b in parsed.relations:
    assert language.relation_holds(
        parsed.phrases[a].desc.select(scene.objects), relation,
        parsed.phrases[b].desc.select(scene.objects)), text
  if parsed.tone:
    assert parsed.tone == scene.background.tone, text
  return parsed


def test_captions_parse_back_to_scene_facts():
  relations = counts = 0
  for scene, rng in _scenes(300):
    for text in language.captions(scene, rng, 3) + [
        language.describe(scene, rng)]:
      parsed = _check_facts(text, scene)
      relations += len(parsed.relations)
      counts += sum(p.count > 1 for p in parsed.phrases)
  # The templates with relations and plural counts were exercised.
  assert relations > 30 and counts > 100


@pytest.mark.parametrize('text, facts', [
    ('Two large red striped squares to the left of a small blue circle.',
     [(2, dict(shape='square', colour='red', size='large',
               texture='striped')),
      (1, dict(shape='circle', colour='blue', size='small'))]),
    ('There is a pair of violet hoops on the left side.',
     [(2, dict(shape='ring', colour='purple', location='left'))]),
    ('Five shapes: three big polka-dot plus signs and two discs.',
     [(5, dict()), (3, dict(shape='cross', size='large', texture='dotted')),
      (2, dict(shape='circle'))]),
])
def test_parse_reads_templates(text, facts):
  parsed = language.parse(text)
  assert [(p.count, p.desc) for p in parsed.phrases] == [
      (n, language.Description(**d)) for n, d in facts]


def test_parse_reads_relations_and_tone():
  parsed = language.parse('Two red squares are above a blue star '
                          'against a dark background.')
  assert parsed.relations == ((0, 'above', 1),)
  assert parsed.tone == 'dark'


def test_a_false_caption_fails_the_check():
  scene, _ = next(_scenes(1))
  shape, colour, _, _ = scene.objects[0].kind
  n = language.Description(shape=shape, colour=colour).count(scene.objects)
  wrong = f'{language.number_word(n + 1)} {colour} {shape}s.'
  with pytest.raises(AssertionError):
    _check_facts(wrong, scene)


def test_captions_vary():
  scene, rng = next(_scenes(1))
  refs = language.captions(scene, rng, 5)
  assert len(refs) == 5 and len(set(refs)) >= 4


def _subject(question):
  """The definite noun phrase a question asks about."""
  phrases = language.parse(question).phrases
  return [p for p in phrases if p.count is None]


def test_attribute_and_position_answers_are_right():
  seen = collections.Counter()
  for scene, rng in _scenes(200, 'qa'):
    for qtype in ('colour', 'shape', 'size', 'texture', 'position'):
      try:
        qa = language.question(scene, rng, qtype)
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
    qa = language.question(scene, rng, 'count')
    text = 'two ' + qa.question.lower().removeprefix('how many ')
    for verb in (' are there', ' are in the picture', ' can you see', ' are'):
      text = text.replace(verb, '')
    (phrase,) = language.parse(text).phrases  # 'two red squares on the left'
    assert str(phrase.desc.count(scene.objects)) == qa.answer, qa
    qa = language.question(scene, rng, 'exists')
    answers[qa.answer] += 1
    text = qa.question.lower().replace('any ', 'two ')
    (phrase,) = language.parse(text).phrases
    assert (phrase.desc.count(scene.objects) > 0) == (qa.answer == 'yes'), qa
    try:
      qa = language.question(scene, rng, 'relation')
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
    answers = language.human_answers(answer, qtype, rng)
    assert len(answers) == language.QUESTION_TYPES.__len__() + 2
    assert answers.count(answer) >= 3
  many = [language.human_answers('2', 'count', rng) for _ in range(100)]
  flat = [a for answers in many for a in answers]
  assert 'two' in flat and ('1' in flat or '3' in flat)  # Variants, errors.


def test_unknown_question_type_raises():
  scene, rng = next(_scenes(1))
  with pytest.raises(ValueError, match='Unknown question type'):
    language.question(scene, rng, 'mood')
