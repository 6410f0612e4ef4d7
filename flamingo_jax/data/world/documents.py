"""Interleaved "web pages" of the embedded world, in the style of M3W.

A document is a list of chunks, `{'text': str}` or `{'image': i}` (i indexes
the document's own list of scenes), as `flamingo_jax.data.formatting` reads
them. Pages come in four kinds (`PAGE_KINDS` gives their shares):

- 'article' (half the pages): a theme (all its pictures share a colour or a
  shape), a title and an introduction, then 1-5 images (6-8 in 5% of pages,
  to exercise the max-media limit); each image is described by the text
  right after it ("The picture above shows ...") or, in a quarter of the
  cases, right before it ("The next picture shows ..."), so that both the
  previous-image and the next-image attention of Flamingo's phi have
  something to learn. Unrelated filler sentences, comparisons with the
  previous picture ("It has more objects than the previous picture.") and a
  sign-off are mixed in. One article in ten opens with an image.
- 'quiz': a picture quiz; each image is followed by
  "Question: {question} Answer: {answer}" (sometimes two).
- 'gallery': the outputs of a picture-describing program; each image is
  followed by "Output: {caption}", or by "Output: {colour} {shape}" for a
  picture of one large object among small ones.
- 'words': a word-learning page. Fresh made-up words name shapes or colours
  (`nonce.py`, drawn anew for every page), often listed first ("Today's
  words are blicket and dax."); each picture shows one object and names it
  ("This is a blicket."), and later pictures reuse the words, so the word of
  a picture is known only from the earlier ones on the page.

Real web pages hold lists of questions and answers, captioned galleries and
vocabulary lessons; these kinds stand in for them, and they are where the
model learns the few-shot formats of the evaluation (`evaluation/tasks.py`)
and to bind a word in context. The nonce evaluation episodes draw their own
words, so their bindings are still unknown to the model.

Chunk texts follow the formatting module's rules: they are concatenated
verbatim, so they carry their own separators; text after an image starts
with a space half of the time (web pages do both).
"""

from collections.abc import Mapping, Sequence
import dataclasses

import numpy as np

from flamingo_jax.data.world import language
from flamingo_jax.data.world import nonce
from flamingo_jax.data.world import questions
from flamingo_jax.data.world import scenes

MAX_IMAGES = 5  # Usual maximum of images per page.
MAX_IMAGES_RARE = 8  # Maximum of the rare, longer pages.
P_RARE = 0.05  # Probability of a longer page.
P_IMAGE_FIRST = 0.1  # Probability that a page opens with an image.
P_DESCRIBED_BEFORE = 0.25  # An image's description precedes it.
# Kinds of page and their shares of the documents.
PAGE_KINDS = {'article': 0.5, 'quiz': 0.15, 'gallery': 0.15, 'words': 0.2}
# The shares of the LM stage's text-only pages (`world_text`): mostly word
# pages, whose made-up words recur within a page and nowhere else. Copying
# them is how a small LM learns to read its context, which the frozen LM of
# Flamingo needs before any few-shot learning.
TEXT_PAGE_KINDS = {'article': 0.3, 'quiz': 0.1, 'gallery': 0.1, 'words': 0.5}
P_SECOND_QUESTION = 0.2  # A quiz picture gets a second question.
P_LABELS = 0.3  # A gallery labels single objects instead of captioning.
WORDS_WAYS = (2, 3)  # Words a word-learning page binds.
P_WORD_LIST = 0.7  # A word-learning page lists its words first.

_TITLES = ('my {theme} collection', 'art class: {theme} week',
           'a gallery of {theme} pictures', 'notes from the {theme} workshop',
           'drawing {theme} things', 'pictures for the {theme} club')
_INTROS = ('Welcome to my page.', 'Here are some pictures I made.',
           'These are my favourite drawings this month.',
           'I spent the weekend making pictures.',
           'Our class made these pictures today.',
           'A few new pictures for the gallery.')
_THEME_SENTENCES = {
    'colour': ('Every picture here has something {value} in it.',
               'The theme this week is {value}.',
               'I only used {value} paint for the main shapes.'),
    'shape': ('Each picture has at least one {value}.',
              'This page is all about the {value}.',
              'I love drawing {plural}.'),
}
_AFTER = ('The picture above shows {d}.', 'Above: {d}.',
          'Here you can see {d}.', 'This one has {d}.', '{D}.',
          'In this picture there {be} {d}.')
_BEFORE = ('The next picture shows {d}:', 'Below you can see {d}.',
           'Here {be} {d}:', 'The following image has {d}.')
_FILLER = ('The weather was lovely today.', 'Thanks for visiting!',
           'I used a new set of brushes.', 'My cat watched me the whole time.',
           'It took about an hour.', 'More pictures are coming soon.',
           'Posted on a sunny afternoon.', 'The paper was a bit too thin.',
           'Tea helps with the drawing.', 'Comments are welcome.',
           'I think this is my best work so far.',
           'The museum visit gave me ideas.')
_OUTROS = ('Thanks for reading!', 'See you next week.',
           'Leave a comment if you liked them.', 'That is all for today.')


