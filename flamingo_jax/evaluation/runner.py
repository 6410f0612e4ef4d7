"""The few-shot protocol (paper §3, App. B.1.4-B.1.5): tasks x shots -> scores.

For every query of a task and every number of shots k:

- k > 0: k support examples are its shots, drawn at random per query from
  a generator seeded by (seed, task, query, k) -- reproducible, and
  independent of the other queries and of the batch size -- or, with RICES
  (`rices.py`), the k whose vision features are most similar to the
  query's, the most similar placed last. The prompt is the shots' prompts
  ('<image>Output: {caption}<EOC>', `tasks.py`) followed by the query's
  open prompt ('<image>Output:').
- k = 0: the paper's zero-shot prompt (App. B.1.5): "we build the prompts
  using two examples from the downstream tasks where we remove their
  corresponding images or videos" -- `zero_shot_examples` (2) random support
  examples, text only ('Output: {caption}<EOC>'), then the query with its
  image.
- The nonce tasks draw their shots from the query's own episode support (6
  examples); beyond that many shots, the support repeats, in a new random
  order each pass (an episode has no more). Elsewhere, asking for more
  shots than there are support examples is an error.

Open-ended tasks generate (beam search with the paper's beam of 3, or
greedy with beam_size 1) until `<EOC>`; the text is cut at `<EOC>` (and at a
new 'Question:'/'Output:' if the model runs on), stripped, and lower-cased
for QA. Close-ended tasks (classification, nonce_choice) score
' {class name}<EOC>' for every class (or the query's own choices) after the
prompt (`Decoder.score`, the sum of log-probabilities) and take the argmax;
with `ensemble` = m > 1, the log-likelihoods of m permutations of the shots
are averaged first (the paper's prompt ensembling).

Shapes: every call has one shape per group of tasks with the same media
(frames), answer mode (generated or scored) and max_new_tokens, whatever the
shots: prompts are left-padded to the group's longest prompt (rounded up to
`pad_multiple` tokens, at least `min_prompt_len`), with `pad_media` to as
many media slots as the most shots of the run plus one (empty slots are
encoded but never attended to), and batches are filled up to `batch_size`
with copies of their last prompt. So the default tasks compile four
decoders: image generation, video generation, and image scoring of the 64
classes and of the nonce episodes' 3 words (candidates are [rows, C, Lc]).

Outputs (`evaluate`): `<out>/results.json` = {'scores': {task: {shots:
score}}, 'overall': {shots: overall score}, 'overall_score': the one at
`overall_shots`, 'answer_types': {task: {shots: {'overall', 'yes/no',
'number', 'other'}}} (VQA tasks whose dataset has answer types, VQAv2's),
'vqa_results': {task: {shots: file}}, 'metadata': {...}},
`<out>/scores.png` (`plots.py`), and
`<out>/predictions/<task>_<shots>shot.jsonl` (prompt, prediction, target,
and a VQA query's question_id). A VQA task whose queries have no answers
(VQAv2 test-dev: `query_split='test'`) is not scored; its predictions go to
the evaluation server's results file
`<out>/vqa_results/<task>_<shots>shot.json` ([{question_id, answer}]),
written for every VQA task with `vqa_results=True`.
"""

from collections.abc import Callable, Mapping, Sequence
import dataclasses
import functools
import hashlib
import itertools
import json
import os
import time
from typing import Any

from absl import logging
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from flamingo_jax import fs
from flamingo_jax.data import pipeline
from flamingo_jax.data import tokenizer as tokenizer_lib
from flamingo_jax.evaluation import metrics
from flamingo_jax.evaluation import rices
from flamingo_jax.evaluation import tasks as tasks_lib
from flamingo_jax.inference import generate
from flamingo_jax.inference import prompts
from flamingo_jax.training import metrics as train_metrics

