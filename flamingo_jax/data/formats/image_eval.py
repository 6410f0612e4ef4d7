"""Image evaluation sets as published: coco_karpathy, coco_captions_json, vqa.

`coco_karpathy` (COCO and Flickr30k captions, Karpathy splits): `source`
is dataset_coco.json (or the directory holding one dataset_*.json):
  {"images": [{"filepath": "val2014", "filename": "COCO_val2014_...jpg",
               "split": "test", "cocoid": 391895,
               "sentences": [{"raw": "A man with a red helmet ..."}, ...]}]}
Images are read from `image_dir` (default: the JSON's directory) /
filepath / filename. `splits` maps our splits to Karpathy's (default:
support = train + restval, query = test, validation = val). Features as the
world's captions: image, captions (every non-empty reference, usually 5;
so their number may vary); 'id' is the cocoid (or imgid).

`coco_captions_json` (COCO's official caption annotations, e.g.
annotations/captions_val2014.json): `source` is the directory holding
`*captions_<subset>.json` (or its `annotations/` subdirectory does):
  {"info": {...}, "licenses": [...],
   "images": [{"id": 391895, "file_name": "COCO_val2014_000000391895.jpg",
               "height": 360, "width": 640, "coco_url": ..., ...}],
   "annotations": [{"image_id": 391895, "id": 770337,
                    "caption": "A man with a red helmet ..."}, ...]}
`subsets` maps our splits to the files' subsets (default: support =
train2014, query = val2014). Images are read from `image_dir` (default:
the directory above `annotations/`, else the JSON's) as <subset>/file_name
or file_name (the first that exists). Features as `coco_karpathy`: image,
captions (an image's annotations in the file's order); 'id' is the image
id. An image without any caption follows on_error ('empty_caption').

`vqa` (VQAv2, OK-VQA): `source` is the directory of the question and
annotation files of each COCO subset, found by their published names
(`*<subset>_questions.json`, `*<subset>_annotations.json`: e.g.
v2_OpenEnded_mscoco_val2014_questions.json and v2_mscoco_val2014_
annotations.json, or OK-VQA's OpenEnded_mscoco_val2014_questions.json and
mscoco_val2014_annotations.json). `subsets` maps our splits to them
(default: support = train2014, query = val2014). Images are COCO's, in
`image_dir` (default: source) as <subset>/COCO_<subset>_%012d.jpg,
COCO_<subset>_%012d.jpg, <subset>/%012d.jpg or %012d.jpg (the first that
exists); test-dev2015's are test2015's. Features as the world's vqa: image,
question, answer (the annotation's multiple_choice_answer, else the most
frequent of its answers), answers (all annotator answers: 10 for both; for
OK-VQA its stemmed `answer`s), question_type (the annotation's, e.g. 'what
color is the'); and raw_answers (OK-VQA's unstemmed `raw_answer`s, else the
answers again: scoring stems predictions with them, see
`evaluation.vqa`), answer_type ('yes/no', 'number', 'other': the server's
breakdown); 'id' is the question_id. A test subset (VQAv2 test-dev2015,
test2015: questions only, e.g. {'test': 'test-dev2015'}) has no annotation
file: its answers are empty, for writing the server's results file
(`evaluation.vqa.vqa_results`).

Bad input: with on_error='raise' (the default: an evaluation set's score is
only comparable when it is complete) a missing or corrupt image, or a
record without any caption, stops the build with an error naming the file
and record; with 'skip' they are counted. Blank references among others are
dropped and counted ('dropped_caption/empty'). A missing annotation file,
(except for a test subset), or a question without its annotation, is
always an error.
"""

import collections
import dataclasses
import os

import tensorflow as tf
import tensorflow_datasets as tfds

from flamingo_jax.data.formats import common
from flamingo_jax.data.formats import files


def _image_feature():
  return tfds.features.Image(shape=(None, None, 3))


def _load(path: str, where: str, config: common.FormatConfig) -> bytes:
  try:
    return common.load_image_file(path, config.max_image_size)
  except common.BadInput as e:
    raise common.BadInput(e.reason, f'{where}: {e}') from e


# ------------------------------------------------------ COCO Karpathy --


@dataclasses.dataclass(eq=False)
class KarpathyConfig(common.FormatConfig):
  """Karpathy-split captions options.

  Attributes:
    image_dir: the image root; None: the JSON's directory.
    splits: {our split: [Karpathy splits]}.
  """
  on_error: str = 'raise'
  image_dir: str | None = None
  splits: dict[str, list[str]] = dataclasses.field(default_factory=lambda: {
      'support': ['train', 'restval'], 'query': ['test'],
      'validation': ['val']})