_QUIZ_TITLES = ('Picture quiz', 'Quiz time!', 'Can you answer these?',
                'Test your eyes', 'Weekly picture puzzle')
_QUIZ_INTROS = ('Look at each picture and answer the question.',
                'Answers are given after each question.',
                'How many did you get right?')
_GALLERY_TITLES = ('Outputs of my picture describer',
                   'What the program said about each picture',
                   'Test run of the captioning program', 'Model outputs')
_GALLERY_INTROS = ('Each picture is followed by the output.',
                   'The outputs are not edited.',
                   'I fed it some of my drawings.')
_WORDS_TITLES = ('Words of the day', 'Learn some new words',
                 'A lesson in the language of the islands',
                 'Our made-up words', 'Name that thing')
_WORD_LISTS = ("Today's words are {}.", 'The new words: {}.',
               'Learn these words: {}.', 'You will meet {}.')
_WORDS_INTROS = ('Each picture shows a thing and its name.',
                 'Remember the words, they come back later.',
                 'These words are new to everyone.')


@dataclasses.dataclass(frozen=True)
class Document:
  """A page: chunks over its scenes, and where each scene is described."""
  chunks: tuple[dict, ...]  # {'text': str} or {'image': int}
  scenes: tuple[scenes.Scene, ...]
  # For each image: (index of the chunk that describes it, 'above' or
  # 'below' (the side of the text the image is on), the describing sentence).
  references: tuple[tuple[int, str, str], ...]
  kind: str = 'article'  # One of PAGE_KINDS.
  # A 'words' page: its made-up word -> the value of `binding.attribute`.
  binding: nonce.Binding | None = None


def _sample_num_images(rng: np.random.Generator) -> int:
  if rng.random() < P_RARE:
    return int(rng.integers(MAX_IMAGES + 1, MAX_IMAGES_RARE + 1))
  return int(rng.integers(1, MAX_IMAGES + 1))


def _comparison(previous: scenes.Scene, current: scenes.Scene,
                rng: np.random.Generator) -> str:
  a, b = len(current.objects), len(previous.objects)
  noun = language.pick(rng, ('objects', 'shapes'))
  if a == b:
    return f'It has as many {noun} as the previous picture.'
  more = 'more' if a > b else 'fewer'
  return f'It has {more} {noun} than the previous picture.'


def _description_sentence(scene: scenes.Scene, rng: np.random.Generator,
                          before: bool) -> str:
  text = language.describe(scene, rng)
  templates = _BEFORE if before else _AFTER
  template = language.pick(rng, templates)
  first = language.lex(text)[0]
  be = 'is' if first[0] == 'count' and first[1] == 1 else 'are'
  return template.format(d=text, D=text[0].upper() + text[1:], be=be)


def _fillers(rng: np.random.Generator, p: float) -> list[str]:
  out = []
  while rng.random() < p and len(out) < 3:
    out.append(language.pick(rng, _FILLER))
  return out


def sample_document(rng: np.random.Generator, num_images: int | None = None,
                    kind: str | None = None,
                    shares: Mapping[str, float] | None = None) -> Document:
  """A random page.

  Args:
    rng: the example's generator.
    num_images: how many images (>= 1); None draws 1-5, or 6-8 rarely
      (2 + ways to 5 on a 'words' page).
    kind: one of PAGE_KINDS; None draws one by its share.
    shares: the kinds' shares when `kind` is None (default PAGE_KINDS).

  Returns:
    The document.
  """
  if kind is None:
    shares = shares or PAGE_KINDS
    kind = language.pick(rng, tuple(shares),
                         p=np.array(list(shares.values())))
  if kind not in PAGE_KINDS:
    raise ValueError(f'Unknown page kind {kind!r}; expected one of '
                     f'{tuple(PAGE_KINDS)}.')
  if num_images is not None and num_images < 1:
    raise ValueError(f'num_images must be >= 1; got {num_images}.')
  sample = {'article': _article, 'quiz': _quiz, 'gallery': _gallery,
            'words': _words}[kind]
  return sample(rng, num_images)


def _article(rng: np.random.Generator, num_images: int | None) -> Document:
  if num_images is None:
    num_images = _sample_num_images(rng)
  theme = language.pick(rng, ('colour', 'shape'))
  value = language.pick(rng, scenes.VALUES[theme])
  page_scenes = tuple(scenes.sample_scene(rng, require={theme: value})
                      for _ in range(num_images))
  # Text pieces between images: texts[i] precedes image i; texts[-1] ends.
  texts: list[list[str]] = [[] for _ in range(num_images + 1)]
  image_first = rng.random() < P_IMAGE_FIRST
  if not image_first:
    title = language.pick(rng, _TITLES).format(theme=value)
    texts[0].append(language.sentence(title))
    texts[0].append(language.pick(rng, _INTROS))
    texts[0].append(language.pick(rng, _THEME_SENTENCES[theme]).format(
        value=value, plural=language.plural(value)))
    texts[0].extend(_fillers(rng, 0.3))
  sides, sentences = [], []
  for i, scene in enumerate(page_scenes):
    # The first image of an image-first page has no text before it.
    before = (rng.random() < P_DESCRIBED_BEFORE and
              not (image_first and i == 0))
    sides.append('below' if before else 'above')
    description = _description_sentence(scene, rng, before)
    sentences.append(description)
    if before:
      texts[i].extend(_fillers(rng, 0.2))
      texts[i].append(description)
    else:
      texts[i + 1].append(description)
      if i > 0 and rng.random() < 0.3:
        texts[i + 1].append(_comparison(page_scenes[i - 1], scene, rng))
      texts[i + 1].extend(_fillers(rng, 0.25))
  if rng.random() < 0.6:
    texts[-1].append(language.pick(rng, _OUTROS))
  return _assemble(texts, page_scenes, sides, sentences, rng)


