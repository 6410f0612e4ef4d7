"""Questions about scenes (VQAv2-like) and their annotator answers.

Questions (VQAv2-like, short answers) ask for a colour, shape, size, texture,
count, position (a region name such as 'top left'), existence or a relation
(yes/no). `human_answers` turns one answer into ten annotator answers with
synonyms and a few mistakes.

A question names its objects with a referring expression (`refer`): the
cheapest description, in the grammar of `language.py`, that picks out the
object (or the group) asked about, so that the answer is unambiguous.
"""

from collections.abc import Sequence
import dataclasses
import itertools

import numpy as np

from flamingo_jax.data.world import language
from flamingo_jax.data.world import scenes

QUESTION_TYPES = ('colour', 'shape', 'size', 'texture', 'count', 'position',
                  'exists', 'relation')


@dataclasses.dataclass(frozen=True)
class QA:
  question: str
  answer: str
  qtype: str  # One of QUESTION_TYPES (or a video question type).


def _candidate_descriptions(obj: scenes.Obj, omit: str | None,
                            with_location: bool) -> list[language.Description]:
  attrs = [a for a in scenes.ATTRIBUTES if a != omit]
  locations = [None]
  if with_location:
    locations += [n for n, cells in language.LOCATION_CELLS.items()
                  if obj.cell in cells]
  candidates = []
  for n in range(len(attrs) + 1):
    for subset in itertools.combinations(attrs, n):
      for location in locations:
        fields = {a: getattr(obj, a) for a in subset}
        candidates.append(language.Description(**fields, location=location))
  return candidates


def _cost(desc: language.Description, omit: str | None) -> float:
  named = sum(getattr(desc, a) is not None for a in scenes.ATTRIBUTES)
  no_noun = desc.shape is None and omit != 'shape'
  return named + 1.5 * (desc.location is not None) + 1.0 * no_noun


def refer(scene: scenes.Scene, obj: scenes.Obj, rng: np.random.Generator, *,
          omit: str | None = None,
          targets: Sequence[scenes.Obj] | None = None,
          with_location: bool = True
          ) -> tuple[language.Description, list] | None:
  """A description that picks out `obj` (and maybe others like it).

  Args:
    scene: the scene.
    obj: the object to refer to.
    rng: breaks ties.
    omit: an attribute the description must not name (the one asked about);
      every object it picks out then has obj's value of it.
    targets: if given, exactly the objects the description must pick out.
    with_location: a location may be part of the description.

  Returns:
    (description, the objects it selects), or None if none works.
  """
  wanted = None if targets is None else {id(o) for o in targets}
  valid = []
  for desc in _candidate_descriptions(obj, omit, with_location):
    selected = desc.select(scene.objects)
    if wanted is not None and {id(o) for o in selected} != wanted:
      continue
    if omit and any(getattr(o, omit) != getattr(obj, omit)
                    for o in selected):
      continue
    valid.append((_cost(desc, omit), desc, selected))
  if not valid:
    return None
  best = min(c for c, _, _ in valid)
  near = [v for v in valid if v[0] <= best + (1 if rng.random() < 0.3 else 0)]
  _, desc, selected = near[int(rng.integers(len(near)))]
  return desc, selected


def _np(desc: language.Description, selected: Sequence,
        rng: np.random.Generator) -> tuple[str, bool]:
  """'the red square on the left' (or plural); and whether plural."""
  many = len(selected) > 1
  return language.noun_phrase(desc, 2 if many else 1, rng, definite=True), many


def _attribute_question(scene, rng, attr: str) -> QA | None:
  obj = scene.objects[int(rng.integers(len(scene.objects)))]
  found = refer(scene, obj, rng, omit=attr)
  if found is None:
    return None
  phrase, many = _np(*found, rng)
  be, do = ('are', 'do') if many else ('is', 'does')
  colour_word = 'color' if rng.random() < 0.2 else 'colour'
  templates = {
      'colour': (f'what {colour_word} {be} {phrase}?',
                 f'which {colour_word} {be} {phrase}?'),
      'shape': (f'what shape {be} {phrase}?',
                f'what kind of shape {be} {phrase}?'),
      'size': (f'{be} {phrase} small or large?',
               f'{be} {phrase} big or small?', f'what size {be} {phrase}?'),
      'texture': (f'what pattern {do} {phrase} have?',
                  f'{be} {phrase} plain, striped or dotted?'),
  }
  question = language.sentence(language.pick(rng, templates[attr]))
  return QA(question, getattr(obj, attr), attr)


