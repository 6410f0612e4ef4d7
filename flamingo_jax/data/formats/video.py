"""Videos: decoding and frame sampling, and video-text pairs (`video_pairs`).

A video is a file in a container FFmpeg reads (.mp4, .webm, .avi, .mkv,
...; decoded with PyAV) or a directory of pre-extracted frames (numbered
image files, ordered by the last number in their names: frame_2.jpg comes
before frame_10.jpg).

Sampling `num_frames` frames at `fps` frames per second: a window of
(num_frames - 1) / fps seconds centred on the video, taking at each time
the last frame shown at or before it. A video shorter than the window
gives `num_frames` frames evenly spaced over all of its frames instead.
With `fps=None` the frames are always evenly spaced. Frame timestamps come
from the container; a frame directory has them only when `frames_fps`
(the rate the frames were extracted at) is given, else frames are evenly
spaced. Frames are stored as `frame_format` ('jpeg', quality 95, or 'png'),
shrunk to `max_image_size` if given.

With `max_frames`, a video stores all its frames at `fps` (the centred
window grown to as many as the video holds, up to max_frames, and at least
num_frames) instead of one fixed clip, so that training draws a new clip
of T consecutive stored frames (T at `fps`) from a random start at every
step (a dataset spec's `random_clip`, see `data.pipeline.media_array`).

`video_pairs`: tables (CSV, TSV, JSONL, Parquet, ...: see `tables`) with
columns `video_key` (a path relative to `video_dir`, default the table's
directory: a video file or a frame directory) and `caption_key`; or, with
`video_path_format`, the path made from the row's columns, e.g. WebVid's
CSV (videoid,contentUrl,duration,page_dir,name) with the videos saved as
<page_dir>/<videoid>.mp4: video_path_format='{page_dir}/{videoid}.mp4',
caption_key='name'. The example has the world's video-pair features:
`video` [num_frames, h, w, 3] and `caption`.

Bad input (skipped and counted with on_error='skip', the default; an error
naming file:line with 'raise'): too_few_frames (fewer frames than
num_frames), missing_video, corrupt_video (an empty file, one FFmpeg cannot
decode, or a frame image that cannot be decoded; 16-bit frames are scaled
to 8 bits as `images.to_rgb` does), empty_caption. Each skip names the
table's file:line and the video file.
"""

import dataclasses
import io
import os
import re
import string

import numpy as np
from PIL import Image
import tensorflow as tf
import tensorflow_datasets as tfds

from flamingo_jax.data import images
from flamingo_jax.data.formats import common
from flamingo_jax.data.formats import files
from flamingo_jax.data.formats import pairs
from flamingo_jax.data.formats import tables

VIDEO_EXTENSIONS = ('.mp4', '.webm', '.avi', '.mkv', '.mov', '.m4v', '.mpg',
                    '.mpeg', '.flv', '.ogv', '.3gp', '.gif')
FRAME_FORMATS = ('jpeg', 'png')


@dataclasses.dataclass(eq=False)
class VideoConfig(common.FormatConfig):
  """How videos are sampled and stored (see the module docstring).

  Attributes:
    num_frames: frames per example.
    fps: sampling rate in frames per second; None: evenly spaced frames.
    frames_fps: the rate frame directories were extracted at (None: unknown,
      their frames are evenly spaced).
    frame_format: 'jpeg' or 'png'.
    max_frames: store up to this many frames at `fps` (at least
      num_frames), for clips drawn at training time; None: num_frames.
  """
  num_frames: int = 8
  fps: float | None = 1.0
  frames_fps: float | None = None
  frame_format: str = 'jpeg'
  max_frames: int | None = None

  def __post_init__(self):
    super().__post_init__()
    if self.num_frames < 1:
      raise ValueError(f'num_frames must be >= 1; got {self.num_frames}.')
    if self.max_frames is not None and self.max_frames < self.num_frames:
      raise ValueError(f'max_frames must be >= num_frames '
                       f'({self.num_frames}); got {self.max_frames}.')
    if self.frame_format not in FRAME_FORMATS:
      raise ValueError(f'frame_format must be one of {FRAME_FORMATS}; got '
                       f'{self.frame_format!r}.')
    for name in ('fps', 'frames_fps'):
      if getattr(self, name) is not None and getattr(self, name) <= 0:
        raise ValueError(f'{name} must be > 0 or None; got '
                         f'{getattr(self, name)}.')


def video_feature(config: VideoConfig) -> tfds.features.Video:
  length = None if config.max_frames else config.num_frames
  return tfds.features.Video(shape=(length, None, None, 3),
                             encoding_format=config.frame_format)


def select_frames(times: np.ndarray | None, count: int, num_frames: int,
                  fps: float | None, where: str,
                  max_frames: int | None = None) -> list[int]:
  """Indices of the sampled frames among `count` (times: [count] seconds).

  With max_frames (and times and fps), as many frames at fps as the video
  holds, from num_frames up to max_frames.
  """
  if count < num_frames:
    raise common.BadInput('too_few_frames', f'{where}: {count} frames, fewer '
                          f'than num_frames={num_frames}.')
  evenly = np.linspace(0, count - 1, num_frames).round().astype(int)
  if times is None or fps is None:
    return evenly.tolist()
  times = np.asarray(times, np.float64) - times[0]  # [count]
  if max_frames:
    held = int(np.floor(times[-1] * fps + 1e-6)) + 1  # Frames at fps.
    num_frames = max(num_frames, min(max_frames, held))
  window = (num_frames - 1) / fps
  if times[-1] < window:
    return evenly.tolist()
  targets = (times[-1] - window) / 2 + np.arange(num_frames) / fps
  picks = np.searchsorted(times, targets + 1e-6, side='right') - 1
  return np.clip(picks, 0, count - 1).tolist()


