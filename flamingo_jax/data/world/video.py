"""Short videos of the embedded world: objects that move, appear, disappear,
change colour or size, with captions and questions about those changes.

A video is `num_frames` frames (default 8) at `FPS` = 4 frames per second,
i.e. two seconds. It has 1-3 *actors*, each with one event, plus 0-3 static
objects, over one background. Every actor has a shape no other object in the
video has, so "the circle" always names one object. Events:

  move       slides 1 or 2 cells left, right, up or down, over >= 2 frames
  appear     absent in frame 0, present from frame k >= 1 on
  disappear  present in frame 0, absent from frame k <= T-1 on
  recolour   takes a new colour at frame k >= 1
  grow       small, then large from frame k >= 1 on (shrink: the reverse)

So the first and last frames always differ for every event a caption states:
none of them can be told from one frame (the tests check this).

Caption grammar (one clause per event, in time order):
  clause  := NP moves|slides|travels DIRECTION | NP appears|pops up [LOCATION]
           | NP disappears|vanishes | NP turns|becomes COLOUR
           | NP changes from COLOUR to COLOUR | NP grows|gets bigger
           | NP shrinks|gets smaller
  DIRECTION := to the left|right | leftwards | ... | up[wards] | down[wards]
             | from the REGION to the REGION
  caption := [In this video|clip, ] clause [(and|while) clause]...
           | first clause, then clause[, and finally clause]
           | clause while NP stays still

Glossary of shapes:
  T: number of frames.
  H, W: frame height and width.
"""

import dataclasses

import numpy as np

from flamingo_jax.data.world import language
from flamingo_jax.data.world import questions
from flamingo_jax.data.world import scenes

FPS = 4  # Frames per second of every video of the world.
DEFAULT_NUM_FRAMES = 8
MIN_NUM_FRAMES = 3  # A move needs >= 2 frames after its first.
EVENTS = ('move', 'appear', 'disappear', 'recolour', 'grow', 'shrink')
EVENT_WEIGHTS = (0.26, 0.2, 0.2, 0.2, 0.07, 0.07)
DIRECTIONS = {'left': (0, -1), 'right': (0, 1), 'up': (-1, 0), 'down': (1, 0)}
DIRECTION_WORDS = {
    'left': ('to the left', 'leftwards', 'left'),
    'right': ('to the right', 'rightwards', 'right'),
    'up': ('up', 'upwards'),
    'down': ('down', 'downwards'),
}
EVENT_VERBS = {
    'move': ('moves', 'slides', 'travels'),
    'appear': ('appears', 'pops up'),
    'disappear': ('disappears', 'vanishes'),
    'grow': ('grows', 'gets bigger'),
    'shrink': ('shrinks', 'gets smaller'),
}
VIDEO_QUESTION_TYPES = ('appear_count', 'disappear_count', 'which_appears',
                        'which_disappears', 'disappear_colour', 'new_colour',
                        'which_recolours', 'direction', 'which_moves',
                        'size_change')


@dataclasses.dataclass(frozen=True)
class Actor:
  """An object and what happens to it."""
  obj: scenes.Obj  # As first seen (for 'appear': as it appears).
  event: str  # 'static' or one of EVENTS.
  start: int = 0  # Frame at which the change happens (or starts: 'move').
  end: int = 0  # Frame at which a move is complete; == start otherwise.
  target: tuple[float, float] | None = None  # Where a move ends (x, y).
  new_colour: str | None = None  # For 'recolour'.
  new_rgb: tuple[int, int, int] | None = None

  def at(self, t: int) -> scenes.Obj | None:
    """The object as it is in frame t, or None if absent."""
    obj, event = self.obj, self.event
    if event == 'appear':
      return obj if t >= self.start else None
    if event == 'disappear':
      return obj if t < self.start else None
    if event == 'recolour' and t >= self.start:
      return obj.replace(colour=self.new_colour, rgb=self.new_rgb)
    if event in ('grow', 'shrink') and t >= self.start:
      return obj.replace(size='large' if event == 'grow' else 'small')
    if event == 'move':
      f = min(1.0, max(0.0, (t - self.start) / (self.end - self.start)))
      x = obj.x + f * (self.target[0] - obj.x)
      y = obj.y + f * (self.target[1] - obj.y)
      return obj.replace(x=x, y=y)
    return obj

  @property
  def direction(self) -> str | None:
    if self.event != 'move':
      return None
    dx, dy = self.target[0] - self.obj.x, self.target[1] - self.obj.y
    if abs(dx) > abs(dy):
      return 'right' if dx > 0 else 'left'
    return 'down' if dy > 0 else 'up'


