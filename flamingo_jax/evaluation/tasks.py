"""Few-shot evaluation tasks: datasets -> examples with the paper's prompts.

A task of `config.eval.tasks` names a dataset, its kind and its metric:

  kind              media  prompt of a shot (query: up to the colon)   answer
  captioning        image  <image>Output: {caption}<EOC>               generated
  vqa               image  <image>Question: {q} Answer: {a}<EOC>       generated
  video_qa          video  <image>Question: {q} Answer: {a}<EOC>       generated
  video_captioning  video  <image>Output: {caption}<EOC>               generated
  classification    image  <image>Output: {class name}<EOC>            scored
  nonce             image  <image>{support text}<EOC>                  generated
  nonce_choice      image  <image>{support text}<EOC>                  scored

  metric         reproduces                    score (all x 100)
  cider          CIDEr-D (COCO, VATEX)         metrics.cider_d
  vqa_accuracy   VQAv2 accuracy                metrics.mean_vqa_accuracy
  okvqa_accuracy OK-VQA (prediction stemmed)   ... stem=True, raw answers
  exact_match    MSRVTT-QA accuracy            metrics.mean_exact_match
  top1           ImageNet top-1                metrics.top1_accuracy

Prompts are those of the paper (§3, App. B.1.5), built with
`formatting.caption_prompt` / `formatting.vqa_prompt`; a query's prompt ends
where the model continues ('<image>Output:', '... Answer:'). A captioning
shot shows the first of the image's reference captions (the dataset's
order), a VQA shot the question's `answer`. Classification is close-ended:
the query '<image>Output:' is continued by every ' {class name}<EOC>' and
the most likely class wins (`runner`); the class names are the world's
`CLASS_NAMES` or, for an `image_folder` dataset, its stored 'label_names'.

The nonce task (`world_nonce`) is solvable only in context: an episode binds
made-up words to shapes or colours through its own support images
('<image>It is leegun.<EOC>'); a query shows a new object and its prompt is
the episode's template up to the word ('<image>It is'); the answer is the
word (its first generated word, exact match). Its shots come from the
episode's support, not from a support split. `nonce_choice` asks the same
queries close-ended: of the episode's words (3; chance is 1 in 3), the one
whose ' {word}{rest of the template}<EOC>' is most likely wins. It tells
whether the model binds a word to what it saw, whether or not it can spell
the word out.

A VQA query keeps its dataset's question_id and answer_type, for the
server's results file and `Task.score_by_answer_type` (VQAv2's yes/no /
number / other); a split without answers (VQAv2 test-dev, read with
`query_split='test'`) is not `Task.answered`: the runner writes its
results file instead of a score.

Datasets: a world builder name ('world_captions') built in the eval
`data_dir` at `sizes`, or a `flamingo_jax.data.formats` dataset
'<format>/<name>' (COCO Karpathy, VQAv2, MSRVTT-QA, VATEX, image folders)
prepared there; splits 'support' and 'query' (or the task's `query_split`)
either way.
"""

from collections.abc import Callable, Mapping, Sequence
import dataclasses
import json
import os
from typing import Any

from absl import logging
import ml_collections
import numpy as np

from flamingo_jax import fs
from flamingo_jax.data import formatting
from flamingo_jax.data import pipeline
from flamingo_jax.data import tokenizer as tokenizer_lib
from flamingo_jax.evaluation import metrics


@dataclasses.dataclass(frozen=True)
class Kind:
  """What a kind of task reads and how it is answered."""
  media: str  # 'image' or 'video': the dataset feature holding the medium.
  metric: str  # The default metric.
  scored: bool = False  # Close-ended (score classes) instead of generated.
  episodic: bool = False  # Shots from the query's own episode (`support`).


KINDS = {
    'captioning': Kind('image', 'cider'),
    'vqa': Kind('image', 'vqa_accuracy'),
    'video_qa': Kind('video', 'exact_match'),
    'video_captioning': Kind('video', 'cider'),
    'classification': Kind('image', 'top1', scored=True),
    'nonce': Kind('image', 'exact_match', episodic=True),
    'nonce_choice': Kind('image', 'top1', scored=True, episodic=True),
}


def _cider(predictions, targets):
  return 100.0 * metrics.cider_d(predictions, targets)


def _vqa(predictions, targets, **options):
  return 100.0 * metrics.mean_vqa_accuracy(predictions, targets, **options)


