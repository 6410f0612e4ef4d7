"""Made-up words bound to shapes or colours: the world's in-context learning.

A binding ties `ways` fresh nonce words ("blicket", "zorpee": drawn from
syllables, never a word of the grammar) to as many values of one attribute
(shapes, or colours). Pictures of one object each then name it with its word
through a template ("This is a blicket."). Bindings are drawn anew for every
episode of the nonce task (`tasks.nonce_episode`) and for every word-learning
page of the documents (`documents.py`), so the word of a picture can only be
known from earlier pictures of the same episode or page: it is never
memorised.
"""

from collections.abc import Sequence
import dataclasses

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


def word(rng: np.random.Generator) -> str:
  """A pronounceable made-up word of 2-3 syllables, not in the grammar.

  One syllable would too often make an English word ('lot', 'flash').
  """
  while True:
    num = int(rng.choice([2, 3], p=[0.8, 0.2]))
    made_up = ''.join(language.pick(rng, _ONSETS) +
                      language.pick(rng, _NUCLEI) +
                      language.pick(rng, _CODAS) for _ in range(num))
    if len(made_up) >= 3 and made_up not in _VOCABULARY:
      return made_up


@dataclasses.dataclass(frozen=True)
class Binding:
  """`words[i]` names the objects whose `attribute` is `values[i]`."""
  attribute: str  # One of ATTRIBUTES.
  values: tuple[str, ...]
  words: tuple[str, ...]


def bind(rng: np.random.Generator, ways: int,
         attribute: str | None = None) -> Binding:
  """Fresh words for `ways` distinct values of a (random) attribute.

  Args:
    rng: the episode's or page's generator.
    ways: words to bind, in [1, 8].
    attribute: 'shape' or 'colour'; None draws one.

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
    made_up = word(rng)
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