@dataclasses.dataclass(frozen=True)
class Video:
  actors: tuple[Actor, ...]  # Event actors first, then static objects.
  background: scenes.Background
  num_frames: int

  def frame(self, t: int) -> tuple[scenes.Obj, ...]:
    """The objects visible in frame t, in drawing order."""
    if not 0 <= t < self.num_frames:
      raise ValueError(f'Frame {t} out of range [0, {self.num_frames}).')
    objects = (a.at(t) for a in self.actors)
    return tuple(o for o in objects if o is not None)

  @property
  def events(self) -> list[Actor]:
    return [a for a in self.actors if a.event != 'static']


def _check_num_frames(num_frames: int) -> None:
  if num_frames < MIN_NUM_FRAMES:
    raise ValueError(f'num_frames must be >= {MIN_NUM_FRAMES}; got '
                     f'{num_frames}.')


def _move_path(rng: np.random.Generator, free: set[tuple[int, int]]
               ) -> tuple[tuple[int, int], tuple[int, int]] | None:
  """A free straight path of 1 or 2 cells: (start cell, end cell)."""
  paths = []
  for direction, (dr, dc) in DIRECTIONS.items():
    del direction  # Only the step matters.
    for length in (1, 2):
      for start in free:
        cells = [(start[0] + k * dr, start[1] + k * dc)
                 for k in range(length + 1)]
        if all(c in free for c in cells):
          paths.append((start, cells[-1]))
  if not paths:
    return None
  return paths[int(rng.integers(len(paths)))]


def _sample_actor(rng: np.random.Generator, event: str, shape: str,
                  free: set[tuple[int, int]], num_frames: int
                  ) -> Actor | None:
  """An actor for `event`, taking its cells out of `free` (None: no room)."""
  colour, _, texture = (scenes.sample_kind(rng)[i] for i in (1, 2, 3))
  size = {'grow': 'small', 'shrink': 'large'}.get(
      event, language.pick(rng, scenes.SIZES))
  if event == 'move':
    path = _move_path(rng, free)
    if path is None:
      return None
    start_cell, end_cell = path
    obj = scenes.place_object(rng, (shape, colour, size, texture), start_cell)
    cx, cy = scenes.cell_centre(start_cell)
    tx, ty = scenes.cell_centre(end_cell)
    # The move keeps the jitter offset: the object stays inside every cell.
    target = (tx + obj.x - cx, ty + obj.y - cy)
    start = int(rng.integers(0, num_frames - 2))
    end = int(rng.integers(start + 2, num_frames))
    for cell in _cells_between(start_cell, end_cell):
      free.discard(cell)
    return Actor(obj, 'move', start, end, target=target)
  cell = sorted(free)[int(rng.integers(len(free)))]
  free.discard(cell)
  # Place with the larger size so a grown object still fits its cell.
  placed = scenes.place_object(rng, (shape, colour, 'large', texture), cell)
  obj = placed.replace(size=size)
  start = int(rng.integers(1, num_frames))
  if event != 'recolour':
    return Actor(obj, event, start, start)
  new_colour = language.pick(
      rng, [c for c in scenes.COLOUR_NAMES if c != colour])
  shift = np.array(obj.rgb) - np.array(scenes.COLOURS[colour])
  new_rgb = tuple(int(v) for v in np.clip(
      np.array(scenes.COLOURS[new_colour]) + shift, 0, 255))
  return Actor(obj, 'recolour', start, start, new_colour=new_colour,
               new_rgb=new_rgb)


