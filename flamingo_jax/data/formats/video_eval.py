"""Video evaluation sets in their published formats: `video_qa`, `vatex`.

`video_qa` (MSVD-QA, MSRVTT-QA): `source` is the directory of the
annotation files, each a JSON list of
  {"question": "what is a man doing?", "answer": "play",
   "video_id": 7010 | "video": "video7010.mp4", "id": 12, ...}
`annotations` maps our splits to those files (default: support =
train_qa.json, query = test_qa.json). The question type is the record's
`question_type` if it has one, else its first word when that is one of
what/who/how/when/where (the breakdown these benchmarks report), else
'other'.

`vatex`: `source` is the directory of VATEX's JSON lists of
  {"videoID": "Ptf_2VRj-V0_000122_000132", "enCap": [10 captions], ...}
(default: support = vatex_training_v1.0.json, query =
vatex_validation_v1.0.json).

Videos are looked up in `video_dir` (default: `source`; several
directories may be given separated by commas) by their name without
extension: a video file or a frame directory (see video.py). A record's
`video` field is that name (or a file name); a numeric `video_id` N is
tried as 'N', 'videoN' (MSRVTT) and 'vidN' (MSVD-QA), each first mapped
through `video_mapping` if given: a text file of 'NAME ID' lines such as
MSVD's youtube_mapping.txt ('-4wsuPCjDBc_5_15 vid1').

Features: as the world's video_qa (video, question, answer, question_type)
and video_captions (video, captions: every non-empty reference, so their
number may vary). 'id' is the record's `id`/`question_id` when it is an
integer, else its position.

Bad input: with on_error='raise' (the default for evaluation sets, whose
scores are only comparable when complete) a missing or undecodable video,
a video with too few frames or a record without any caption stops the build
with an error naming the annotation file and record; with 'skip' they are
counted. Blank references among others are dropped and counted
('dropped_caption/empty'). A missing annotation file is always an error.
"""

import dataclasses
import os
import threading
from typing import Any

import tensorflow as tf
import tensorflow_datasets as tfds

from flamingo_jax.data.formats import common
from flamingo_jax.data.formats import files
from flamingo_jax.data.formats import video as video_lib

QUESTION_WORDS = ('what', 'who', 'how', 'when', 'where')


@dataclasses.dataclass(eq=False)
class VideoEvalConfig(video_lib.VideoConfig):
  """Video evaluation options (and VideoConfig's sampling).

  Attributes:
    video_dir: directories of the videos, comma-separated; None: source.
    video_mapping: a 'NAME ID' text file mapping ids to video names.
    annotations: {split: annotation file, relative to source}.
  """
  on_error: str = 'raise'
  video_dir: str | None = None
  video_mapping: str | None = None
  annotations: dict[str, str] = dataclasses.field(default_factory=lambda: {
      'support': 'train_qa.json', 'query': 'test_qa.json'})


@dataclasses.dataclass(eq=False)
class VatexConfig(VideoEvalConfig):
  annotations: dict[str, str] = dataclasses.field(default_factory=lambda: {
      'support': 'vatex_training_v1.0.json',
      'query': 'vatex_validation_v1.0.json'})