def _count_question(scene, rng) -> QA:
  obj = scene.objects[int(rng.integers(len(scene.objects)))]
  candidates = _candidate_descriptions(obj, None, with_location=True)
  desc = candidates[int(rng.integers(len(candidates)))]
  if rng.random() < 0.15:  # Ask about something absent (answer 0, often).
    attr = language.pick(rng, scenes.ATTRIBUTES)
    desc = desc.replace(**{attr: language.pick(rng, scenes.VALUES[attr])})
  count = desc.count(scene.objects)
  body = language.noun_body(desc, rng, many=True)
  if desc.location:
    where = language.location_phrase(desc.location, rng)
    question = f'how many {body} are {where}?'
  else:
    question = language.pick(rng, (f'how many {body} are there?',
                          f'how many {body} are in the picture?',
                          f'how many {body} can you see?'))
  return QA(language.sentence(question), str(count), 'count')


def _position_question(scene, rng) -> QA | None:
  obj = scene.objects[int(rng.integers(len(scene.objects)))]
  found = refer(scene, obj, rng, targets=[obj], with_location=False)
  if found is None:
    return None
  phrase, _ = _np(*found, rng)
  question = language.pick(rng, (f'where is {phrase}?',
                        f'in which part of the image is {phrase}?'))
  return QA(language.sentence(question), obj.region, 'position')


def _exists_question(scene, rng) -> QA:
  obj = scene.objects[int(rng.integers(len(scene.objects)))]
  attrs = [a for a in scenes.ATTRIBUTES if rng.random() < 0.5] or ['shape']
  desc = language.Description(**{a: getattr(obj, a) for a in attrs})
  if rng.random() < 0.5:  # Balance yes/no: change one named attribute.
    attr = language.pick(rng, attrs)
    others = [v for v in scenes.VALUES[attr] if v != getattr(obj, attr)]
    desc = desc.replace(**{attr: language.pick(rng, others)})
  answer = 'yes' if desc.count(scene.objects) else 'no'
  if rng.random() < 0.5:
    body = language.noun_body(desc, rng, many=False)
    question = language.pick(rng, ('is there {}?', 'can you see {}?')).format(
        f'{language.article(body)} {body}')
  else:
    question = f'are there any {language.noun_body(desc, rng, many=True)}?'
  return QA(language.sentence(question), answer, 'exists')


def _relation_question(scene, rng) -> QA | None:
  """Is group A (all objects of a kind) REL group B? Yes half the time.

  Scenes where no two groups are related get no relation question, so that
  'no' is not the better guess.
  """
  groups = [objs for _, objs in scene.groups()]
  facts = [(a, r, b, language.relation_holds(a, r, b))
           for a, b in itertools.permutations(groups, 2)
           for r in language.RELATIONS]
  if not any(holds for *_, holds in facts):
    return None
  want_yes = rng.random() < 0.5
  options = [(a, r, b) for a, r, b, holds in facts if holds == want_yes]
  a, relation, b = options[int(rng.integers(len(options)))]
  found_a = refer(scene, a[0], rng, targets=a, with_location=False)
  found_b = refer(scene, b[0], rng, targets=b, with_location=False)
  if found_a is None or found_b is None:
    return None
  words = language.synonym(rng, language.RELATION_WORDS[relation], 0.9)
  phrase_a, many = _np(*found_a, rng)
  question = (f'{"are" if many else "is"} {phrase_a} {words} '
              f'{_np(*found_b, rng)[0]}?')
  answer = 'yes' if want_yes else 'no'
  return QA(language.sentence(question), answer, 'relation')


def _ask(scene: scenes.Scene, rng: np.random.Generator,
         qtype: str) -> QA | None:
  if qtype in ('colour', 'shape', 'size', 'texture'):
    return _attribute_question(scene, rng, qtype)
  if qtype == 'count':
    return _count_question(scene, rng)
  if qtype == 'position':
    return _position_question(scene, rng)
  if qtype == 'exists':
    return _exists_question(scene, rng)
  return _relation_question(scene, rng)