def _okvqa(predictions, targets, **options):
  return _vqa(predictions, targets, stem=True, **options)


def _exact(predictions, targets):
  return 100.0 * metrics.mean_exact_match(predictions, targets)


def _top1(predictions, targets):
  return 100.0 * metrics.top1_accuracy(predictions, targets)


# metric name -> fn(predictions, targets) -> score x 100.
METRICS: dict[str, Callable[[Sequence[Any], Sequence[Any]], float]] = {
    'cider': _cider,
    'vqa_accuracy': _vqa,
    'okvqa_accuracy': _okvqa,
    'exact_match': _exact,
    'top1': _top1,
}
VQA_METRICS = ('vqa_accuracy', 'okvqa_accuracy')  # Take eval_version.


@dataclasses.dataclass
class Example:
  """One support or query example of a task.

  Attributes:
    medium: the image [H, W, 3] or video (frames) as the dataset gives it.
    shot: the full prompt of this example as a shot ('<image>...<EOC>').
    query: its open prompt, ending where the model continues.
    target: what the metric compares with: reference captions, annotator
      answers, the answer, or the class name.
    support: the nonce task's episode support (None elsewhere).
    choices: a close-ended query's own candidate answers (the nonce
      episode's words); empty: the task's `class_names`.
    choice_format: the continuation scored for a candidate ('{}': it).
    raw_answers: a VQA query's unstemmed answers (OK-VQA), else None.
    question_id: a VQA query's question_id (the dataset's 'id'), for the
      evaluation server's results file.
    answer_type: a VQA query's answer type ('yes/no', 'number', 'other';
      '' when the dataset has none), for the per-type breakdown.
  """
  medium: Any
  shot: str
  query: str
  target: Any
  support: list['Example'] | None = None
  choices: tuple[str, ...] = ()
  choice_format: str = ' {}' + tokenizer_lib.EOC
  raw_answers: tuple[str, ...] | None = None
  question_id: int | None = None
  answer_type: str = ''


@dataclasses.dataclass
class Task:
  """A loaded task: its examples and how to score them."""
  name: str
  dataset: str
  kind: str
  metric: str
  frames: int  # T: frames per medium (1 for images).
  queries: list[Example]
  support: list[Example]  # Empty for the nonce task (episodes carry theirs).
  class_names: tuple[str, ...] = ()  # Classification only.
  max_new_tokens: int | None = None  # Overrides the eval decoding's.
  vqa_eval_version: str = '2016'  # '2016', '2021' or 'openflamingo'.

  @property
  def scored(self) -> bool:
    return KINDS[self.kind].scored

  @property
  def episodic(self) -> bool:
    return KINDS[self.kind].episodic

  def choices(self, query: Example) -> tuple[str, ...]:
    """A close-ended query's candidate answers."""
    return query.choices or self.class_names

  @property
  def answered(self) -> bool:
    """False for a VQA split without answers (VQAv2 test-dev): no score,
    only the evaluation server's results file."""
    return self.kind != 'vqa' or all(q.target for q in self.queries)

  def score(self, predictions: Sequence[Any]) -> float:
    """The task's metric (x 100) of predictions for its first queries."""
    queries = self.queries[:len(predictions)]
    targets = [q.target for q in queries]
    if self.metric in VQA_METRICS:
      return METRICS[self.metric](
          list(predictions), targets, eval_version=self.vqa_eval_version,
          raw_answers_lists=[q.raw_answers for q in queries])
    return METRICS[self.metric](list(predictions), targets)

  def score_by_answer_type(self, predictions: Sequence[str]
                           ) -> dict[str, float] | None:
    """A VQA task's accuracy (x 100) overall and per answer type.

    {'overall': ..., 'yes/no': ..., 'number': ..., 'other': ...} (the types
    its queries have), as the official evaluation's perAnswerType; None for
    other metrics, a split without answers, or a dataset without answer
    types (the embedded world's).
    """
    queries = self.queries[:len(predictions)]
    if (self.metric not in VQA_METRICS or not self.answered
        or not all(q.answer_type for q in queries)):
      return None
    by_type = metrics.accuracy_by_answer_type(
        list(predictions), [q.target for q in queries],
        [q.answer_type for q in queries],
        eval_version=self.vqa_eval_version,
        stem=self.metric == 'okvqa_accuracy',
        raw_answers_lists=[q.raw_answers for q in queries])
    return {name: 100.0 * value for name, value in by_type.items()}