def _cells_between(a: tuple[int, int], b: tuple[int, int]):
  rows = range(min(a[0], b[0]), max(a[0], b[0]) + 1)
  cols = range(min(a[1], b[1]), max(a[1], b[1]) + 1)
  return [(r, c) for r in rows for c in cols]


def sample_video(rng: np.random.Generator, *,
                 num_frames: int = DEFAULT_NUM_FRAMES, max_events: int = 3,
                 max_static: int = 3) -> Video:
  """A random video with 1..max_events events and 0..max_static statics."""
  _check_num_frames(num_frames)
  if not 1 <= max_events <= 4:
    raise ValueError(f'max_events must be in [1, 4]; got {max_events}.')
  num_events = int(rng.choice(np.arange(1, max_events + 1),
                              p=_event_count_probs(max_events)))
  shapes = [str(s) for s in rng.permutation(scenes.SHAPES)]
  free = {(r, c) for r in range(scenes.GRID) for c in range(scenes.GRID)}
  actors = []
  while len(actors) < num_events:
    event = language.pick(rng, EVENTS, p=EVENT_WEIGHTS)
    actor = _sample_actor(rng, event, shapes[len(actors)], free, num_frames)
    if actor is not None:
      actors.append(actor)
  static_shapes = shapes[num_events:]
  for _ in range(int(rng.integers(0, max_static + 1))):
    if not free:
      break
    cell = sorted(free)[int(rng.integers(len(free)))]
    free.discard(cell)
    kind = scenes.sample_kind(rng, {'shape': language.pick(rng,
                                                           static_shapes)})
    actors.append(Actor(scenes.place_object(rng, kind, cell), 'static'))
  return Video(actors=tuple(actors),
               background=scenes.sample_background(rng),
               num_frames=num_frames)


def _event_count_probs(max_events: int) -> np.ndarray:
  p = np.array([0.45, 0.4, 0.15, 0.05][:max_events])
  return p / p.sum()


def render_video(video: Video, size: int = scenes.DEFAULT_IMAGE_SIZE
                 ) -> np.ndarray:  # [T, H, W, 3] uint8
  """All frames, over the video's one background."""
  return np.stack([scenes.render(video.frame(t), video.background, size)
                   for t in range(video.num_frames)])


# --------------------------------------------------------------- captions --


def _actor_description(actor: Actor, rng: np.random.Generator
                       ) -> language.Description:
  """Names the actor as first seen; its shape is unique in the video."""
  obj = actor.obj
  keep = {'shape': True,
          'colour': actor.event == 'recolour' or rng.random() < 0.8,
          'size': actor.event not in ('grow', 'shrink') and rng.random() < 0.3,
          'texture': rng.random() < 0.3}
  return language.Description(
      **{a: getattr(obj, a) for a, k in keep.items() if k})


def _clause(actor: Actor, rng: np.random.Generator) -> str:
  body = language.noun_body(_actor_description(actor, rng), rng, many=False)
  subject = f'{language.article(body)} {body}'
  event = actor.event
  if event == 'move':
    verb = language.synonym(rng, EVENT_VERBS['move'], 0.6)
    start, end = actor.obj.region, actor.at(actor.end).region
    if rng.random() < 0.3:
      return f'{subject} {verb} from the {start} to the {end}'
    return f'{subject} {verb} ' + language.synonym(
        rng, DIRECTION_WORDS[actor.direction], 0.6)
  if event == 'recolour':
    new = actor.new_colour
    if rng.random() < 0.3:  # The old colour moves from the subject.
      body = language.noun_body(
          _actor_description(actor, rng).replace(colour=None), rng,
          many=False)
      return (f'{language.article(body)} {body} changes from '
              f'{actor.obj.colour} to {new}')
    verb = language.pick(rng, ('turns', 'becomes'))
    return f'{subject} {verb} {new}'
  verb = language.synonym(rng, EVENT_VERBS[event], 0.7)
  if event == 'appear' and rng.random() < 0.3:
    location = language.best_location([actor.obj])
    return f'{subject} {verb} {language.location_phrase(location, rng)}'
  return f'{subject} {verb}'