Log = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class Settings:
  """How to run the tasks (the fields of config.eval besides the tasks)."""
  shots: tuple[int, ...] = (0, 4, 8)
  num_queries: int | None = None  # Per task; None: all of 'query'.
  support_size: int = 0  # The first support examples; 0: all.
  batch_size: int = 16
  seed: int = 0
  zero_shot_examples: int = 2
  rices: bool = False
  ensemble: int = 1
  max_new_tokens: int = 20
  beam_size: int = 3
  length_penalty: float = 0.0
  min_new_tokens: int = 0
  pad_multiple: int = 64
  min_prompt_len: int = 0
  pad_media: bool = True
  score_rows: int = 256  # Prompt x candidate rows per scoring call.
  vqa_results: bool = False  # Server files also for answered VQA tasks.
  log_every_secs: float = 5.0

  @classmethod
  def from_config(cls, config: Mapping[str, Any], **overrides: Any
                  ) -> 'Settings':
    """From config.eval (dict or ConfigDict); `overrides` that are not None
    win (e.g. the CLI's --shots)."""
    decoding = dict(config.get('decoding') or {})
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in dict(config).items() if k in fields}
    values.update({k: v for k, v in decoding.items() if k in fields})
    values.update({k: v for k, v in overrides.items() if v is not None})
    values['shots'] = tuple(int(s) for s in values.get('shots', cls.shots))
    settings = cls(**values)
    settings.check()
    return settings

  def check(self) -> None:
    if not self.shots or any(s < 0 for s in self.shots):
      raise ValueError(f'shots must be a non-empty list of numbers >= 0; got '
                       f'{self.shots}.')
    for name in ('batch_size', 'ensemble', 'beam_size', 'pad_multiple',
                 'score_rows'):
      if getattr(self, name) < 1:
        raise ValueError(f'{name} must be >= 1; got {getattr(self, name)}.')
    if self.num_queries is not None and self.num_queries < 1:
      raise ValueError(f'num_queries must be >= 1; got {self.num_queries}.')


# ------------------------------------------------------- choosing shots --


def _stable_hash(text: str) -> int:
  return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], 'little')


def query_rng(seed: int, task: str, query: int, shots: int
              ) -> np.random.Generator:
  """The generator of one query's shots: a pure function of its arguments."""
  return np.random.default_rng([seed, _stable_hash(task), query, shots])