class VideoIndex:
  """Video name (without extension) -> video file or frame directory."""

  def __init__(self, directories: str, mapping: str | None):
    self._paths = {}
    for directory in directories.split(','):
      for name in sorted(tf.io.gfile.listdir(directory)):
        path = os.path.join(directory, name.rstrip('/'))
        stem, extension = os.path.splitext(name.rstrip('/'))
        if extension.lower() in video_lib.VIDEO_EXTENSIONS:
          self._paths.setdefault(stem, path)
        elif name.endswith('/') or files.isdir(path):
          self._paths.setdefault(name.rstrip('/'), path)
    self._mapping = {}
    if mapping:
      for line in files.read_bytes(mapping).decode('utf-8').splitlines():
        if line.strip():
          name, key = line.split()[:2]
          self._mapping[key] = name

  def find(self, record: dict[str, Any], where: str) -> str:
    """The video of an annotation record; BadInput('missing_video')."""
    if 'video' in record:
      names = [str(record['video'])]
    elif 'video_id' in record or 'videoID' in record:
      video_id = record.get('video_id', record.get('videoID'))
      names = [str(video_id), f'video{video_id}', f'vid{video_id}']
    else:
      raise ValueError(f'{where}: no "video", "video_id" or "videoID" field; '
                       f'the record has {sorted(record)}.')
    for name in names:
      name = self._mapping.get(name, name)
      for candidate in (name, os.path.splitext(name)[0]):
        if candidate in self._paths:
          return self._paths[candidate]
    raise common.BadInput('missing_video', f'{where}: no video named '
                          f'{" or ".join(names)} in the video directory.')


def question_type(record: dict[str, Any]) -> str:
  if record.get('question_type'):
    return str(record['question_type'])
  words = str(record.get('question', '')).split()
  first = words[0].lower() if words else ''
  return first if first in QUESTION_WORDS else 'other'


class _VideoEvalBuilder(common.FormatBuilder):
  """Annotation lists -> examples with one sampled video each."""

  CONFIG_CLASS = VideoEvalConfig

  def __init__(self, **kwargs):
    super().__init__(**kwargs)
    self._lock = threading.Lock()
    self._index = None

  def videos(self) -> VideoIndex:
    with self._lock:
      if self._index is None:
        config = self.builder_config
        self._index = VideoIndex(config.video_dir or config.source,
                                 config.video_mapping)
      return self._index

  def split_records(self):
    config = self.builder_config
    out = {}
    for split, name in config.annotations.items():
      path = files.resolve(name, config.source)
      records = files.read_json(path)
      if not isinstance(records, list):
        raise ValueError(f'{path}: expected a JSON list of records; got '
                         f'{type(records).__name__}.')
      out[split] = [(f'{path}[{i}]', i, r) for i, r in enumerate(records)]
    return out

  def video(self, record, where):
    return video_lib.load_video(self.videos().find(record, where),
                                self.builder_config)


class VideoQa(_VideoEvalBuilder):
  """Open-ended video QA (MSVD-QA, MSRVTT-QA)."""

  name = 'video_qa'
  DESCRIPTION = 'Open-ended video question answering (MSRVTT-QA-like).'

  def features(self):
    return {'video': video_lib.video_feature(self.builder_config),
            'question': tfds.features.Text(), 'answer': tfds.features.Text(),
            'question_type': tfds.features.Text()}

  def make_example(self, record):
    where, index, row = record
    question = str(files.field(row, 'question', where)).strip()
    answer = str(files.field(row, 'answer', where)).strip()
    own_id = row.get('id', row.get('question_id'))
    return where, {'video': self.video(row, where), 'question': question,
                   'answer': answer, 'question_type': question_type(row),
                   'id': own_id if isinstance(own_id, int) else index}


class Vatex(_VideoEvalBuilder):
  """Video captioning with several references (VATEX)."""

  name = 'vatex'
  CONFIG_CLASS = VatexConfig
  DESCRIPTION = 'Video captioning with English references (VATEX).'

  def features(self):
    return {'video': video_lib.video_feature(self.builder_config),
            'captions': tfds.features.Sequence(tfds.features.Text())}

  def make_example(self, record):
    where, index, row = record
    references = files.field(row, 'enCap', where)
    captions = [str(c).strip() for c in references if c and str(c).strip()]
    if not captions:
      raise common.BadInput('empty_caption', f'{where}: no non-empty caption.')
    dropped = len(references) - len(captions)
    return where, {'video': self.video(row, where), 'captions': captions,
                   'id': index,
                   '_counts': {'dropped_caption/empty': dropped} if dropped
                              else {}}