def caption(video: Video, rng: np.random.Generator) -> str:
  """A caption stating every event of the video (in time order)."""
  events = sorted(video.events, key=lambda a: (a.start, a.end))
  clauses = [_clause(a, rng) for a in events]
  ordered = all(a.end < b.start for a, b in zip(events, events[1:]))
  statics = [a for a in video.actors if a.event == 'static']
  if len(clauses) > 1 and ordered and rng.random() < 0.5:
    text = f'first {clauses[0]}, then {clauses[1]}'
    if len(clauses) > 2:
      text += ', and finally ' + ' and '.join(clauses[2:])
  elif len(clauses) == 2 and rng.random() < 0.3:
    text = f'{clauses[0]} while {clauses[1]}'
  elif len(clauses) == 1 and statics and rng.random() < 0.3:
    still = statics[int(rng.integers(len(statics)))].obj
    desc = language.Description(shape=still.shape, colour=still.colour)
    matching = desc.count([a.obj for a in statics])
    text = (f'{clauses[0]} while '
            f'{language.noun_phrase(desc, matching, rng)} '
            f'{"stays" if matching == 1 else "stay"} still')
  else:
    text = language.join_list(clauses)
  lead = language.pick(rng, ('', '', 'in this video, ', 'in this clip, '))
  return language.sentence(lead + text)


def captions(video: Video, rng: np.random.Generator, num: int) -> list[str]:
  """`num` reference captions, distinct when the grammar allows."""
  refs: list[str] = []
  for _ in range(num * 10):
    text = caption(video, rng)
    if text not in refs:
      refs.append(text)
    if len(refs) == num:
      break
  return refs + [caption(video, rng) for _ in range(num - len(refs))]


@dataclasses.dataclass(frozen=True)
class VideoFact:
  """One event a caption states: who, what, and the event's argument."""
  desc: language.Description
  event: str  # One of EVENTS.
  arg: str | None  # A direction, a new colour, or None.


def parse_caption(text: str) -> list[VideoFact]:
  """The events a video caption states (the inverse of `caption`)."""
  tokens = language.lex(text)
  facts = []
  for phrase in language.parse_noun_phrases(tokens):
    rest = tokens[phrase.end:phrase.end + 12]  # Enough for any predicate.
    words = ' '.join(t[2] for t in rest)
    fact = _parse_predicate(words, rest, phrase.desc)
    if fact is not None:
      facts.append(fact)
  return facts


def _parse_predicate(words: str, rest, desc) -> VideoFact | None:
  for event, verbs in EVENT_VERBS.items():
    for verb in verbs:
      if not words.startswith(verb):
        continue
      if event != 'move':
        return VideoFact(desc, event, None)
      after = words[len(verb):].strip()
      for direction, phrases in DIRECTION_WORDS.items():
        if any(after.startswith(p) for p in phrases):
          return VideoFact(desc, 'move', direction)
      return VideoFact(desc, 'move', _direction_from_regions(after))
  colours = [t[1] for t in rest if t[0] == 'colour']
  if words.startswith(('turns', 'becomes')) and colours:
    return VideoFact(desc, 'recolour', colours[0])
  if words.startswith('changes from') and len(colours) >= 2:
    return VideoFact(desc.replace(colour=colours[0]), 'recolour', colours[1])
  return None


