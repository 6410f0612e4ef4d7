"""video_pairs: video files (PyAV) and frame directories; frame sampling."""

import numpy as np
import pytest

from flamingo_jax.data import pipeline
from flamingo_jax.data.formats import common
from flamingo_jax.data.formats import video
from tests.data.formats import util

FRAMES = [util.image(seed, 16, 16) for seed in range(12)]


@pytest.mark.parametrize('count, fps, expected', [
    (12, 2.0, [1, 3, 5, 7, 9]),  # 4 fps clip, 2 fps window of 2 s, centred.
    (12, None, [0, 3, 6, 8, 11]),  # Evenly spaced.
    (6, 2.0, [0, 1, 2, 4, 5]),  # Shorter than the window: evenly spaced.
])
def test_select_frames(count, fps, expected):
  times = np.arange(count) / 4
  assert video.select_frames(times, count, 5, fps, 'v') == expected


def test_too_few_frames_is_bad_input():
  with pytest.raises(common.BadInput, match='v.mp4: 3 frames, fewer than '
                     'num_frames=5') as error:
    video.select_frames(None, 3, 5, 1.0, 'v.mp4')
  assert error.value.reason == 'too_few_frames'


def test_video_pairs_read_back_as_written(tmp_path):
  src = tmp_path / 'src'
  util.write_video(src / 'clips' / 'walk.mov', FRAMES, fps=4)
  util.write_video(src / 'clips' / 'short.mov', FRAMES[:3], fps=4)
  for i, frame in enumerate(FRAMES[:6]):  # frame_2 sorts before frame_10.
    util.write(src / 'frames' / 'jump' / f'frame_{2 * i + 2}.png',
               util.encode(frame))
  util.write(src / 'clips' / 'broken.mp4', b'not a video')
  util.write(src / 'videos.csv', 'video,caption\n'
             'clips/walk.mov,A man walks.\nframes/jump,A girl jumps.\n'
             'clips/short.mov,Too short.\nclips/gone.mp4,Missing.\n'
             'clips/broken.mp4,Broken.\nclips/walk.mov,\n')
  builder, stats = util.build('video_pairs', src / 'videos.csv',
                              tmp_path / 'out', num_frames=5, fps=2.0,
                              frame_format='png')
  assert stats == {'train': {'examples': 2, 'skipped/too_few_frames': 1,
                             'skipped/missing_video': 1,
                             'skipped/corrupt_video': 1,
                             'skipped/empty_caption': 1}}
  data = util.by_source(builder.as_data_source(split='train'))
  chunks, (clip,) = pipeline.READERS['video_pairs'](data[f'{src}/videos.csv:2'])
  assert chunks == [{'image': 0}, {'text': 'A man walks.'}]
  np.testing.assert_array_equal(np.stack(clip),
                                np.stack([FRAMES[i] for i in (1, 3, 5, 7, 9)]))
  clip = data[f'{src}/videos.csv:3']['video']  # No frames_fps: evenly spaced.
  np.testing.assert_array_equal(np.stack(clip),
                                np.stack([FRAMES[i] for i in (0, 1, 2, 4, 5)]))
  # The pipeline takes T frames of a stored video.
  media = pipeline.media_array(clip, 5, 16)
  np.testing.assert_array_equal(media[4], FRAMES[5])


def test_max_frames_stores_the_video_at_fps_for_clips_per_step(tmp_path):
  util.write_video(tmp_path / 'src' / 'walk.mov', FRAMES, fps=4)  # 3 s.
  util.write(tmp_path / 'src' / 'v.csv', 'video,caption\nwalk.mov,A walk.\n')
  builder, _ = util.build('video_pairs', tmp_path / 'src' / 'v.csv',
                          tmp_path / 'out', num_frames=2, fps=2.0,
                          max_frames=10, frame_format='png')
  (example,) = builder.as_data_source(split='train')
  stored = np.stack(example['video'])  # All 6 frames at 2 FPS, centred.
  np.testing.assert_array_equal(stored, np.stack(FRAMES[0:12:2]))
  # Training: T consecutive stored frames (T at 2 FPS) from a random start.
  starts = set()
  for seed in range(50):
    clip = pipeline.media_array(list(example['video']), 2, 16,
                                clip_rng=np.random.default_rng(seed))
    start = [i for i in range(5) if (stored[i] == clip[0]).all()][0]
    np.testing.assert_array_equal(clip[1], stored[start + 1])
    starts.add(start)
  assert starts == {0, 1, 2, 3, 4}
  with pytest.raises(ValueError, match='max_frames must be >= num_frames'):
    video.VideoConfig(name='x', source='y', num_frames=4, max_frames=3)


def test_jpeg_frames_and_resizing(tmp_path):
  util.write_video(tmp_path / 'src' / 'walk.mov', FRAMES, fps=4)
  util.write(tmp_path / 'src' / 'v.jsonl',
             '{"video": "walk.mov", "caption": "A walk."}\n')
  builder, _ = util.build('video_pairs', tmp_path / 'src' / 'v.jsonl',
                          tmp_path / 'out', num_frames=3, fps=None,
                          max_image_size=8)
  (example,) = builder.as_data_source(split='train')
  assert np.stack(example['video']).shape == (3, 8, 8, 3)


def test_empty_and_undecodable_videos_are_skipped_and_counted(tmp_path,
                                                              caplog):
  src = tmp_path / 'src'
  whole = util.write_video(src / 'walk.mov', FRAMES, fps=4)
  with open(whole, 'rb') as f:
    data = f.read()
  util.write(src / 'empty.mp4', b'')  # A download that never started.
  util.write(src / 'cut.mov', data[:len(data) // 2])
  util.write(src / 'noise.mp4', bytes(range(256)) * 8)
  util.write(src / 'videos.csv', 'video,caption\nwalk.mov,A walk.\n'
             'empty.mp4,Empty.\ncut.mov,Cut.\nnoise.mp4,Noise.\n'
             'walk.mov,Again.\n')
  caplog.set_level('WARNING')
  builder, stats = util.build('video_pairs', src / 'videos.csv',
                              tmp_path / 'out', num_frames=3, fps=None)
  assert stats == {'train': {'examples': 2, 'skipped/corrupt_video': 3}}
  assert sorted(util.by_source(builder.as_data_source(split='train'))) == [
      f'{src}/videos.csv:2', f'{src}/videos.csv:6']
  assert (f'{src}/videos.csv:3: {src}/empty.mp4: the video file is empty '
          '(0 bytes)') in caplog.text
  for name in ('cut.mov', 'noise.mp4'):
    assert f'{src}/{name}: cannot decode the video' in caplog.text
