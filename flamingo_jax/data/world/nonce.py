"""Made-up words bound to shapes or colours: the world's in-context learning.

A binding ties `ways` fresh nonce words ("blicket", "zorpee": drawn from
syllables, never a word of the grammar) to as many values of one attribute
(shapes, or colours). Pictures of one object each then name it with its word
through a template ("This is a blicket."). Bindings are drawn anew for every
episode of the nonce task (`tasks.nonce_episode`) and for every word-learning
page of the documents (`documents.py`), so the word of a picture can only be
known from earlier pictures of the same episode or page: it is never
memorised.

Word halves. Every made-up word belongs to one of two halves of the word
space (`word_half`, a fixed hash of its spelling): the evaluation's nonce
episodes draw from the 'eval' half and the bursty training episodes
(`episode`) from the 'train' half, so that no word of an evaluation episode
ever occurs in them (the documents' word pages draw from both).

Bursty training episodes (Chan et al. 2022, "Data distributional properties
drive emergent in-context learning in transformers"): a document made only
of a few objects, each bound to a word fresh for the document, shown again
and again in the evaluation's format ('<image>This is a dax.<EOC><image>This
is a blicket.<EOC><image>This is a' dax): after its first showing, a word can
be predicted only by looking back at the earlier picture of the same shape or
colour. `episode_text` is the same episode for an LM alone, each picture
replaced by its key, the value its word is bound to, written where the
`<image>` marker sits: at the start of the picture's line ('circle This is a
dax. square This is a blicket. circle This is a' dax). An LM that binds this
text (an induction circuit: find the earlier line that began with the same
token, copy its word) reads the key from the line's first position, which is
the position that cross-attention at the marker can write a picture's
identity to. Keys written right before the word ('This is a circle dax.',
world 1.4.0) taught the LM to bind in words, but by a circuit that reads the
key from its own position, which cross-attention cannot write (README,
`tiny.py:icl`). Trained on line-keyed text alone, the icl recipe's LM
learned no binding in 4100 steps (world 1.5.0); with a share of the
episodes (ADJACENT_SHARE, world 1.6.0) written the 1.4.0 way, a scaffold
(the induction that copies the word after an adjacent key is the easier
one), it binds the line-keyed text from about step 2700 on.

The image episodes (`world_episodes`, world 1.7.0) write each word's first
showing after its key in words and every later showing plain
(`Episode.first_keyed_texts`): '<image> circle This is a dax.<EOC><image>
This is a dax.'. A later showing's word is then known from the earlier
line whose key, in words, names what the later picture shows, so the
cross-attention's write of the key at the later picture pays on its own
(with plain episodes it pays only once written at both pictures, and it was
never learned, README `tiny.py:icl`). The write is the same at every
picture, so it binds plain episodes too (`tasks.LEARN_FIRST_SHOWINGS`:
whether the first showings, whose words are fresh, are learned).
"""

from collections.abc import Sequence
import dataclasses
import zlib

import numpy as np

from flamingo_jax.data.world import language
from flamingo_jax.data.world import scenes

ATTRIBUTES = ('shape', 'colour')
# How a picture names its word: the evaluation's templates (`tasks.py`).
TEMPLATES = {
    'shape': ('This is a {}.', 'Look, a {}!', 'Here is a {}.'),
    'colour': ('This one is {}.', 'The colour is {}.', 'It is {}.'),
}
_ONSETS = ('b', 'bl', 'd', 'f', 'fl', 'g', 'gl', 'k', 'l', 'm', 'n', 'p',
           'pl', 'r', 's', 'st', 't', 'tr', 'v', 'w', 'z')
_NUCLEI = ('a', 'e', 'i', 'o', 'u', 'oo', 'ee', 'ai')
_CODAS = ('', '', '', 'x', 'k', 'p', 'n', 'm', 'sh', 't', 'ck')


def _vocabulary() -> frozenset[str]:
  words = set()
  for phrase in language._LEXICON:  # pylint: disable=protected-access
    words.update(phrase)
  return frozenset(words)


_VOCABULARY = _vocabulary()


WORD_HALVES = ('train', 'eval')


def word_half(made_up: str) -> str:
  """'train' or 'eval': the half of the word space `made_up` belongs to."""
  return WORD_HALVES[zlib.crc32(made_up.encode('utf-8')) % 2]


def word(rng: np.random.Generator, half: str | None = None) -> str:
  """A pronounceable made-up word of 2-3 syllables, not in the grammar.

  One syllable would too often make an English word ('lot', 'flash').

  Args:
    rng: the generator.
    half: None (any word), or 'train' / 'eval': a word of that half.
  """
  if half is not None and half not in WORD_HALVES:
    raise ValueError(f'Unknown word half {half!r}; expected one of '
                     f'{WORD_HALVES} or None.')
  while True:
    num = int(rng.choice([2, 3], p=[0.8, 0.2]))
    made_up = ''.join(language.pick(rng, _ONSETS) +
                      language.pick(rng, _NUCLEI) +
                      language.pick(rng, _CODAS) for _ in range(num))
    if (len(made_up) >= 3 and made_up not in _VOCABULARY and
        (half is None or word_half(made_up) == half)):
      return made_up


@dataclasses.dataclass(frozen=True)
class Binding:
  """`words[i]` names the objects whose `attribute` is `values[i]`."""
  attribute: str  # One of ATTRIBUTES.
  values: tuple[str, ...]
  words: tuple[str, ...]