def _store(frame: np.ndarray, config: VideoConfig) -> bytes:
  image = Image.fromarray(frame)  # [h, w, 3] uint8
  size = config.max_image_size
  if size is not None and max(image.size) > size:
    scale = size / max(image.size)
    image = image.resize(tuple(max(1, round(s * scale)) for s in image.size),
                         Image.BICUBIC)
  return common.encode_image(image, config.frame_format)


def decode_video(path: str, config: VideoConfig) -> list[bytes]:
  """The sampled frames of a video file, encoded; or raises BadInput."""
  import av  # pylint: disable=g-import-not-at-top  # Only videos need it.
  try:
    size = files.size(path)
  except tf.errors.NotFoundError as e:
    raise common.BadInput('missing_video', f'Video file {path} does not '
                          'exist.') from e
  if not size:  # FFmpeg's probing of it would fail inside GFile.
    raise common.BadInput('corrupt_video', f'{path}: the video file is '
                          'empty (0 bytes).')
  try:
    # Pass 1 reads packets only (no decoding) for the frame times.
    with tf.io.gfile.GFile(path, 'rb') as f, av.open(f) as container:
      stream = container.streams.video[0]
      pts = sorted(p.pts for p in container.demux(stream)
                   if p.pts is not None and p.size)
      times = np.array(pts, np.float64) * float(stream.time_base or 0)
    picks = select_frames(times if len(pts) else None, len(pts),
                          config.num_frames, config.fps, path,
                          config.max_frames)
    wanted = set(picks)
    frames = {}
    with tf.io.gfile.GFile(path, 'rb') as f, av.open(f) as container:
      stream = container.streams.video[0]
      stream.thread_type = 'AUTO'
      for index, frame in enumerate(container.decode(stream)):
        if index in wanted:
          frames[index] = _store(frame.to_ndarray(format='rgb24'), config)
        if index >= picks[-1]:
          break
  except (av.FFmpegError, IndexError, ValueError,
          # GFile's errors when FFmpeg seeks outside a damaged file.
          tf.errors.InvalidArgumentError, tf.errors.OutOfRangeError) as e:
    raise common.BadInput('corrupt_video', f'{path}: cannot decode the '
                          f'video: {e}') from e
  if len(frames) < len(wanted):
    raise common.BadInput('corrupt_video', f'{path}: decoded fewer frames '
                          f'than its {len(pts)} packets.')
  return [frames[i] for i in picks]


def frame_files(directory: str) -> list[str]:
  """The image files of a frame directory, in frame order."""
  names = [n for n in tf.io.gfile.listdir(directory)
           if n.lower().endswith(common.IMAGE_EXTENSIONS)]

  def order(name):
    numbers = re.findall(r'\d+', name)
    return (int(numbers[-1]) if numbers else -1, name)

  return [os.path.join(directory, n) for n in sorted(names, key=order)]


def read_frames(directory: str, config: VideoConfig) -> list[bytes]:
  """The sampled frames of a frame directory, encoded; or raises BadInput."""
  paths = frame_files(directory)
  times = (np.arange(len(paths)) / config.frames_fps
           if config.frames_fps and paths else None)
  picks = select_frames(times, len(paths), config.num_frames, config.fps,
                        directory, config.max_frames)
  frames = []
  for i in picks:
    try:
      with Image.open(io.BytesIO(files.read_bytes(paths[i]))) as image:
        frames.append(_store(np.asarray(images.to_rgb(image)), config))
    except Exception as e:  # pylint: disable=broad-except  # PIL raises many.
      raise common.BadInput('corrupt_video', f'{paths[i]}: cannot decode the '
                            f'frame: {e}') from e
  return frames


def load_video(path: str, config: VideoConfig) -> list[bytes]:
  """A video file or frame directory -> its sampled, encoded frames."""
  if files.isdir(path):
    return read_frames(path, config)
  return decode_video(path, config)


# --------------------------------------------------------- video pairs --


@dataclasses.dataclass(eq=False)
class VideoPairsConfig(VideoConfig):
  """Video-text table options (and VideoConfig's sampling).

  Attributes:
    video_dir: base of relative video paths; None: the table's directory.
    video_key: the column (or JSON key) of the video path.
    caption_key: the column (or JSON key) of the caption.
    video_path_format: makes the path from the row's columns instead
      (str.format), e.g. '{page_dir}/{videoid}.mp4'.
  """
  video_dir: str | None = None
  video_key: str = 'video'
  caption_key: str = 'caption'
  video_path_format: str | None = None


class VideoPairs(common.FormatBuilder):
  """Video-text pairs from CSV/JSONL and video files or frame directories."""

  name = 'video_pairs'
  CONFIG_CLASS = VideoPairsConfig
  DESCRIPTION = 'Video-text pairs (VTP-like).'

  def features(self):
    return {'video': video_feature(self.builder_config),
            'caption': tfds.features.Text()}

  def source_files(self, source):
    return tables.list_tables(source)

  def source_records(self, source):
    config = self.builder_config
    if config.video_path_format:
      keys = tuple(dict.fromkeys(
          [name for _, name, _, _ in string.Formatter().parse(
              config.video_path_format) if name] + [config.caption_key]))
    else:
      keys = (config.video_key, config.caption_key)
    return pairs.table_records(source, keys, config.video_dir)

  def make_example(self, record):
    where, row, base = record
    config = self.builder_config
    caption = common.caption_text(row[config.caption_key], where)
    try:
      path = (config.video_path_format.format(**row)
              if config.video_path_format else str(row[config.video_key]))
      frames = load_video(files.resolve(path, base), config)
    except common.BadInput as e:
      raise common.BadInput(e.reason, f'{where}: {e}') from e
    return where, {'video': frames, 'caption': caption}