def _direction_from_regions(words: str) -> str | None:
  """'from the top left to the top right ...' -> 'right'."""
  cells = {name: (r, c) for r, row in enumerate(scenes.REGIONS)
           for c, name in enumerate(row)}
  # Longest names first: 'top' is a prefix of 'top left'.
  names = sorted(cells, key=len, reverse=True)
  for a in names:
    for b in names:
      if words.startswith(f'from the {a} to the {b}'):
        (r0, c0), (r1, c1) = cells[a], cells[b]
        if c1 != c0:
          return 'right' if c1 > c0 else 'left'
        return 'down' if r1 > r0 else 'up'
  return None


# -------------------------------------------------------------- questions --


def _the(actor: Actor, rng: np.random.Generator, colour: bool) -> str:
  desc = language.Description(shape=actor.obj.shape,
                              colour=actor.obj.colour if colour else None)
  return language.noun_phrase(desc, 1, rng, definite=True)


def _video_qa(video: Video, rng: np.random.Generator,
              qtype: str) -> questions.QA | None:
  by_event = {e: [a for a in video.events if a.event == e] for e in EVENTS}
  shape_word = language.pick(rng, ('shape', 'object'))
  if qtype in ('appear_count', 'disappear_count'):
    event = qtype.split('_')[0]
    noun = language.pick(rng, ('objects', 'shapes'))
    return questions.QA(f'How many {noun} {event}?',
                        str(len(by_event[event])), qtype)
  one = {'which_appears': 'appear', 'which_disappears': 'disappear',
         'disappear_colour': 'disappear', 'new_colour': 'recolour',
         'which_recolours': 'recolour', 'direction': 'move',
         'which_moves': 'move'}.get(qtype)
  if qtype == 'size_change':
    actors = by_event['grow'] + by_event['shrink']
  else:
    actors = by_event[one]
  if len(actors) != 1:
    return None
  actor = actors[0]
  if qtype == 'which_appears':
    return questions.QA(f'Which {shape_word} appears?', actor.obj.shape, qtype)
  if qtype == 'which_disappears':
    return questions.QA(f'Which {shape_word} disappears?', actor.obj.shape,
                        qtype)
  if qtype == 'disappear_colour':
    return questions.QA(f'What colour is the {shape_word} that disappears?',
                        actor.obj.colour, qtype)
  if qtype == 'new_colour':
    return questions.QA(
        f'What colour does {_the(actor, rng, colour=True)} turn?',
        actor.new_colour, qtype)
  if qtype == 'which_recolours':
    return questions.QA(f'Which {shape_word} changes colour?',
                        actor.obj.shape, qtype)
  if qtype == 'direction':
    return questions.QA(
        f'Which direction does {_the(actor, rng, colour=False)} move?',
        actor.direction, qtype)
  if qtype == 'which_moves':
    return questions.QA(f'Which {shape_word} moves?', actor.obj.shape, qtype)
  return questions.QA(
      f'Does {_the(actor, rng, colour=False)} grow or shrink?',
      actor.event, qtype)


def question(video: Video, rng: np.random.Generator,
             qtype: str | None = None) -> questions.QA:
  """A question whose answer needs more than one frame, and its answer.

  Args:
    video: the video.
    rng: the example's generator.
    qtype: one of VIDEO_QUESTION_TYPES, or None: a random type that fits.

  Returns:
    The question and its short answer.
  """
  if qtype is not None and qtype not in VIDEO_QUESTION_TYPES:
    raise ValueError(f'Unknown video question type {qtype!r}; expected one '
                     f'of {VIDEO_QUESTION_TYPES}.')
  types = [qtype] if qtype else list(VIDEO_QUESTION_TYPES)
  fitting = [q for q in (_video_qa(video, rng, t) for t in types) if q]
  if not fitting:
    return _video_qa(video, rng, 'appear_count')  # Always possible.
  return fitting[int(rng.integers(len(fitting)))]
