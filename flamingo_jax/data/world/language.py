"""The world's language: captions and questions about scenes, and a parser.

A noun phrase names some attributes of objects and a count, e.g. "two large
red striped squares": its `Description` is a predicate over objects (the named
attributes, and optionally a location such as "on the left"), and its count is
the number of objects in the scene that satisfy it. Captions are built only
from true noun phrases and relations, so `parse` can read a caption back into
facts that a test checks against the scene.

Grammar (synonyms are drawn at random; [] = optional):
  NP       := COUNT [SIZE] [COLOUR] [TEXTURE] NOUN [LOCATION]
  COUNT    := a | an | one | two | a pair of | three | ... | nine
  SIZE     := small | little | large | big
  TEXTURE  := plain | solid | striped | stripy | dotted | spotted | polka-dot
  NOUN     := circle | disc | square | triangle | star | cross | plus sign |
              ring | hoop | diamond | rhombus | hexagon | object | shape | thing
  LOCATION := in the top left [corner] | ... | in the centre | in the middle |
              on the left [side] | on the right [side] | at the top |
              at the bottom
  REL      := to the left of | left of | to the right of | right of | above |
              over | below | under | beneath
  caption  := [PREFIX] NP (, NP)* and NP [BACKGROUND]
            | [PREFIX] NP REL NP [, and NP ...] [BACKGROUND]
            | NP is|are REL NP. [There is|are also NP ...]
            | [In this picture,] there is|are NP ... [BACKGROUND]
            | NUMBER objects|shapes|things: NP, ... and NP
  BACKGROUND := on|against a light|pale|dark background

Relations hold between all objects of both phrases: "A to the left of B"
means every A is in a grid column left of every B; "above" compares rows.
Locations are sets of grid cells: "on the left" is the left column, "at the
top" the top row, "in the top left" a single cell.

Questions about scenes are in `questions.py`.
"""

from collections.abc import Sequence
import dataclasses
import itertools
import re

import numpy as np

from flamingo_jax.data.world import scenes

NUMBER_WORDS = ('zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven',
                'eight', 'nine')
# Synonyms of each attribute value; the first is canonical.
SHAPE_WORDS = {
    'circle': ('circle', 'disc'),
    'square': ('square',),
    'triangle': ('triangle',),
    'star': ('star',),
    'cross': ('cross', 'plus sign'),
    'ring': ('ring', 'hoop'),
    'diamond': ('diamond', 'rhombus'),
    'hexagon': ('hexagon',),
}
GENERIC_NOUNS = ('object', 'shape', 'thing')
COLOUR_WORDS = {c: (c,) for c in scenes.COLOUR_NAMES}
COLOUR_WORDS['purple'] = ('purple', 'violet')
SIZE_WORDS = {'small': ('small', 'little'), 'large': ('large', 'big')}
TEXTURE_WORDS = {
    'plain': ('plain', 'solid'),
    'striped': ('striped', 'stripy'),
    'dotted': ('dotted', 'spotted', 'polka-dot'),
}
RELATION_WORDS = {
    'left of': ('to the left of', 'left of'),
    'right of': ('to the right of', 'right of'),
    'above': ('above', 'over'),
    'below': ('below', 'under', 'beneath'),
}
RELATIONS = tuple(RELATION_WORDS)
# Locations: the grid cells each covers, and its phrases.
LOCATION_CELLS = {
    'top left': ((0, 0),), 'top right': ((0, 2),),
    'bottom left': ((2, 0),), 'bottom right': ((2, 2),),
    'centre': ((1, 1),),
    'left': ((0, 0), (1, 0), (2, 0)), 'right': ((0, 2), (1, 2), (2, 2)),
    'top': ((0, 0), (0, 1), (0, 2)), 'bottom': ((2, 0), (2, 1), (2, 2)),
}
LOCATION_WORDS = {
    'top left': ('in the top left', 'in the top left corner'),
    'top right': ('in the top right', 'in the top right corner'),
    'bottom left': ('in the bottom left', 'in the bottom left corner'),
    'bottom right': ('in the bottom right', 'in the bottom right corner'),
    'centre': ('in the centre', 'in the middle'),
    'left': ('on the left', 'on the left side'),
    'right': ('on the right', 'on the right side'),
    'top': ('at the top',),
    'bottom': ('at the bottom',),
}
TONE_WORDS = {'light': ('light', 'pale'), 'dark': ('dark',)}
CAPTION_PREFIXES = ('a picture of ', 'an image of ', 'a photo of ',
                    'a drawing of ', 'this image shows ', 'here we see ',
                    'this picture contains ')

_PLURAL_ES = ('cross', 'rhombus')  # Nouns whose plural adds 'es'.