def sample_support(num_support: int, shots: int, *, seed: int, task: str,
                   query: int, repeat: bool = False) -> np.ndarray:
  """Indices of `shots` random support examples for one query.

  Args:
    num_support: the size of the support set.
    shots: how many to draw (without replacement).
    seed: the evaluation seed.
    task: the task's name (different tasks draw differently).
    query: the query's index in the task.
    repeat: allow more shots than support examples, by concatenating random
      permutations of the support (the nonce task's episodes).

  Returns:
    int [shots].

  Raises:
    ValueError: an empty support set with shots > 0, or (without `repeat`)
      more shots than support examples; both name the task.
  """
  if shots == 0:
    return np.zeros([0], np.int64)
  if num_support == 0:
    raise ValueError(f'Task {task!r}: {shots} shots asked for but its support '
                     'set is empty.')
  rng = query_rng(seed, task, query, shots)
  if shots > num_support:
    if not repeat:
      raise ValueError(f'Task {task!r}: {shots} shots asked for but it has '
                       f'only {num_support} support examples.')
    passes = -(-shots // num_support)
    return np.concatenate([rng.permutation(num_support)
                           for _ in range(passes)])[:shots]
  return rng.choice(num_support, size=shots, replace=False)


def _support_of(task: tasks_lib.Task, query: tasks_lib.Example
                ) -> list[tasks_lib.Example]:
  return query.support if query.support is not None else task.support


@dataclasses.dataclass
class Choices:
  """A close-ended task's candidates per query (`Evaluator._choices`)."""
  labels: list[tuple[str, ...]]  # Per row, the answers it stands for.
  tokens: np.ndarray  # [R, C, Lc] int32: ' {label}<EOC>', right-padded.
  valid: np.ndarray  # [R, C, Lc] bool
  # R = 1 when all queries share the task's class names, else Q.

  def of(self, queries: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """[len(queries), C, Lc] tokens and valid for these queries."""
    rows = np.asarray(queries) if len(self.labels) > 1 else np.zeros(
        len(queries), np.int64)
    return self.tokens[rows], self.valid[rows]

  def label(self, query: int, index: int) -> str:
    return self.labels[query if len(self.labels) > 1 else 0][index]


@dataclasses.dataclass
class Prompt:
  """One query's prompt: text with <image> markers and its media."""
  text: str
  media: list[Any]


def build_prompt(query: tasks_lib.Example, shots: Sequence[tasks_lib.Example],
                 *, zero_shot: Sequence[tasks_lib.Example] = ()) -> Prompt:
  """The shots' prompts (or text-only examples for 0-shot), then the query.

  Args:
    query: the query example.
    shots: its shots, in prompt order (the last is nearest the query).
    zero_shot: with no shots, the text-only examples of the 0-shot prompt.

  Returns:
    The prompt (its media: the shots' then the query's).
  """
  if shots and zero_shot:
    raise ValueError('Give either shots or zero-shot text examples, not both.')
  prefix = ''.join(s.shot for s in shots) + ''.join(
      tasks_lib.text_only(e) for e in zero_shot)
  return Prompt(prefix + query.query,
                [s.medium for s in shots] + [query.medium])


def choose_shots(task: tasks_lib.Task, query_index: int, shots: int,
                 settings: Settings, retrieved: np.ndarray | None = None
                 ) -> tuple[list[tasks_lib.Example], list[tasks_lib.Example]]:
  """(shots, zero-shot text examples) of one query, in prompt order."""
  query = task.queries[query_index]
  support = _support_of(task, query)
  repeat = task.episodic
  if shots == 0:
    count = min(settings.zero_shot_examples, len(support))
    if settings.zero_shot_examples and not support:
      raise ValueError(f'Task {task.name!r}: the 0-shot prompt needs '
                       f'{settings.zero_shot_examples} text-only support '
                       'examples but the support set is empty.')
    picks = sample_support(len(support), count, seed=settings.seed,
                           task=task.name, query=query_index)
    return [], [support[i] for i in picks]
  if retrieved is not None:
    return [support[i] for i in retrieved], []
  picks = sample_support(len(support), shots, seed=settings.seed,
                         task=task.name, query=query_index, repeat=repeat)
  return [support[i] for i in picks], []


def check_shots(task: tasks_lib.Task, shots: Sequence[int]) -> None:
  """Raises the ValueError of `sample_support` for impossible shots."""
  for query in task.queries[:1] if task.episodic else [None]:
    support = task.support if query is None else query.support
    for k in shots:
      sample_support(len(support), k, seed=0, task=task.name, query=0,
                     repeat=task.episodic)


# -------------------------------------------------------------- RICES --


def _config_key(model_config: Mapping[str, Any]) -> str:
  as_dict = (model_config.to_dict() if hasattr(model_config, 'to_dict')
             else dict(model_config))
  return json.dumps(as_dict, sort_keys=True, default=str)


# One decoder and feature function per model config in a process, so that
# evaluating several checkpoints (or re-running) reuses their compilations.
@functools.lru_cache(maxsize=8)
def _decoder(config_key: str, compute_dtype: Any) -> generate.Decoder:
  return generate.Decoder(json.loads(config_key), compute_dtype=compute_dtype)


@functools.lru_cache(maxsize=8)
def _feature_fn(config_key: str, compute_dtype: Any):
  return rices.feature_fn(json.loads(config_key), compute_dtype=compute_dtype)


class Retriever:
  """RICES shots of a task's queries, features cached on disk."""

  def __init__(self, params: hk.Params, model_config: Mapping[str, Any], *,
               image_size: int, compute_dtype: Any, cache_dir: str | None,
               step: int | None, batch_size: int = 32):
    self._params, self._image_size = params, image_size
    self._fn = _feature_fn(_config_key(model_config), compute_dtype)
    self._cache_dir, self._step, self._batch = cache_dir, step, batch_size
    self._fingerprint = rices.params_fingerprint(params)

  def _features(self, task: tasks_lib.Task, split: str,
                examples: Sequence[tasks_lib.Example]) -> np.ndarray:
    key = rices.cache_key(
        dataset=task.dataset, split=split, count=len(examples),
        texts=hashlib.sha256(''.join(e.shot + e.query for e in examples)
                             .encode()).hexdigest(),
        frames=task.frames, image_size=self._image_size, step=self._step,
        params=self._fingerprint)
    # Named by dataset: tasks on one dataset (nonce, nonce_choice) share it.
    name = task.dataset.replace('/', '_')
    path = (fs.join(self._cache_dir, f'{name}_{split}_{key}.npy')
            if self._cache_dir else None)

    def compute():
      media = [_frames(e.medium, task.frames, self._image_size)
               for e in examples]
      return rices.compute_features(self._fn, self._params, media,
                                    self._batch)

    return rices.cached(path, compute)

  def shots(self, task: tasks_lib.Task, shots: int) -> np.ndarray:
    """[Q, shots] support indices per query, most similar last."""
    query_features = self._features(task, 'query', task.queries)
    if not task.episodic:
      if shots > len(task.support):
        raise ValueError(f'Task {task.name!r}: {shots} shots asked for but it '
                         f'has only {len(task.support)} support examples.')
      return rices.nearest(query_features,
                           self._features(task, 'support', task.support),
                           shots)
    # Nonce: retrieve within each query's own episode.
    episodes, owner = [], []
    for query in task.queries:
      if not episodes or episodes[-1] is not query.support:
        episodes.append(query.support)
      owner.append(len(episodes) - 1)
    flat = [e for episode in episodes for e in episode]
    features = self._features(task, 'support', flat)
    starts = np.cumsum([0] + [len(e) for e in episodes])
    out = []
    for q, episode in enumerate(owner):
      pool = features[starts[episode]:starts[episode + 1]]
      k = min(shots, len(pool))
      order = rices.nearest(query_features[q:q + 1], pool, k)[0]
      if shots > k:  # Repeat the episode, the most similar still last.
        order = np.tile(order, -(-shots // k))[-shots:]
      out.append(order)
    return np.stack(out)


# ------------------------------------------------------------- batches --


def _frames(medium: Any, frames: int, image_size: int) -> np.ndarray:
  """A dataset medium -> uint8 [frames, image_size, image_size, 3]."""
  return pipeline.media_array(medium, frames, image_size)


def _pad_batch(batch: dict[str, np.ndarray], rows: int, width: int,
               num_media: int) -> dict[str, np.ndarray]:
  """Left-pads columns to `width`, adds media slots and copies of the last
  row up to `rows` (so every call has one shape)."""
  have_rows, have_width = batch['tokens'].shape
  out = {}
  for key in ('tokens', 'valid', 'media_index'):
    value = np.pad(batch[key], [(0, 0), (width - have_width, 0)])
    out[key] = value
  extra = num_media - batch['media'].shape[1]
  out['media'] = np.pad(batch['media'], [(0, 0), (0, extra)] +
                        [(0, 0)] * (batch['media'].ndim - 2))
  out['media_mask'] = np.pad(batch['media_mask'], [(0, 0), (0, extra)])
  if rows > have_rows:
    out = {k: np.concatenate([v, np.repeat(v[-1:], rows - have_rows, 0)])
           for k, v in out.items()}
  return out


class Progress:
  """Logs '<task> <k>-shot: done/n | queries/s | ETA' every few seconds."""

  def __init__(self, total: int, every_secs: float, log: Log):
    self._total, self._every, self._log = total, every_secs, log
    self._done_all = 0
    self._start_all = time.time()

  def start(self, label: str, count: int) -> None:
    self._label, self._count, self._done = label, count, 0
    self._start = self._last = time.time()

  def update(self, done: int) -> None:
    self._done_all += done - self._done
    self._done = done
    now = time.time()
    if now - self._last >= self._every or done == self._count:
      self._last = now
      rate = done / max(now - self._start, 1e-9)
      rate_all = self._done_all / max(now - self._start_all, 1e-9)
      eta = (self._count - done) / rate if rate else float('nan')
      eta_all = (self._total - self._done_all) / rate_all if rate_all else (
          float('nan'))
      self._log(f'{self._label}: {done}/{self._count} '
                f'({100 * done / max(self._count, 1):.0f}%) | '
                f'{rate:.1f} queries/s | ETA {_duration(eta)} '
                f'(all tasks: {_duration(eta_all)})')


def _duration(seconds: float) -> str:
  return train_metrics.format_duration(seconds) if np.isfinite(seconds) else '?'


# ---------------------------------------------------------- evaluation --


def postprocess(text: str, kind: str) -> str:
  """A generation -> the answer the metric reads."""
  text = text.split(tokenizer_lib.EOC)[0]
  for stop in ('Question:', 'Answer:', 'Output:', '\n'):
    text = text.split(stop)[0]
  text = text.strip()
  if kind in ('vqa', 'video_qa'):
    return text.lower()
  if kind == 'nonce':
    words = text.split()
    return words[0].strip('.,!?;:\'"').lower() if words else ''
  return text


class Evaluator:
  """Runs tasks x shots with one model (one Decoder: compilations shared)."""

  def __init__(self, params: hk.Params, model_config: Mapping[str, Any],
               tokenizer: tokenizer_lib.Tokenizer, settings: Settings, *,
               image_size: int, compute_dtype: Any = jnp.float32,
               cache_dir: str | None = None, step: int | None = None,
               log: Log = logging.info):
    self.params = jax.device_put(params)
    self.model_config = model_config
    self.tokenizer, self.settings = tokenizer, settings
    self.image_size, self.log = image_size, log
    self.decoder = _decoder(_config_key(model_config), compute_dtype)
    self._compute_dtype, self._cache_dir, self._step = (compute_dtype,
                                                        cache_dir, step)
    self._retriever = None
    self.progress = Progress(0, settings.log_every_secs, log)

  def _options(self, task: tasks_lib.Task) -> generate.Options:
    stop_ids, banned_ids = generate.special_ids(
        self.tokenizer, self.model_config['lm']['vocab_size'])
    return generate.Options(
        max_new_tokens=task.max_new_tokens or self.settings.max_new_tokens,
        stop_ids=stop_ids, banned_ids=banned_ids,
        beam_size=self.settings.beam_size,
        length_penalty=self.settings.length_penalty,
        min_new_tokens=self.settings.min_new_tokens)

  def retriever(self) -> Retriever:
    if self._retriever is None:
      self._retriever = Retriever(
          self.params, self.model_config, image_size=self.image_size,
          compute_dtype=self._compute_dtype, cache_dir=self._cache_dir,
          step=self._step, batch_size=self.settings.batch_size)
    return self._retriever

  def make_prompts(self, task: tasks_lib.Task, shots: int
              ) -> list[list[Prompt]]:
    """Per query, its prompts (several with prompt ensembling)."""
    settings = self.settings
    retrieved = (self.retriever().shots(task, shots)
                 if settings.rices and shots else None)
    out = []
    for q, query in enumerate(task.queries):
      chosen, zero = choose_shots(
          task, q, shots, settings,
          None if retrieved is None else retrieved[q])
      orders = [list(range(len(chosen)))]
      if task.scored and settings.ensemble > 1 and len(chosen) > 1:
        orders = _permutations(len(chosen), settings.ensemble,
                               np.random.default_rng(
                                   [settings.seed, _stable_hash(task.name), q,
                                    shots, 1]))
      out.append([build_prompt(query, [chosen[i] for i in order],
                               zero_shot=zero) for order in orders])
    return out

  def _encode(self, task: tasks_lib.Task, prompt: Prompt
              ) -> prompts.EncodedPrompt:
    media = [_frames(m, task.frames, self.image_size) for m in prompt.media]
    return prompts.encode(self.tokenizer, prompt.text, media, self.image_size)

  def prompt_length(self, prompt: Prompt) -> int:
    """Tokens of a prompt, <BOS> included (no media decoded)."""
    return 1 + len(self.tokenizer.encode(prompt.text))

  def width(self, lengths: Sequence[int]) -> int:
    """The padded width of prompts of these lengths."""
    multiple = self.settings.pad_multiple
    return max(self.settings.min_prompt_len,
               -(-max(lengths) // multiple) * multiple)

  def run_task(self, task: tasks_lib.Task, shots: int, *,
               per_query: Sequence[Sequence[Prompt]] | None = None,
               width: int | None = None, num_media: int | None = None
               ) -> tuple[float | None, list[dict[str, Any]]]:
    """The task's score at `shots` and its per-query records.

    Args:
      task: the task.
      shots: the number of shots.
      per_query: its prompts (`make_prompts`), if already made.
      width: pad prompts to this many tokens (default: `self.width` of
        these prompts).
      num_media: pad to this many media slots (default: shots + 1).

    Returns:
      (score, records); the score is None for a task without answers
      (`Task.answered`).
    """
    settings = self.settings
    if per_query is None:
      per_query = self.make_prompts(task, shots)
    flat = [(q, p) for q, group in enumerate(per_query) for p in group]
    if width is None:
      width = self.width([self.prompt_length(p) for _, p in flat])
    num_media = num_media or shots + 1
    rows = settings.batch_size
    if task.scored:
      choices = self._choices(task)
      rows = min(rows, max(1, settings.score_rows // choices.tokens.shape[1]))
    self.progress.start(f'{task.name} {shots}-shot', len(task.queries))
    outputs = []
    for start in range(0, len(flat), rows):
      owners = [q for q, _ in flat[start:start + rows]]
      chunk = [self._encode(task, p) for _, p in flat[start:start + rows]]
      batch = _pad_batch(prompts.collate(chunk, pad_multiple=1), rows, width,
                         num_media)
      if task.scored:
        owners += owners[-1:] * (rows - len(owners))  # The padding rows'.
        scores = np.asarray(self.decoder.score(
            self.params, batch, *choices.of(owners)))  # [rows, C]
        outputs.extend(scores[:len(chunk)])
      else:
        outputs.extend(self._generate(task, batch)[:len(chunk)])
      self.progress.update(flat[min(start + rows, len(flat)) - 1][0] + 1)
    records, predictions = [], []
    for q, query in enumerate(task.queries):
      mine = [o for (owner, _), o in zip(flat, outputs) if owner == q]
      if task.scored:
        mean = np.mean(np.stack(mine), axis=0)  # [C]
        prediction = raw = choices.label(q, int(np.argmax(mean)))
      else:
        raw = mine[0]
        prediction = postprocess(raw, task.kind)
      predictions.append(prediction)
      records.append(dict(query=q, prompt=per_query[q][0].text,
                          generation=raw, prediction=prediction,
                          target=query.target))
      if query.question_id is not None:
        records[-1]['question_id'] = query.question_id
    return (task.score(predictions) if task.answered else None), records

  def _choices(self, task: tasks_lib.Task) -> Choices:
    """Every query's candidate continuations (' {class}<EOC>'), tokenised.

    One [C, Lc] shape for the whole task: C its most choices (a query with
    fewer repeats its first, which never changes the argmax) and Lc its
    longest continuation, right-padded (`valid` marks the tokens).
    """
    encoded = {}  # (label, format) -> ids; classes are shared by queries.
    labels, ids = [], []
    shared = not any(query.choices for query in task.queries)
    for query in task.queries[:1] if shared else task.queries:
      mine = task.choices(query)
      labels.append(mine)
      ids.append([encoded.setdefault(
          (label, query.choice_format), self.tokenizer.encode(
              query.choice_format.format(label))) for label in mine])
    num = max(len(mine) for mine in labels)
    length = max(len(seq) for mine in ids for seq in mine)
    tokens = np.zeros([len(ids), num, length], np.int32)
    valid = np.zeros([len(ids), num, length], bool)
    for q, mine in enumerate(ids):
      mine = mine + mine[:1] * (num - len(mine))
      for c, seq in enumerate(mine):
        tokens[q, c, :len(seq)] = seq
        valid[q, c, :len(seq)] = True
    return Choices(labels, tokens, valid)

  def _generate(self, task: tasks_lib.Task, batch) -> list[str]:
    options = self._options(task)
    if options.beam_size == 1:
      result = self.decoder.greedy(self.params, batch, options)
    else:
      result = self.decoder.beam_search(self.params, batch, options)
    tokens = np.asarray(result.tokens)
    lengths = np.asarray(result.lengths)
    return [self.tokenizer.decode(row[:length])
            for row, length in zip(tokens, lengths)]


def _permutations(count: int, num: int, rng: np.random.Generator
                  ) -> list[list[int]]:
  """`num` distinct orders of `count` shots, the identity first."""
  identity = list(range(count))
  if np.prod(range(1, count + 1)) <= num:
    return [list(p) for p in itertools.permutations(identity)]
  orders = [identity]
  while len(orders) < num:
    order = [int(i) for i in rng.permutation(count)]
    if order not in orders:
      orders.append(order)
  return orders


def _reference(reference: Mapping[str, Any], task: str, shots: int
               ) -> float | None:
  value = reference.get(task)
  if isinstance(value, Mapping):
    value = value.get(str(shots), value.get(shots))
  return None if value is None else float(value)


def overall_scores(scores: Mapping[str, Mapping[str, float]],
                   reference: Mapping[str, Any]) -> dict[str, float]:
  """{shots: metrics.overall_score over the tasks with a reference > 0}."""
  out = {}
  shots_all = sorted({int(s) for by_shots in scores.values()
                      for s in by_shots})
  for shots in shots_all:
    have, ref = {}, {}
    for task, by_shots in scores.items():
      value = _reference(reference, task, shots)
      if str(shots) in by_shots and value:
        have[task], ref[task] = by_shots[str(shots)], value
    if have:
      out[str(shots)] = metrics.overall_score(have, ref)
  return out


def evaluate(eval_config: Mapping[str, Any], params: hk.Params,
             model_config: Mapping[str, Any],
             tokenizer: tokenizer_lib.Tokenizer, *,
             out_dir: str | None = None,
             task_names: Sequence[str] | None = None,
             step: int | None = None, compute_dtype: Any = jnp.float32,
             log: Log = logging.info, **overrides: Any) -> dict[str, Any]:
  """Runs every task x shots of `eval_config` (config.eval).

  Args:
    eval_config: config.eval (`tasks.default_eval_config`).
    params: the model's parameters.
    model_config: config.model.
    tokenizer: the tokenizer.
    out_dir: where results.json, scores.png, predictions/ and the RICES
      feature cache (cache/) go; nothing is written if None.
    task_names: run only these tasks (default: all of eval_config.tasks).
    step: the checkpoint's step, for the metadata and the feature cache.
    compute_dtype: the model's compute dtype.
    log: where progress lines go.
    **overrides: `Settings` fields that replace the config's when not None
      (shots, num_queries, rices, ...).

  Returns:
    The results (as written to results.json).

  Raises:
    ValueError: an unknown task name, kind or metric, or impossible shots.
  """
  started = time.time()
  if hasattr(eval_config, 'to_dict'):  # A ConfigDict: plain dicts below.
    eval_config = eval_config.to_dict()
  settings = Settings.from_config(eval_config, **overrides)
  specs = dict(eval_config['tasks'])
  names = list(task_names or specs)
  unknown = [n for n in names if n not in specs]
  if unknown:
    raise ValueError(f'Unknown tasks {unknown}; config.eval.tasks has '
                     f'{sorted(specs)}.')
  for name in names:
    tasks_lib.check_spec(name, specs[name])
  tasks_lib.ensure_world_data(
      {**dict(eval_config), 'tasks': {n: specs[n] for n in names}})
  loaded = [tasks_lib.load_task(
      name, specs[name], data_dir=eval_config['data_dir'],
      sizes=eval_config['sizes'], image_size=eval_config['image_size'],
      num_queries=settings.num_queries, support_size=settings.support_size)
            for name in names]
  for task in loaded:  # Fail before any work on impossible shots.
    check_shots(task, settings.shots)
  cache_dir = fs.join(out_dir, 'cache') if out_dir else None
  evaluator = Evaluator(params, model_config, tokenizer, settings,
                        image_size=eval_config['image_size'],
                        compute_dtype=compute_dtype, cache_dir=cache_dir,
                        step=step, log=log)
  evaluator.progress = Progress(
      sum(len(t.queries) for t in loaded) * len(settings.shots),
      settings.log_every_secs, log)
  # Prompts first (text and media references only), so that every task
  # with the same media and decoding can share one padded width.
  all_prompts = {(task.name, shots): evaluator.make_prompts(task, shots)
                 for task in loaded for shots in settings.shots}
  widths = {}
  for task in loaded:
    group = (task.frames, task.scored, task.max_new_tokens)
    widths.setdefault(group, []).extend(
        evaluator.prompt_length(p) for shots in settings.shots
        for prompts_of_query in all_prompts[task.name, shots]
        for p in prompts_of_query)
  widths = {group: evaluator.width(lengths)
            for group, lengths in widths.items()}
  scores: dict[str, dict[str, float]] = {}
  by_type: dict[str, dict[str, dict[str, float]]] = {}
  server_files: dict[str, dict[str, str]] = {}
  max_shots = max(settings.shots)
  for task in loaded:
    for shots in settings.shots:
      score, records = evaluator.run_task(
          task, shots, per_query=all_prompts[task.name, shots],
          width=widths[task.frames, task.scored, task.max_new_tokens],
          num_media=(max_shots if settings.pad_media else shots) + 1)
      predictions = [r['prediction'] for r in records]
      if score is None:
        log(f'{task.name} {shots}-shot: no answers to score '
            f'({len(task.queries)} queries); see its server results file')
      else:
        scores.setdefault(task.name, {})[str(shots)] = score
        log(f'{task.name} {shots}-shot: {task.metric} {score:.2f} '
            f'({len(task.queries)} queries)')
        breakdown = task.score_by_answer_type(predictions)
        if breakdown:
          by_type.setdefault(task.name, {})[str(shots)] = breakdown
      if out_dir:
        _write_records(out_dir, task.name, shots, records)
        if task.kind == 'vqa' and (score is None or settings.vqa_results):
          server_files.setdefault(task.name, {})[str(shots)] = (
              write_vqa_results(out_dir, task, shots, records))
  reference = dict(eval_config.get('reference') or {})
  overall = overall_scores(scores, reference)
  overall_shots = str(eval_config.get('overall_shots', 4))
  results = dict(
      scores=scores,
      overall=overall,
      overall_score=overall.get(overall_shots),
      answer_types=by_type,
      vqa_results=server_files,
      metadata=dict(
          step=step, time=time.strftime('%Y-%m-%d %H:%M:%S'),
          seconds=round(time.time() - started, 1),
          shots=list(settings.shots),
          num_queries={t.name: len(t.queries) for t in loaded},
          metrics={t.name: t.metric for t in loaded},
          datasets={t.name: t.dataset for t in loaded},
          rices=settings.rices, ensemble=settings.ensemble,
          beam_size=settings.beam_size, seed=settings.seed,
          overall_shots=int(overall_shots),
          reference={t.name: reference.get(t.name) for t in loaded}))
  if out_dir:
    fs.makedirs(out_dir)
    with fs.open_file(fs.join(out_dir, 'results.json'), 'w') as f:
      json.dump(_jsonable(results), f, indent=2)
    # pylint: disable-next=g-import-not-at-top
    from flamingo_jax.evaluation import plots
    plots.plot_scores(results, fs.join(out_dir, 'scores.png'))
  return results


def write_vqa_results(out_dir: str, task: tasks_lib.Task, shots: int,
                      records: Sequence[Mapping[str, Any]]) -> str:
  """Writes a VQA task's predictions as the evaluation server reads them.

  `<out_dir>/vqa_results/<task>_<shots>shot.json`: [{"question_id": int,
  "answer": str}] (`vqa.vqa_results`); rename it for the server, e.g.
  vqa_test-dev2015_<method>_results.json for VQAv2 test-dev on EvalAI.
  A query without a question_id (a hand-made task) gets its index.

  Returns:
    The file's path relative to `out_dir`.
  """
  relative = fs.join('vqa_results', f'{task.name}_{shots}shot.json')
  question_ids = [r.get('question_id', r['query']) for r in records]
  results = metrics.vqa_results(question_ids,
                                [r['prediction'] for r in records])
  fs.makedirs(fs.join(out_dir, 'vqa_results'))
  with fs.open_file(fs.join(out_dir, relative), 'w') as f:
    json.dump(results, f)
  return relative


def _write_records(out_dir: str, task: str, shots: int,
                   records: Sequence[Mapping[str, Any]]) -> None:
  directory = fs.join(out_dir, 'predictions')
  fs.makedirs(directory)
  with fs.open_file(fs.join(directory, f'{task}_{shots}shot.jsonl'), 'w') as f:
    for record in records:
      f.write(json.dumps(_jsonable(record)) + '\n')


def _jsonable(value: Any) -> Any:
  if isinstance(value, Mapping):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if isinstance(value, (np.floating, np.integer)):
    return value.item()
  if isinstance(value, bytes):
    return value.decode('utf-8', 'replace')
  return value


def format_table(results: Mapping[str, Any]) -> str:
  """The scores as a text table: one row per task, one column per shots."""
  scores = results['scores']
  shots = sorted({int(s) for by in scores.values() for s in by})
  metric = results.get('metadata', {}).get('metrics', {})
  unscored = {t: files for t, files in
              (results.get('vqa_results') or {}).items() if t not in scores}
  width = max([len('overall')] + [len(t) for t in scores] +
              [len(t) for t in unscored]) + 2
  header = (f'{"task":<{width}}{"metric":<14}' +
            ''.join(f'{f"{s}-shot":>9}' for s in shots))
  lines = [header, '-' * len(header)]

  def cells(by_shots):
    return ''.join(f'{by_shots[str(s)]:>9.2f}' if str(s) in by_shots
                   else f'{"-":>9}' for s in shots)

  by_type = results.get('answer_types') or {}
  for task, by_shots in scores.items():
    lines.append(f'{task:<{width}}{metric.get(task, ""):<14}'
                 f'{cells(by_shots)}')
    types = sorted({t for by in by_type.get(task, {}).values() for t in by}
                   - {'overall'})
    for answer_type in types:
      lines.append(f'{"  " + answer_type:<{width}}{"answer type":<14}' +
                   cells({s: by[answer_type] for s, by in
                          by_type[task].items() if answer_type in by}))
  for task, files in unscored.items():
    lines.append(f'{task:<{width}}no answers: server results in '
                 f'{os.path.dirname(next(iter(files.values())))}/')
  overall = results.get('overall') or {}
  if overall:
    cells = ''.join(f'{100 * overall[str(s)]:>8.1f}%' if str(s) in overall
                    else f'{"-":>9}' for s in shots)
    lines.append(f'{"overall":<{width}}{"vs reference":<14}{cells}')
  return '\n'.join(lines)