def _listing(rng: np.random.Generator, page_scenes: Sequence[scenes.Scene],
             lines: Sequence[str], titles: Sequence[str],
             intros: Sequence[str], kind: str, preface: Sequence[str] = (),
             **fields) -> Document:
  """A title, an optional intro and the preface, then each image followed
  by its line."""
  texts: list[list[str]] = [[] for _ in range(len(page_scenes) + 1)]
  texts[0].append(language.sentence(language.pick(rng, titles)))
  if rng.random() < 0.7:
    texts[0].append(language.pick(rng, intros))
  texts[0].extend(preface)
  for i, line in enumerate(lines):  # Nothing follows a line but an image,
    texts[i + 1].append(line)  # as in the few-shot prompts.
  doc = _assemble(texts, tuple(page_scenes), ['above'] * len(lines), lines,
                  rng)
  return dataclasses.replace(doc, kind=kind, **fields)


def _quiz(rng: np.random.Generator, num_images: int | None) -> Document:
  num_images = num_images or int(rng.integers(2, MAX_IMAGES + 1))
  page_scenes = [scenes.sample_scene(rng) for _ in range(num_images)]
  lines = []
  for scene in page_scenes:
    asked = 2 if rng.random() < P_SECOND_QUESTION else 1
    qas = [questions.question(scene, rng) for _ in range(asked)]
    lines.append(' '.join(f'Question: {qa.question} Answer: {qa.answer}'
                          for qa in qas))
  return _listing(rng, page_scenes, lines, _QUIZ_TITLES, _QUIZ_INTROS, 'quiz')


def _gallery(rng: np.random.Generator, num_images: int | None) -> Document:
  num_images = num_images or int(rng.integers(2, MAX_IMAGES + 1))
  if rng.random() < P_LABELS:
    page_scenes = [scenes.sample_focus_scene(rng) for _ in range(num_images)]
    lines = [f'Output: {s.objects[0].colour} {s.objects[0].shape}'
             for s in page_scenes]
  else:
    page_scenes = [scenes.sample_scene(rng) for _ in range(num_images)]
    lines = [f'Output: {language.caption(s, rng)}' for s in page_scenes]
  return _listing(rng, page_scenes, lines, _GALLERY_TITLES, _GALLERY_INTROS,
                  'gallery')


def _words(rng: np.random.Generator, num_images: int | None) -> Document:
  """Every word is shown once, then reused: the page's pictures in order."""
  ways = int(language.pick(rng, WORDS_WAYS))
  if num_images is None:
    num_images = int(rng.integers(ways + 2, MAX_IMAGES + 1))
  binding = nonce.bind(rng, ways)
  template = language.pick(rng, nonce.TEMPLATES[binding.attribute])
  order = [int(w) for w in rng.permutation(ways)][:num_images]
  order += [int(w) for w in rng.integers(ways, size=num_images - len(order))]
  page_scenes = [nonce.scene(rng, binding.attribute, binding.values[w])
                 for w in order]
  lines = [template.format(binding.words[w]) for w in order]
  preface = []
  if rng.random() < P_WORD_LIST:
    listed = [binding.words[int(w)] for w in rng.permutation(ways)]
    preface.append(language.pick(rng, _WORD_LISTS).format(
        language.join_list(listed)))
  return _listing(rng, page_scenes, lines, _WORDS_TITLES, _WORDS_INTROS,
                  'words', preface, binding=binding)


def _assemble(texts: Sequence[list[str]],
              page_scenes: tuple[scenes.Scene, ...], sides: Sequence[str],
              sentences: Sequence[str], rng: np.random.Generator
              ) -> Document:
  """Chunks from the text pieces and images, and the reference map."""
  chunks: list[dict] = []
  text_chunk_of: dict[int, int] = {}  # Text piece -> its chunk index.
  for i, piece in enumerate(texts):
    if piece:
      text = ' '.join(piece)
      if i > 0 and rng.random() < 0.5:
        text = ' ' + text  # Web pages may or may not space after an image.
      text_chunk_of[i] = len(chunks)
      chunks.append({'text': text})
    if i < len(page_scenes):
      chunks.append({'image': i})
  references = tuple(
      (text_chunk_of[i + (side == 'above')], side, sentence)
      for i, (side, sentence) in enumerate(zip(sides, sentences)))
  return Document(tuple(chunks), page_scenes, references)