@dataclasses.dataclass(frozen=True)
class Description:
  """What a noun phrase names: a predicate over objects (None: any)."""
  shape: str | None = None
  colour: str | None = None
  size: str | None = None
  texture: str | None = None
  location: str | None = None  # A key of LOCATION_CELLS.

  def matches(self, obj: scenes.Obj) -> bool:
    for attr in scenes.ATTRIBUTES:
      value = getattr(self, attr)
      if value is not None and getattr(obj, attr) != value:
        return False
    return (self.location is None or
            obj.cell in LOCATION_CELLS[self.location])

  def select(self, objects: Sequence[scenes.Obj]) -> list[scenes.Obj]:
    return [o for o in objects if self.matches(o)]

  def count(self, objects: Sequence[scenes.Obj]) -> int:
    return len(self.select(objects))

  def replace(self, **changes) -> 'Description':
    return dataclasses.replace(self, **changes)


# ---------------------------------------------------------------- helpers --


def pick(rng: np.random.Generator, options: Sequence, p=None):
  """One element of `options` (a tuple of strings stays a string)."""
  return options[int(rng.choice(len(options), p=p))]


def synonym(rng: np.random.Generator, words: Sequence[str],
            p_canonical: float = 0.8) -> str:
  """The canonical word (first) with probability p_canonical, else another."""
  if len(words) == 1 or rng.random() < p_canonical:
    return words[0]
  return pick(rng, words[1:])


def plural(noun: str) -> str:
  head, _, tail = noun.rpartition(' ')
  word = tail
  word = word + 'es' if word in _PLURAL_ES else word + 's'
  return f'{head} {word}' if head else word


def article(word: str) -> str:
  return 'an' if word[0] in 'aeiou' else 'a'


def number_word(n: int) -> str:
  return NUMBER_WORDS[n] if 0 <= n < len(NUMBER_WORDS) else str(n)


def sentence(text: str) -> str:
  """Capitalised, with a final full stop."""
  text = text.strip()
  text = text[0].upper() + text[1:]
  return text if text[-1] in '.!?' else text + '.'


def join_list(items: Sequence[str]) -> str:
  if len(items) == 1:
    return items[0]
  return ', '.join(items[:-1]) + ' and ' + items[-1]


def location_phrase(location: str, rng: np.random.Generator) -> str:
  return synonym(rng, LOCATION_WORDS[location], 0.7)


def noun_body(desc: Description, rng: np.random.Generator, *,
              many: bool) -> str:
  """Adjectives and noun, e.g. 'large red striped squares' (no count)."""
  words = []
  if desc.size:
    words.append(synonym(rng, SIZE_WORDS[desc.size]))
  if desc.colour:
    words.append(synonym(rng, COLOUR_WORDS[desc.colour], 0.9))
  if desc.texture:
    words.append(synonym(rng, TEXTURE_WORDS[desc.texture], 0.7))
  noun = (synonym(rng, SHAPE_WORDS[desc.shape], 0.85) if desc.shape
          else pick(rng, GENERIC_NOUNS))
  words.append(plural(noun) if many else noun)
  return ' '.join(words)


def noun_phrase(desc: Description, count: int | None,
                rng: np.random.Generator, *, definite: bool = False,
                with_location: bool = True) -> str:
  """E.g. 'two large red striped squares on the left'.

  Args:
    desc: what to name.
    count: how many (None means 1); with `definite`, only singular/plural.
    rng: draws synonyms.
    definite: 'the ...' instead of a count.
    with_location: append desc.location's phrase.

  Returns:
    The phrase, lower case.
  """
  count = 1 if count is None else count
  body = noun_body(desc, rng, many=count != 1)
  if definite:
    head = 'the'
  elif count == 1:
    head = 'one' if rng.random() < 0.1 else article(body)
  elif count == 2 and rng.random() < 0.1:
    head = 'a pair of'
  else:
    head = number_word(count)
  phrase = f'{head} {body}'
  if with_location and desc.location:
    phrase += ' ' + location_phrase(desc.location, rng)
  return phrase


def relation_holds(a: Sequence[scenes.Obj], relation: str,
                   b: Sequence[scenes.Obj]) -> bool:
  """Whether every object of `a` is `relation` every object of `b`."""
  if not a or not b:
    return False
  if relation in ('left of', 'right of'):
    cols_a, cols_b = [o.cell[1] for o in a], [o.cell[1] for o in b]
    if relation == 'left of':
      return max(cols_a) < min(cols_b)
    return min(cols_a) > max(cols_b)
  rows_a, rows_b = [o.cell[0] for o in a], [o.cell[0] for o in b]
  if relation == 'above':
    return max(rows_a) < min(rows_b)
  if relation == 'below':
    return min(rows_a) > max(rows_b)
  raise ValueError(f'Unknown relation {relation!r}; expected one of '
                   f'{RELATIONS}.')


