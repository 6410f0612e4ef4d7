"""Which support examples a query's prompt shows, and the prompt itself.

The few-shot protocol's shots (paper §3, App. B.1.4-B.1.5; `runner` runs
the tasks):

- k > 0: k support examples are its shots, drawn at random per query from
  a generator seeded by (seed, task, query, k) -- reproducible, and
  independent of the other queries and of the batch size -- or, with RICES
  (`Retriever`, `rices.py`), the k whose vision features are most similar
  to the query's, the most similar placed last. The prompt is the shots'
  prompts ('<image>Output: {caption}<EOC>', `tasks.py`) followed by the
  query's open prompt ('<image>Output:').
- k = 0: the paper's zero-shot prompt (App. B.1.5): "we build the prompts
  using two examples from the downstream tasks where we remove their
  corresponding images or videos" -- `zero_shot_examples` (2) random support
  examples, text only ('Output: {caption}<EOC>'), then the query with its
  image.
- The nonce tasks draw their shots from the query's own episode support (6
  examples); beyond that many shots, the support repeats, in a new random
  order each pass (an episode has no more). Elsewhere, asking for more
  shots than there are support examples is an error.
- Prompt ensembling (close-ended tasks): `shot_orders` gives the orders of
  the shots whose log-likelihoods are averaged.

Glossary of shapes:
  Q: queries; N: support examples; K: shots.
"""

from collections.abc import Mapping, Sequence
import dataclasses
import functools
import hashlib
import itertools
import json
from typing import Any, TYPE_CHECKING

import haiku as hk
import numpy as np

from flamingo_jax import fs
from flamingo_jax.data import pipeline
from flamingo_jax.evaluation import rices
from flamingo_jax.evaluation import tasks as tasks_lib

if TYPE_CHECKING:
  from flamingo_jax.evaluation import runner


def stable_hash(text: str) -> int:
  """A 32-bit hash of `text`, the same in every process (unlike hash())."""
  return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], 'little')


def query_rng(seed: int, task: str, query: int, shots: int
              ) -> np.random.Generator:
  """The generator of one query's shots: a pure function of its arguments."""
  return np.random.default_rng([seed, stable_hash(task), query, shots])


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
                 settings: 'runner.Settings',
                 retrieved: np.ndarray | None = None
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


def shot_orders(count: int, num: int, rng: np.random.Generator
                  ) -> list[list[int]]:
  """`num` distinct orders of `count` shots, the identity first (all of
  them when there are no more than `num`): prompt ensembling."""
  identity = list(range(count))
  if np.prod(range(1, count + 1)) <= num:
    return [list(p) for p in itertools.permutations(identity)]
  orders = [identity]
  while len(orders) < num:
    order = [int(i) for i in rng.permutation(count)]
    if order not in orders:
      orders.append(order)
  return orders


# -------------------------------------------------------------- RICES --


def _frames(medium: Any, frames: int, image_size: int) -> np.ndarray:
  """A dataset medium -> uint8 [frames, image_size, image_size, 3]."""
  return pipeline.media_array(medium, frames, image_size)


def config_key(model_config: Mapping[str, Any]) -> str:
  """A model config as a hashable JSON string (the compilation caches' key)."""
  as_dict = (model_config.to_dict() if hasattr(model_config, 'to_dict')
             else dict(model_config))
  return json.dumps(as_dict, sort_keys=True, default=str)


# One feature function per model config in a process (as the runner's
# decoders), so that evaluating several checkpoints reuses its compilation.
@functools.lru_cache(maxsize=8)
def _feature_fn(key: str, compute_dtype: Any):
  return rices.feature_fn(json.loads(key), compute_dtype=compute_dtype)


class Retriever:
  """RICES shots of a task's queries, features cached on disk."""

  def __init__(self, params: hk.Params, model_config: Mapping[str, Any], *,
               image_size: int, compute_dtype: Any, cache_dir: str | None,
               step: int | None, batch_size: int = 32):
    self._params, self._image_size = params, image_size
    self._fn = _feature_fn(config_key(model_config), compute_dtype)
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