def check_spec(name: str, spec: Mapping[str, Any]) -> None:
  """Raises a ValueError naming the task on an unknown kind or metric."""
  kind = spec.get('kind')
  if kind not in KINDS:
    raise ValueError(f'Task {name!r}: unknown kind {kind!r}; expected one of '
                     f'{sorted(KINDS)}.')
  metric = spec.get('metric') or KINDS[kind].metric
  if metric not in METRICS:
    raise ValueError(f'Task {name!r}: unknown metric {metric!r}; expected one '
                     f'of {sorted(METRICS)}.')
  if not spec.get('dataset'):
    raise ValueError(f'Task {name!r} names no dataset.')
  version = spec.get('vqa_eval_version', '2016')
  if version not in metrics.vqa.EVAL_VERSIONS:
    raise ValueError(f'Task {name!r}: vqa_eval_version must be one of '
                     f'{metrics.vqa.EVAL_VERSIONS}; got {version!r}.')
  if KINDS[kind].episodic and not spec['dataset'].startswith('world_nonce'):
    raise ValueError(f'Task {name!r}: kind {kind} reads world_nonce episodes; '
                     f'got dataset {spec["dataset"]!r}.')


def _text(value: Any) -> str:
  return value.decode('utf-8') if isinstance(value, (bytes, np.bytes_)) else (
      str(value))


def _strip_marker(text: str) -> str:
  return text.replace(tokenizer_lib.IMAGE, '')


def text_only(example: Example) -> str:
  """The example's shot with its image removed (0-shot prompts, App. B.1.5)."""
  return _strip_marker(example.shot)


def make_example(kind: str, raw: Mapping[str, Any]) -> Example:
  """A dataset example (a dict from the data source) -> Example."""
  medium = raw[KINDS[kind].media]
  if kind in ('captioning', 'video_captioning'):
    captions = [_text(c) for c in raw['captions']]
    if not captions:
      raise ValueError('A captioning example has no reference captions.')
    return Example(medium, formatting.caption_prompt(captions[0]),
                   formatting.caption_prompt(None), captions)
  if kind in ('vqa', 'video_qa'):
    question, answer = _text(raw['question']), _text(raw['answer'])
    target = ([_text(a) for a in raw['answers']] if kind == 'vqa'
              else answer)
    raw_answers = [_text(a) for a in raw.get('raw_answers', [])]
    own_id = raw.get('id')
    return Example(medium, formatting.vqa_prompt(question, answer),
                   formatting.vqa_prompt(question), target,
                   raw_answers=(tuple(raw_answers) if kind == 'vqa' and
                                raw_answers else None),
                   question_id=None if own_id is None else int(own_id),
                   answer_type=_text(raw.get('answer_type', b'')))
  if kind == 'classification':
    name = _text(raw['label_name'])
    return Example(medium, formatting.caption_prompt(name),
                   formatting.caption_prompt(None), name)
  raise ValueError(f'make_example: unknown kind {kind!r}.')


def nonce_queries(episode: Mapping[str, Any]) -> list[Example]:
  """The queries of one nonce episode, each carrying the episode's support."""
  template = _text(episode['template'])
  if '{}' not in template:
    raise ValueError(f'Nonce template {template!r} has no {{}} for the word.')
  before, after = template.split('{}', 1)
  prefix = tokenizer_lib.IMAGE + before.rstrip()
  choice_format = ' {}' + after.rstrip() + tokenizer_lib.EOC

  def items(part):
    columns = episode[part]
    return [dict(zip(columns, values)) for values in zip(*columns.values())]

  support = [Example(item['image'],
                     f'{tokenizer_lib.IMAGE}{_text(item["text"])}'
                     f'{tokenizer_lib.EOC}', prefix, _text(item['word']))
             for item in items('support')]
  words = tuple(dict.fromkeys(e.target for e in support))  # In order.
  return [Example(item['image'], '', prefix, _text(item['word']),
                  support=support, choices=words, choice_format=choice_format)
          for item in items('query')]


def _open_source(dataset: str, split: str, data_dir: str, sizes: str,
                 image_size: int):
  spec = ml_collections.ConfigDict(dict(builder=dataset, split=split,
                                        image_size=image_size))
  return pipeline.open_source(spec, data_dir, sizes)