def best_location(objects: Sequence[scenes.Obj]) -> str | None:
  """The smallest named location that holds all `objects`, if any."""
  cells = {o.cell for o in objects}
  fitting = [name for name, covered in LOCATION_CELLS.items()
             if cells <= set(covered)]
  return min(fitting, key=lambda n: len(LOCATION_CELLS[n]), default=None)


# --------------------------------------------------------------- captions --


def group_description(scene: scenes.Scene, group: Sequence[scenes.Obj],
                      rng: np.random.Generator) -> Description:
  """Names a group, sometimes leaving out size or texture when the shorter
  phrase still picks out exactly the group (so its count stays right)."""
  shape, colour, size, texture = group[0].kind
  desc = Description(shape=shape, colour=colour, size=size,
                     texture=None if texture == 'plain' else texture)
  if desc.count(scene.objects) != len(group) or rng.random() < 0.2:
    desc = desc.replace(texture=texture)  # 'plain' must then be said.
  for attr, p in (('size', 0.3), ('texture', 0.3), ('colour', 0.1)):
    shorter = desc.replace(**{attr: None})
    if rng.random() < p and shorter.count(scene.objects) == len(group):
      desc = shorter
  if rng.random() < 0.35:
    location = best_location(group)
    if location and desc.replace(location=location).count(
        scene.objects) == len(group):
      desc = desc.replace(location=location)
  return desc


def _group_phrases(scene: scenes.Scene, rng: np.random.Generator,
                   with_location: bool = True) -> list[tuple[str, list]]:
  groups = [objs for _, objs in scene.groups()]
  order = rng.permutation(len(groups))
  phrases = []
  for i in order:
    desc = group_description(scene, groups[i], rng)
    if not with_location:
      desc = desc.replace(location=None)
    phrases.append((noun_phrase(desc, len(groups[i]), rng), groups[i]))
  return phrases


def _background_phrase(scene: scenes.Scene, rng: np.random.Generator) -> str:
  if rng.random() >= 0.25:
    return ''
  tone = synonym(rng, TONE_WORDS[scene.background.tone], 0.7)
  return f' {pick(rng, ("on", "against"))} a {tone} background'


def _relational(scene: scenes.Scene, rng: np.random.Generator,
                verb: bool) -> str | None:
  """'NP REL NP[, and NP ...]', or None if no two groups are related."""
  phrases = _group_phrases(scene, rng, with_location=False)
  pairs = [(i, j, rel) for i, j in itertools.permutations(
      range(len(phrases)), 2) for rel in RELATIONS
           if relation_holds(phrases[i][1], rel, phrases[j][1])]
  if not pairs:
    return None
  i, j, rel = pairs[int(rng.integers(len(pairs)))]
  rel_words = synonym(rng, RELATION_WORDS[rel], 0.75)
  rest = [p for k, (p, _) in enumerate(phrases) if k not in (i, j)]
  if verb:
    be = 'is' if len(phrases[i][1]) == 1 else 'are'
    text = sentence(f'{phrases[i][0]} {be} {rel_words} {phrases[j][0]}')
    if rest:
      be = 'is' if rest[0].split()[0] in ('a', 'an', 'one') else 'are'
      text += ' ' + sentence(f'there {be} also {join_list(rest)}')
    return text
  text = f'{phrases[i][0]} {rel_words} {phrases[j][0]}'
  if rest:
    text += ', and ' + join_list(rest)
  return text


def describe(scene: scenes.Scene, rng: np.random.Generator) -> str:
  """A lower-case noun-phrase description of the whole scene (no stop).

  Fits after 'The picture shows ...': a list of groups, a relation between
  two groups, or a total count followed by the groups.
  """
  form = rng.choice(3, p=[0.5, 0.35, 0.15])
  if form == 1:
    text = _relational(scene, rng, verb=False)
    if text is not None:
      return text
  if form == 2:
    noun = pick(rng, ('objects', 'shapes', 'things'))
    total = len(scene.objects)
    if total > 1:
      phrases = [p for p, _ in _group_phrases(scene, rng)]
      return f'{number_word(total)} {noun}: {join_list(phrases)}'
  return join_list([p for p, _ in _group_phrases(scene, rng)])


def caption(scene: scenes.Scene, rng: np.random.Generator) -> str:
  """One caption sentence (or two) for the scene, from a random template."""
  form = rng.choice(3, p=[0.55, 0.2, 0.25])
  if form == 1:
    text = _relational(scene, rng, verb=True)
    if text is not None:
      return text
  if form == 2:
    phrases = [p for p, _ in _group_phrases(scene, rng)]
    be = 'is' if phrases[0].split()[0] in ('a', 'an', 'one') else 'are'
    lead = pick(rng, ('', 'in this picture, ', 'in this image, '))
    return sentence(f'{lead}there {be} {join_list(phrases)}'
                    f'{_background_phrase(scene, rng)}')
  prefix = '' if rng.random() < 0.35 else pick(rng, CAPTION_PREFIXES)
  return sentence(prefix + describe(scene, rng) +
                  _background_phrase(scene, rng))