def _karpathy_json(source: str) -> str:
  if not files.isdir(source):
    return source
  found = tf.io.gfile.glob(os.path.join(source, 'dataset_*.json'))
  if len(found) != 1:
    raise FileNotFoundError(f'Expected one dataset_*.json in {source}; found '
                            f'{found or "none"}.')
  return found[0]


class CocoKarpathy(common.FormatBuilder):
  """Image captioning with reference captions (COCO, Flickr30k)."""

  name = 'coco_karpathy'
  CONFIG_CLASS = KarpathyConfig
  DESCRIPTION = 'Image captioning, Karpathy splits (COCO-like).'

  def features(self):
    return {'image': _image_feature(),
            'captions': tfds.features.Sequence(tfds.features.Text())}

  def split_records(self):
    config = self.builder_config
    path = _karpathy_json(str(config.source))
    images = files.field(files.read_json(path), 'images', path)
    base = config.image_dir or os.path.dirname(path)
    out = {}
    for split, names in config.splits.items():
      names = [names] if isinstance(names, str) else list(names)
      out[split] = [(f'{path}[{i}]', i, image, base)
                    for i, image in enumerate(images)
                    if image.get('split') in names]
    return out

  def make_example(self, record):
    where, index, image, base = record
    where = f'{where} ({image.get("filename")})'
    sentences = files.field(image, 'sentences', where)
    captions = [str(s.get('raw', '')).strip() for s in sentences]
    captions = [c for c in captions if c]
    if not captions:
      raise common.BadInput('empty_caption', f'{where}: no non-empty caption.')
    path = os.path.join(base, image.get('filepath', ''),
                        files.field(image, 'filename', where))
    own_id = image.get('cocoid', image.get('imgid'))
    dropped = len(sentences) - len(captions)
    return where, {
        'image': _load(path, where, self.builder_config), 'captions': captions,
        'id': own_id if isinstance(own_id, int) else index,
        '_counts': {'dropped_caption/empty': dropped} if dropped else {}}


# -------------------------------------------------- COCO official --


@dataclasses.dataclass(eq=False)
class CocoCaptionsConfig(common.FormatConfig):
  """Official COCO captions options.

  Attributes:
    image_dir: the image root; None: the directory above `annotations/`
      (else the JSON's directory).
    subsets: {our split: COCO subset of a captions_<subset>.json file}.
  """
  on_error: str = 'raise'
  image_dir: str | None = None
  subsets: dict[str, str] = dataclasses.field(default_factory=lambda: {
      'support': 'train2014', 'query': 'val2014'})


def _captions_json(source: str, subset: str) -> str:
  if not files.isdir(source):
    return source
  for directory in (source, os.path.join(source, 'annotations')):
    found = tf.io.gfile.glob(os.path.join(directory,
                                          f'*captions_{subset}.json'))
    if len(found) > 1:
      raise FileNotFoundError(f'Expected one *captions_{subset}.json in '
                              f'{directory}; found {found}.')
    if found:
      return found[0]
  raise FileNotFoundError(f'No *captions_{subset}.json in {source} or '
                          f'{os.path.join(source, "annotations")}.')


class CocoCaptions(common.FormatBuilder):
  """Image captioning from COCO's official captions_<subset>.json files."""

  name = 'coco_captions_json'
  CONFIG_CLASS = CocoCaptionsConfig
  DESCRIPTION = 'Image captioning, official COCO caption annotations.'

  def features(self):
    return {'image': _image_feature(),
            'captions': tfds.features.Sequence(tfds.features.Text())}

  def split_records(self):
    config = self.builder_config
    source = str(config.source)
    return {split: self._records(_captions_json(source, subset), subset)
            for split, subset in config.subsets.items()}

  def _records(self, path, subset):
    data = files.read_json(path)
    images = files.field(data, 'images', path)
    captions = collections.defaultdict(list)
    for i, annotation in enumerate(files.field(data, 'annotations', path)):
      where = f'{path}:annotations[{i}]'
      captions[files.field(annotation, 'image_id', where)].append(
          str(files.field(annotation, 'caption', where)))
    base = os.path.dirname(path)
    if os.path.basename(base) == 'annotations':
      base = os.path.dirname(base)
    image_dir = self.builder_config.image_dir or base
    for i, image in enumerate(images):
      image_id = files.field(image, 'id', f'{path}:images[{i}]')
      yield (f'{path}:images[{i}] (id {image_id})', image, image_id,
             captions.get(image_id, []), subset, image_dir)

  def make_example(self, record):
    where, image, image_id, given, subset, image_dir = record
    captions = [c.strip() for c in given if c.strip()]
    if not captions:
      raise common.BadInput('empty_caption', f'{where}: no non-empty caption.')
    name = files.field(image, 'file_name', where)
    paths = [os.path.join(image_dir, subset, name),
             os.path.join(image_dir, name)]
    path = next((p for p in paths if files.exists(p)), paths[0])
    dropped = len(given) - len(captions)
    return where, {
        'image': _load(path, where, self.builder_config), 'captions': captions,
        'id': int(image_id),
        '_counts': {'dropped_caption/empty': dropped} if dropped else {}}