def question(scene: scenes.Scene, rng: np.random.Generator,
             qtype: str | None = None) -> QA:
  """A question about the scene and its short answer.

  Args:
    scene: the scene.
    rng: the example's generator.
    qtype: one of QUESTION_TYPES, or None for a random type (types that do
      not fit the scene, e.g. a relation with one object, are redrawn).

  Returns:
    The question, its canonical answer and type.

  Raises:
    ValueError: for an unknown `qtype`, or one this scene cannot answer
      (e.g. 'position' when no object can be told apart from the others).
  """
  if qtype is not None and qtype not in QUESTION_TYPES:
    raise ValueError(f'Unknown question type {qtype!r}; expected one of '
                     f'{QUESTION_TYPES}.')
  for _ in range(50):
    qa = _ask(scene, rng, qtype or language.pick(rng, QUESTION_TYPES))
    if qa is not None:
      return qa
  if qtype is not None:
    raise ValueError(f'Cannot ask a {qtype!r} question about this scene.')
  return _count_question(scene, rng)  # Always possible.


# ---------------------------------------------------------- human answers --

ANSWER_SYNONYMS = {
    'yes': ('yeah',), 'no': ('nope',),
    'large': ('big',), 'small': ('little', 'tiny'),
    'striped': ('stripes', 'stripy'), 'dotted': ('dots', 'spotted',
                                                 'polka dots'),
    'plain': ('solid', 'none'),
    'circle': ('round', 'disc'), 'cross': ('plus', 'plus sign'),
    'ring': ('donut', 'hoop'), 'diamond': ('rhombus',),
    'square': ('box',), 'purple': ('violet',), 'centre': ('center', 'middle'),
    'top left': ('upper left', 'top left corner'),
    'top right': ('upper right', 'top right corner'),
    'bottom left': ('lower left', 'bottom left corner'),
    'bottom right': ('lower right', 'bottom right corner'),
    'left': ('on the left', 'left side'), 'right': ('on the right',
                                                    'right side'),
    'top': ('top middle', 'up'), 'bottom': ('bottom middle', 'down'),
}
_ANSWER_SPACES = {
    'colour': scenes.COLOUR_NAMES, 'shape': scenes.SHAPES,
    'size': scenes.SIZES, 'texture': scenes.TEXTURES,
    'position': scenes.REGION_NAMES, 'exists': ('yes', 'no'),
    'relation': ('yes', 'no'),
}


def _wrong_answer(answer: str, qtype: str, rng: np.random.Generator) -> str:
  if answer.isdigit():  # An off-by-one count.
    n = int(answer)
    return str(n + 1 if n == 0 or rng.random() < 0.5 else n - 1)
  space = _ANSWER_SPACES.get(qtype, ())
  others = [a for a in space if a != answer]
  return language.pick(rng, others) if others else answer


def _variant(answer: str, rng: np.random.Generator) -> str:
  if answer.isdigit() and int(answer) < len(language.NUMBER_WORDS):
    return language.NUMBER_WORDS[int(answer)]
  options = ANSWER_SYNONYMS.get(answer)
  return language.pick(rng, options) if options else answer


def human_answers(answer: str, qtype: str, rng: np.random.Generator,
                  num: int = 10, p_variant: float = 0.15,
                  p_wrong: float = 0.07) -> list[str]:
  """`num` annotator answers (VQAv2-style): mostly `answer`, some synonyms
  and a few mistakes; at least 3 are exactly `answer`, so that the canonical
  answer always scores 1 under VQA accuracy (min(#matches / 3, 1))."""
  answers = []
  for _ in range(num):
    u = rng.random()
    if u < p_wrong:
      answers.append(_wrong_answer(answer, qtype, rng))
    elif u < p_wrong + p_variant:
      answers.append(_variant(answer, rng))
    else:
      answers.append(answer)
  exact = [k for k, a in enumerate(answers) if a == answer]
  others = [k for k in range(num) if answers[k] != answer]
  for k in others[:max(0, min(3, num) - len(exact))]:
    answers[k] = answer
  return answers