def captions(scene: scenes.Scene, rng: np.random.Generator,
             num: int) -> list[str]:
  """`num` reference captions, distinct when the grammar allows."""
  refs: list[str] = []
  for _ in range(num * 10):
    text = caption(scene, rng)
    if text not in refs:
      refs.append(text)
    if len(refs) == num:
      return refs
  return refs + [caption(scene, rng) for _ in range(num - len(refs))]


# ----------------------------------------------------------------- parser --


def _lexicon() -> dict[tuple[str, ...], tuple[str, object]]:
  """Phrase (tuple of tokens) -> (category, value)."""
  lex: dict[tuple[str, ...], tuple[str, object]] = {}

  def add(phrase: str, category: str, value: object):
    lex[tuple(phrase.split())] = (category, value)

  for n, word in enumerate(NUMBER_WORDS):
    add(word, 'count', n)
  add('a', 'count', 1)
  add('an', 'count', 1)
  add('a pair of', 'count', 2)
  add('the', 'the', None)
  for category, table in (('size', SIZE_WORDS), ('colour', COLOUR_WORDS),
                          ('texture', TEXTURE_WORDS),
                          ('location', LOCATION_WORDS),
                          ('relation', RELATION_WORDS),
                          ('tone', TONE_WORDS)):
    for value, words in table.items():
      for word in words:
        add(word, category, value)
  for shape, words in SHAPE_WORDS.items():
    for word in words:
      add(word, 'shape', shape)
      add(plural(word), 'shape', shape)
  for word in GENERIC_NOUNS:
    add(word, 'shape', None)
    add(plural(word), 'shape', None)
  return lex


_LEXICON = _lexicon()
_MAX_PHRASE = max(len(k) for k in _LEXICON)


def lex(text: str) -> list[tuple[str, object, str]]:
  """Tokens of `text` as (category, value, words); unknown words: 'word'."""
  words = re.findall(r"[a-z0-9]+(?:-[a-z]+)?", text.lower())
  tokens, i = [], 0
  while i < len(words):
    for n in range(min(_MAX_PHRASE, len(words) - i), 0, -1):
      key = tuple(words[i:i + n])
      if key in _LEXICON:
        category, value = _LEXICON[key]
        tokens.append((category, value, ' '.join(key)))
        i += n
        break
    else:
      tokens.append(('word', None, words[i]))
      i += 1
  return tokens


@dataclasses.dataclass(frozen=True)
class ParsedNP:
  desc: Description
  count: int | None  # None for a definite 'the ...' phrase.
  start: int  # Token span [start, end).
  end: int


@dataclasses.dataclass(frozen=True)
class ParsedCaption:
  phrases: tuple[ParsedNP, ...]
  relations: tuple[tuple[int, str, int], ...]  # (phrase, relation, phrase)
  tone: str | None  # The background tone, if mentioned.


def parse_noun_phrases(tokens: Sequence[tuple[str, object, str]]
                       ) -> list[ParsedNP]:
  """Every 'COUNT|the ADJ* NOUN [LOCATION]' span in `tokens`."""
  phrases, i = [], 0
  while i < len(tokens):
    category, value, _ = tokens[i]
    if category not in ('count', 'the'):
      i += 1
      continue
    attrs, j = {}, i + 1
    while j < len(tokens) and tokens[j][0] in ('size', 'colour', 'texture'):
      attrs[tokens[j][0]] = tokens[j][1]
      j += 1
    if j == len(tokens) or tokens[j][0] != 'shape':
      i += 1
      continue
    attrs['shape'] = tokens[j][1]
    j += 1
    if j < len(tokens) and tokens[j][0] == 'location':
      attrs['location'] = tokens[j][1]
      j += 1
    count = value if category == 'count' else None
    phrases.append(ParsedNP(Description(**attrs), count, i, j))
    i = j
  return phrases


def parse(text: str) -> ParsedCaption:
  """Reads the facts of a caption: its noun phrases, relations, tone."""
  tokens = lex(text)
  phrases = parse_noun_phrases(tokens)
  relations = []
  for k in range(len(phrases) - 1):
    between = tokens[phrases[k].end:phrases[k + 1].start]
    between = [t for t in between if t[2] not in ('is', 'are')]
    if len(between) == 1 and between[0][0] == 'relation':
      relations.append((k, between[0][1], k + 1))
  tone = None
  for k in range(len(tokens) - 1):
    if tokens[k][0] == 'tone' and tokens[k + 1][2] == 'background':
      tone = tokens[k][1]
  return ParsedCaption(tuple(phrases), tuple(relations), tone)
