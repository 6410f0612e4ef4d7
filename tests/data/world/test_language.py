"""Captions parse back to the scene's facts."""

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
