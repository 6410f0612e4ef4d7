"""Videos: events need several frames; captions and answers say so."""

import collections

import numpy as np
import pytest

from flamingo_jax.data.world import language
from flamingo_jax.data.world import scenes
from flamingo_jax.data.world import video


def _videos(num, split='train', **kwargs):
  for index in range(num):
    rng = scenes.example_rng('test_video', split, index)
    yield video.sample_video(rng, **kwargs), rng


def _only(objects):
  assert len(objects) == 1, objects
  return objects[0]


def _check_fact_needs_two_frames(fact, v):
  """The fact is false of the first frame alone and of the last alone."""
  first, last = v.frame(0), v.frame(v.num_frames - 1)
  desc = fact.desc
  if fact.event == 'appear':
    assert desc.count(first) < desc.count(last)
  elif fact.event == 'disappear':
    assert desc.count(first) > desc.count(last)
  elif fact.event == 'recolour':
    new = desc.replace(colour=fact.arg)
    assert desc.count(first) > desc.count(last)
    assert new.count(first) < new.count(last)
  elif fact.event in ('grow', 'shrink'):
    before, after = ('small', 'large') if fact.event == 'grow' else (
        'large', 'small')
    assert _only(desc.select(first)).size == before
    assert _only(desc.select(last)).size == after
  else:
    start, end = _only(desc.select(first)), _only(desc.select(last))
    assert start.cell != end.cell
    dx, dy = end.x - start.x, end.y - start.y
    expected = {'left': dx < 0, 'right': dx > 0, 'up': dy < 0,
                'down': dy > 0}
    assert expected[fact.arg], (fact, dx, dy)


def test_caption_facts_need_more_than_one_frame():
  events = collections.Counter()
  for v, rng in _videos(150):
    for text in video.captions(v, rng, 3):
      facts = video.parse_caption(text)
      assert len(facts) == len(v.events), text  # Every event is stated.
      for fact in facts:
        _check_fact_needs_two_frames(fact, v)
        events[fact.event] += 1
  assert set(events) == set(video.EVENTS)


def test_a_false_caption_fails_the_check():
  v, _ = next(_videos(1))
  actor = v.events[0]
  fact = video.VideoFact(language.Description(shape=actor.obj.shape),
                         'appear' if actor.event != 'appear' else
                         'disappear', None)
  with pytest.raises(AssertionError):
    _check_fact_needs_two_frames(fact, v)


def test_frames_render_and_differ():
  v, _ = next(_videos(1, num_frames=5))
  frames = video.render_video(v, 32)
  assert frames.shape == (5, 32, 32, 3) and frames.dtype == np.uint8
  assert frames[0].tobytes() != frames[-1].tobytes()


def test_same_seed_same_video():
  (a, _), (b, _) = next(_videos(1)), next(_videos(1))
  assert a == b
  assert video.render_video(a, 32).tobytes() == video.render_video(
      b, 32).tobytes()


def test_actors_have_unique_shapes():
  for v, _ in _videos(100):
    shapes = [a.obj.shape for a in v.actors]
    for actor in v.events:
      assert shapes.count(actor.obj.shape) == 1


def test_answers_match_the_events():
  types = collections.Counter()
  for v, rng in _videos(150, 'qa'):
    qa = video.question(v, rng)
    types[qa.qtype] += 1
    events = v.events
    by = collections.defaultdict(list)
    for a in events:
      by[a.event].append(a)
    if qa.qtype.endswith('_count'):
      assert qa.answer == str(len(by[qa.qtype.split('_')[0]]))
    elif qa.qtype in ('which_appears', 'which_disappears', 'which_moves',
                      'which_recolours'):
      event = {'which_appears': 'appear', 'which_disappears': 'disappear',
               'which_moves': 'move', 'which_recolours': 'recolour'}[
                   qa.qtype]
      assert qa.answer == _only(by[event]).obj.shape
    elif qa.qtype == 'new_colour':
      assert qa.answer == _only(by['recolour']).new_colour
    elif qa.qtype == 'direction':
      assert qa.answer == _only(by['move']).direction
    elif qa.qtype == 'disappear_colour':
      assert qa.answer == _only(by['disappear']).obj.colour
    else:
      assert qa.answer == _only(by['grow'] + by['shrink']).event
  assert len(types) >= 8


def test_bad_arguments_raise():
  rng = np.random.default_rng(0)
  with pytest.raises(ValueError, match='num_frames'):
    video.sample_video(rng, num_frames=2)
  v = video.sample_video(rng)
  with pytest.raises(ValueError, match='Unknown video question type'):
    video.question(v, rng, 'plot')
  with pytest.raises(ValueError, match='out of range'):
    v.frame(v.num_frames)