def _class_names(dataset: str, data_dir: str,
                 examples: Sequence[Example]) -> tuple[str, ...]:
  if dataset.startswith('world_'):
    # pylint: disable-next=g-import-not-at-top
    from flamingo_jax.data.world import tasks as world_tasks
    return tuple(world_tasks.CLASS_NAMES)
  from flamingo_jax.data import formats  # pylint: disable=g-import-not-at-top
  builder = formats.load_builder(dataset, data_dir)
  names = (builder.info.metadata or {}).get('label_names')
  path = fs.join(os.fspath(builder.data_dir), 'metadata.json')
  if not names and fs.exists(path):
    names = json.loads(fs.read_text(path)).get('label_names')
  if names:
    return tuple(str(n) for n in names)
  logging.warning('%s stores no label_names; using the names of the loaded '
                  'examples.', dataset)
  return tuple(sorted({e.target for e in examples}))


def ensure_world_data(config: Mapping[str, Any]) -> None:
  """Builds the world evaluation datasets `config` (config.eval) reads."""
  from flamingo_jax.data import world  # pylint: disable=g-import-not-at-top
  for name in sorted({spec['dataset'] for spec in config['tasks'].values()}):
    if not name.startswith('world_'):
      continue
    builder = world.make_builder(name, config['data_dir'], config['sizes'],
                                 config['image_size'])
    if not builder.is_prepared():
      logging.info('Building the embedded world dataset %s (%s) in %s.', name,
                   config['sizes'], config['data_dir'])
      world.build_all(config['data_dir'], config['sizes'], datasets=[name],
                      image_size=config['image_size'], log=logging.info)


def load_task(name: str, spec: Mapping[str, Any], *, data_dir: str,
              sizes: str, image_size: int, num_queries: int | None = None,
              support_size: int | None = None) -> Task:
  """Reads a task's support and query examples.

  Args:
    name: the task's name in config.eval.tasks.
    spec: its config: dataset, kind, optional metric, frames,
      max_new_tokens, data_dir, support_size, class_names, query_split
      (the dataset's split of queries; default 'query', e.g. 'test' for
      VQAv2 test-dev, whose questions have no answers: see `Task.answered`).
    data_dir: where the datasets are (the spec's data_dir wins).
    sizes: the world's split table ('default' or 'tiny').
    image_size: image side of the world builder to read.
    num_queries: read at most this many queries (the first ones).
    support_size: read at most this many support examples (the first ones);
      None or 0: all of them.

  Returns:
    The Task.
  """
  check_spec(name, spec)
  kind, dataset = spec['kind'], spec['dataset']
  data_dir = spec.get('data_dir') or data_dir
  support_size = spec.get('support_size') or support_size
  query_split = spec.get('query_split') or 'query'
  query_source = _open_source(dataset, query_split, data_dir, sizes,
                              image_size)
  count = len(query_source)
  queries, support = [], []
  if KINDS[kind].episodic:
    for index in range(count):
      if num_queries is not None and len(queries) >= num_queries:
        break
      queries.extend(nonce_queries(query_source[index]))
  else:
    count = count if num_queries is None else min(count, num_queries)
    queries = [make_example(kind, query_source[i]) for i in range(count)]
    support_source = _open_source(dataset, 'support', data_dir, sizes,
                                  image_size)
    count = len(support_source)
    count = min(count, support_size) if support_size else count
    support = [make_example(kind, support_source[i]) for i in range(count)]
  if num_queries is not None:
    queries = queries[:num_queries]
  if not queries:
    raise ValueError(f'Task {name!r}: dataset {dataset!r} has no queries.')
  if kind == 'vqa' and any(q.target for q in queries) and not all(
      q.target for q in queries):
    raise ValueError(f'Task {name!r}: some queries of {dataset!r} '
                     f'{query_split} have answers and some have none.')
  frames = int(spec.get('frames') or 1) if KINDS[kind].media == 'video' else 1
  class_names = ()
  if kind == 'classification':
    class_names = tuple(spec.get('class_names') or
                        _class_names(dataset, data_dir, support + queries))
    unknown = sorted({q.target for q in queries} - set(class_names))
    if unknown:
      raise ValueError(f'Task {name!r}: labels {unknown[:5]} are not among '
                       f'its {len(class_names)} class names.')
  return Task(name=name, dataset=dataset, kind=kind,
              metric=spec.get('metric') or KINDS[kind].metric, frames=frames,
              queries=queries, support=support, class_names=class_names,
              max_new_tokens=spec.get('max_new_tokens'),
              vqa_eval_version=spec.get('vqa_eval_version', '2016'))
