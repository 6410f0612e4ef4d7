"""The few-shot protocol (paper §3, App. B.1.4-B.1.5): tasks x shots -> scores.

For every query of a task and every number of shots k, the prompt shows k
support examples as shots (at random, or by RICES) or, at k = 0, two
text-only examples: `shots.py` says how they are chosen.

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

Outputs (`evaluate`, written by `results.Collector`): `<out>/results.json`
(scores, overall scores, VQAv2's per-answer-type breakdown, metadata),
`<out>/scores.png`, `<out>/predictions/` and, for VQA tasks without answers
(VQAv2 test-dev), the evaluation server's `<out>/vqa_results/` files:
`results.py` describes them. This module re-exports the public names of
`shots` and `results` that it was once home to.
"""

from collections.abc import Callable, Mapping, Sequence
import dataclasses
import functools
import json
import time
from typing import Any

from absl import logging
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from flamingo_jax import cli
from flamingo_jax import fs
from flamingo_jax.data import pipeline
from flamingo_jax.data import tokenizer as tokenizer_lib
from flamingo_jax.evaluation import results as results_lib
from flamingo_jax.evaluation import shots as shots_lib
from flamingo_jax.evaluation import tasks as tasks_lib
from flamingo_jax.inference import generate
from flamingo_jax.inference import prompts

Log = Callable[[str], None]

# Public names of the modules split from this one, importable from here.
Prompt = shots_lib.Prompt
Retriever = shots_lib.Retriever
build_prompt = shots_lib.build_prompt
check_shots = shots_lib.check_shots
choose_shots = shots_lib.choose_shots
query_rng = shots_lib.query_rng
sample_support = shots_lib.sample_support
format_table = results_lib.format_table
overall_scores = results_lib.overall_scores
write_vqa_results = results_lib.write_vqa_results


# One decoder per model config in a process, so that evaluating several
# checkpoints (or re-running) reuses its compilations.
@functools.lru_cache(maxsize=8)
def _decoder(config_key: str, compute_dtype: Any) -> generate.Decoder:
  return generate.Decoder(json.loads(config_key), compute_dtype=compute_dtype)


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


# ------------------------------------------------------------- batches --


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
  return cli.format_duration(seconds) if np.isfinite(seconds) else '?'


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
    self.decoder = _decoder(shots_lib.config_key(model_config),
                            compute_dtype)
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
        orders = shots_lib.shot_orders(
            len(chosen), settings.ensemble, np.random.default_rng(
                [settings.seed, shots_lib.stable_hash(task.name), q, shots,
                 1]))
      out.append([build_prompt(query, [chosen[i] for i in order],
                               zero_shot=zero) for order in orders])
    return out

  def _encode(self, task: tasks_lib.Task, prompt: Prompt
              ) -> prompts.EncodedPrompt:
    media = [pipeline.media_array(m, task.frames, self.image_size)
             for m in prompt.media]
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


def evaluate(eval_config: Mapping[str, Any], params: hk.Params,
             model_config: Mapping[str, Any],
             tokenizer: tokenizer_lib.Tokenizer, *,
             out_dir: str | None = None,
             task_names: Sequence[str] | None = None,
             step: int | None = None, compute_dtype: Any = jnp.float32,
             log: Log = logging.info, **overrides: Any) -> dict[str, Any]:
  """Runs every task x shots of `eval_config` (config.eval).

  Args:
    eval_config: config.eval (`configs.default_eval_config`).
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
  if hasattr(eval_config, 'to_dict'):  # A ConfigDict: plain dicts below.
    eval_config = eval_config.to_dict()
  settings = Settings.from_config(eval_config, **overrides)
  collector = results_lib.Collector(out_dir, vqa_results=settings.vqa_results,
                                    log=log)
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
  max_shots = max(settings.shots)
  for task in loaded:
    for shots in settings.shots:
      score, records = evaluator.run_task(
          task, shots, per_query=all_prompts[task.name, shots],
          width=widths[task.frames, task.scored, task.max_new_tokens],
          num_media=(max_shots if settings.pad_media else shots) + 1)
      collector.add(task, shots, score, records)
  return collector.results(loaded, eval_config, settings, step)