def bind(rng: np.random.Generator, ways: int,
         attribute: str | None = None, half: str | None = None) -> Binding:
  """Fresh words for `ways` distinct values of a (random) attribute.

  Args:
    rng: the episode's or page's generator.
    ways: words to bind, in [1, 8].
    attribute: 'shape' or 'colour'; None draws one.
    half: the words' half of the word space (`word`); None: any.

  Returns:
    The binding.
  """
  if not 1 <= ways <= len(scenes.COLOUR_NAMES):
    raise ValueError(f'ways must be in [1, 8]; got {ways}.')
  if attribute is None:
    attribute = language.pick(rng, ATTRIBUTES)
  values = tuple(str(v) for v in rng.choice(scenes.VALUES[attribute],
                                            size=ways, replace=False))
  words: list[str] = []
  while len(words) < ways:
    made_up = word(rng, half)
    if made_up not in words:
      words.append(made_up)
  return Binding(attribute, values, tuple(words))


def scene(rng: np.random.Generator, attribute: str,
          value: str) -> scenes.Scene:
  """One object with `attribute` = `value`; everything else random."""
  kind = scenes.sample_kind(rng, {attribute: value})
  cell = divmod(int(rng.integers(scenes.GRID**2)), scenes.GRID)
  return scenes.Scene((scenes.place_object(rng, kind, cell),),
                      scenes.sample_background(rng))


def ways_order(rng: np.random.Generator, ways: int, repeats: int
               ) -> Sequence[int]:
  """`repeats` of each way in 0..ways-1, in random order."""
  return [int(w) for w in rng.permutation(np.repeat(np.arange(ways),
                                                    repeats))]


# Bursty training episodes: words bound per episode, and images per episode
# (each word is shown at least twice when there is room).
EPISODE_WAYS = (2, 3, 4)
EPISODE_WAYS_P = (0.3, 0.5, 0.2)
EPISODE_MIN_IMAGES = 4
EPISODE_MAX_IMAGES = 9  # The evaluation's 8 shots and its query.


@dataclasses.dataclass(frozen=True)
class Episode:
  """A bursty episode: `order[i]` is the way (word) of picture i."""
  binding: Binding
  template: str  # One of TEMPLATES[binding.attribute].
  order: tuple[int, ...]
  scenes: tuple[scenes.Scene, ...]

  def texts(self) -> list[str]:
    """The line after each picture ('This is a dax.')."""
    return [self.template.format(self.binding.words[w]) for w in self.order]

  def keyed_texts(self) -> list[str]:
    """Each picture's line after its key ('circle This is a dax.')."""
    return [keyed_line(self.template, self.binding.values[w],
                       self.binding.words[w]) for w in self.order]

  def first_showings(self) -> list[bool]:
    """Whether picture i is the first of its word."""
    return [w not in self.order[:i] for i, w in enumerate(self.order)]

  def first_keyed_texts(self) -> list[str]:
    """The lines after the pictures in the image episodes: each word's
    first showing after its key in words (' circle This is a dax.', as the
    keyed probe writes it), every later showing plain ('This is a dax.')."""
    return [' ' + keyed if first else text for first, text, keyed in zip(
        self.first_showings(), self.texts(), self.keyed_texts())]

  def adjacent_texts(self) -> list[str]:
    """Each picture's line, its key right before the word ('This is a
    circle dax.')."""
    return [self.template.format(f'{self.binding.values[w]} '
                                 f'{self.binding.words[w]}')
            for w in self.order]


def keyed_line(template: str, key: str, made_up: str) -> str:
  """`template` naming `made_up`, after its `key` (the value of the
  binding's attribute that it names): 'circle This is a dax.'."""
  return f'{key} {template.format(made_up)}'


def keyed_prompt(template: str, key: str) -> str:
  """`keyed_line` up to the word: 'circle This is a'."""
  return f'{key} {template.split("{}")[0].rstrip()}'


def episode(rng: np.random.Generator, *, ways: int | None = None,
            num_images: int | None = None,
            half: str = 'train') -> Episode:
  """A bursty training episode: few objects, each named again and again.

  Args:
    rng: the episode's generator.
    ways: words bound (None: drawn from EPISODE_WAYS).
    num_images: pictures (None: drawn in [max(EPISODE_MIN_IMAGES,
      2 * ways), EPISODE_MAX_IMAGES]).
    half: the words' half of the word space (the evaluation's is 'eval').

  Returns:
    The episode; every way is shown at least once, twice when
    num_images >= 2 * ways.
  """
  if ways is None:
    ways = int(rng.choice(EPISODE_WAYS, p=EPISODE_WAYS_P))
  if num_images is None:
    low = max(EPISODE_MIN_IMAGES, 2 * ways)
    num_images = int(rng.integers(low, max(low, EPISODE_MAX_IMAGES) + 1))
  if num_images < ways:
    raise ValueError(f'An episode needs at least one picture per word: '
                     f'{num_images} pictures for {ways} words.')
  binding = bind(rng, ways, half=half)
  template = language.pick(rng, TEMPLATES[binding.attribute])
  shown = 2 if num_images >= 2 * ways else 1
  order = np.concatenate([np.repeat(np.arange(ways), shown),
                          rng.integers(ways, size=num_images - shown * ways)])
  order = tuple(int(w) for w in rng.permutation(order))
  episode_scenes = tuple(scene(rng, binding.attribute, binding.values[w])
                         for w in order)
  return Episode(binding, template, order, episode_scenes)


# The share of `world_episode_text` written with each key right before its
# word (`Episode.adjacent_texts`) instead of at the start of its line.
ADJACENT_SHARE = 0.5


def episode_text(ep: Episode, adjacent: bool = False) -> str:
  """The episode for an LM alone: each picture replaced by its key, at the
  start of its line (`Episode.keyed_texts`), or right before its word.

  'circle This is a dax. square This is a blicket. circle This is a dax.'
  'This is a circle dax. This is a square blicket. This is a circle dax.'
  """
  return ' '.join(ep.adjacent_texts() if adjacent else ep.keyed_texts())
