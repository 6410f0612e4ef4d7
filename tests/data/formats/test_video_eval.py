"""video_qa (MSRVTT-QA, MSVD-QA) and vatex in their published layouts."""

import json

import numpy as np
import pytest

from flamingo_jax.data.formats import video_eval
from tests.data.formats import util

FRAMES = [util.image(seed, 16, 16) for seed in range(8)]


@pytest.fixture(scope='module')
def videos(tmp_path_factory):
  root = tmp_path_factory.mktemp('videos')
  util.write_video(root / 'video7010.mov', FRAMES, fps=4)  # MSRVTT naming.
  util.write_video(root / '-4wsuPCjDBc_5_15.mov', FRAMES[::-1], fps=4)
  for i, frame in enumerate(FRAMES[:4]):  # A frame directory.
    util.write(root / 'Ptf_2VRj-V0_000122_000132' / f'{i:05d}.png',
               util.encode(frame))
  util.write(root / 'youtube_mapping.txt', '-4wsuPCjDBc_5_15 vid1\n')
  return root


def test_video_qa_read_back_as_written(tmp_path, videos):
  src = tmp_path / 'msrvtt_qa'
  util.write(src / 'train_qa.json', json.dumps([
      {'question': 'what is a man doing?', 'answer': 'walk',
       'video_id': 7010, 'id': 5, 'category_id': 0}]))
  util.write(src / 'test_qa.json', json.dumps([
      {'question': 'who is in the video?', 'answer': 'man', 'video_id': 1},
      {'question': 'is it sunny?', 'answer': 'yes',
       'video': 'Ptf_2VRj-V0_000122_000132'}]))
  builder, stats = util.build(
      'video_qa', src, tmp_path / 'out', video_dir=videos,
      video_mapping=videos / 'youtube_mapping.txt', num_frames=4, fps=None,
      frame_format='png')
  assert stats == {'support': {'examples': 1}, 'query': {'examples': 2}}
  (support,) = builder.as_data_source(split='support')
  assert support['id'] == 5
  assert util.text(support['question_type']) == 'what'
  assert util.text(support['answer']) == 'walk'
  np.testing.assert_array_equal(np.stack(support['video']),
                                np.stack([FRAMES[i] for i in (0, 2, 5, 7)]))
  query = {e['id']: e for e in builder.as_data_source(split='query')}
  np.testing.assert_array_equal(  # vid1 -> -4wsuPCjDBc_5_15 (reversed).
      np.stack(query[0]['video']),
      np.stack([FRAMES[::-1][i] for i in (0, 2, 5, 7)]))
  assert util.text(query[0]['question_type']) == 'who'
  assert util.text(query[1]['question_type']) == 'other'
  np.testing.assert_array_equal(np.stack(query[1]['video']),
                                np.stack(FRAMES[:4]))


def test_video_qa_missing_or_short_video_is_an_error(tmp_path, videos):
  src = tmp_path / 'qa'
  util.write(src / 'test_qa.json', json.dumps([
      {'question': 'q?', 'answer': 'a', 'video_id': 99}]))
  with pytest.raises(ValueError, match=r'test_qa\.json\[0\]: no video named '
                     r'99 or video99 or vid99'):
    util.build('video_qa', src, tmp_path / 'out', video_dir=videos,
               annotations={'query': 'test_qa.json'})
  util.write(src / 'short.json', json.dumps([
      {'question': 'q?', 'answer': 'a', 'video': 'Ptf_2VRj-V0_000122_000132'}]))
  with pytest.raises(ValueError, match=r'4 frames, fewer than num_frames=8'):
    util.build('video_qa', src, tmp_path / 'out', video_dir=videos,
               annotations={'query': 'short.json'})
  with pytest.raises(FileNotFoundError, match=r'train_qa\.json does not '
                     'exist'):
    util.build('video_qa', src, tmp_path / 'out', video_dir=videos)


def test_vatex_read_back_as_written(tmp_path, videos):
  src = tmp_path / 'vatex'
  util.write(src / 'vatex_validation_v1.0.json', json.dumps([
      {'videoID': 'Ptf_2VRj-V0_000122_000132',
       'enCap': ['A girl jumps.', '', 'Someone jumps high.'],
       'chCap': ['一个女孩跳。']},
      {'videoID': 'video7010', 'enCap': ['A man walks.']}]))
  builder, stats = util.build(
      'vatex', src, tmp_path / 'out', video_dir=videos,
      annotations={'query': 'vatex_validation_v1.0.json'}, num_frames=2,
      fps=1.0, frame_format='png')
  assert stats == {'query': {'examples': 2, 'dropped_caption/empty': 1}}
  query = {e['id']: e for e in builder.as_data_source(split='query')}
  assert [util.text(c) for c in query[0]['captions']] == [
      'A girl jumps.', 'Someone jumps high.']
  # 4 fps video of 2 s, 2 frames at 1 fps: a 1 s window centred on it.
  times = np.arange(8) / 4
  assert video_eval.video_lib.select_frames(times, 8, 2, 1.0, 'v') == [1, 5]
  np.testing.assert_array_equal(np.stack(query[1]['video']),
                                np.stack([FRAMES[1], FRAMES[5]]))