# ---------------------------------------------------------------- VQA --


@dataclasses.dataclass(eq=False)
class VqaConfig(common.FormatConfig):
  """VQAv2 / OK-VQA options.

  Attributes:
    image_dir: the COCO image root; None: source.
    subsets: {our split: COCO subset of the question/annotation files}.
  """
  on_error: str = 'raise'
  image_dir: str | None = None
  subsets: dict[str, str] = dataclasses.field(default_factory=lambda: {
      'support': 'train2014', 'query': 'val2014'})


def _one_file(directory: str, suffix: str) -> str:
  found = tf.io.gfile.glob(os.path.join(directory, f'*{suffix}'))
  if len(found) != 1:
    raise FileNotFoundError(f'Expected one *{suffix} file in {directory}; '
                            f'found {found or "none"}.')
  return found[0]


def majority_answer(answers: list[str]) -> str:
  """The most frequent answer; the first given among equally frequent."""
  counts = collections.Counter(answers)
  return max(answers, key=lambda a: counts[a]) if answers else ''


class Vqa(common.FormatBuilder):
  """Open-ended VQA with annotator answers (VQAv2, OK-VQA)."""

  name = 'vqa'
  CONFIG_CLASS = VqaConfig
  DESCRIPTION = 'Open-ended visual question answering (VQAv2-like).'

  def features(self):
    return {'image': _image_feature(), 'question': tfds.features.Text(),
            'answer': tfds.features.Text(),
            'answers': tfds.features.Sequence(tfds.features.Text()),
            'question_type': tfds.features.Text(),
            'raw_answers': tfds.features.Sequence(tfds.features.Text()),
            'answer_type': tfds.features.Text()}

  def split_records(self):
    config = self.builder_config
    source = str(config.source)
    return {split: self._records(source, subset, config.image_dir or source)
            for split, subset in config.subsets.items()}

  def _records(self, source, subset, image_dir):
    q_path = _one_file(source, f'{subset}_questions.json')
    questions = files.field(files.read_json(q_path), 'questions', q_path)
    if subset.startswith('test') and not tf.io.gfile.glob(
        os.path.join(source, f'*{subset}_annotations.json')):
      annotations = None  # Questions only: answers are the server's.
    else:
      a_path = _one_file(source, f'{subset}_annotations.json')
      annotations = {
          a['question_id']: a for a in
          files.field(files.read_json(a_path), 'annotations', a_path)}
    for i, question in enumerate(questions):
      where = f'{q_path}[{i}]'
      question_id = files.field(question, 'question_id', where)
      if annotations is None:
        yield (f'{where} (question_id {question_id})', question, {},
               subset, image_dir)
        continue
      if question_id not in annotations:
        raise ValueError(f'{where}: question_id {question_id} has no '
                         f'annotation in {a_path}.')
      yield (f'{where} (question_id {question_id})', question,
             annotations[question_id], subset, image_dir)

  def make_example(self, record):
    where, question, annotation, subset, image_dir = record
    image_id = int(files.field(question, 'image_id', where))
    if subset.startswith('test'):
      subset = 'test2015'  # test-dev2015 is a part of test2015's images.
    names = [f'{subset}/COCO_{subset}_{image_id:012d}.jpg',
             f'COCO_{subset}_{image_id:012d}.jpg',
             f'{subset}/{image_id:012d}.jpg', f'{image_id:012d}.jpg']
    paths = [os.path.join(image_dir, name) for name in names]
    path = next((p for p in paths if files.exists(p)), paths[0])
    given = files.field(annotation, 'answers', where) if annotation else []
    answers = [str(a['answer']) for a in given]
    raw_answers = [str(a.get('raw_answer', a['answer'])) for a in given]
    answer = annotation.get('multiple_choice_answer') or majority_answer(
        answers)
    return where, {
        'image': _load(path, where, self.builder_config),
        'question': str(files.field(question, 'question', where)),
        'answer': str(answer), 'answers': answers,
        'question_type': str(annotation.get('question_type', '')),
        'raw_answers': raw_answers,
        'answer_type': str(annotation.get('answer_type', '')),
        'id': int(question['question_id'])}
