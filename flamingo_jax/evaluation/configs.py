"""`config.eval`: the default evaluation tasks, shots, decoding and reference.

Configs as data: `default_eval_config` is what a recipe puts in
`config.eval` and what `python -m flamingo_jax.evaluate` gives a run saved
without one; the task kinds, metrics and prompts are in `tasks.py`.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections


def default_tasks(frames: int = 4) -> dict[str, dict[str, Any]]:
  """One task per embedded-world evaluation dataset (as Table 1's kinds).

  A task may also set `metric`, `max_new_tokens` (a different value costs a
  compilation of its own), `support_size`, `data_dir`, `class_names`,
  `query_split` (default 'query') and `vqa_eval_version` ('2016', the
  default, '2021' or 'openflamingo': see evaluation/vqa.py; an OK-VQA task
  sets metric='okvqa_accuracy').
  """
  return dict(
      captions=dict(dataset='world_captions', kind='captioning'),
      vqa=dict(dataset='world_vqa', kind='vqa'),
      video_qa=dict(dataset='world_video_qa', kind='video_qa', frames=frames),
      video_captions=dict(dataset='world_video_captions',
                          kind='video_captioning', frames=frames),
      classification=dict(dataset='world_classification',
                          kind='classification'),
      nonce=dict(dataset='world_nonce', kind='nonce'),
      nonce_choice=dict(dataset='world_nonce', kind='nonce_choice'),
  )


def default_eval_config(
    data_dir: str,
    *,
    sizes: str = 'default',
    image_size: int = 64,
    frames: int = 4,
    shots: Sequence[int] = (0, 4, 8),
    num_queries: int = 32,
    support_size: int = 512,
    batch_size: int = 16,
    min_prompt_len: int = 0,
    reference: Mapping[str, Any] | None = None,
    tasks: Mapping[str, Mapping[str, Any]] | None = None,
) -> ml_collections.ConfigDict:
  """`config.eval`: the tasks, shots, decoding and reference scores.

  Args:
    data_dir: where the evaluation datasets are (built there if they are
      the world's and missing).
    sizes: the world's split table, 'default' or 'tiny'.
    image_size: image side the model reads.
    frames: frames per video.
    shots: the few-shot settings to run.
    num_queries: queries per task (the first ones of the query split).
    support_size: support examples per task to draw shots from (the first
      ones); 0: the whole split.
    batch_size: prompts per generation / scoring call.
    min_prompt_len: prompts are padded to at least this many tokens (the
      runner already pads every task with the same media and decoding to
      their longest prompt, so that they share one compiled decoder).
    reference: task -> reference score (or {shots: score}) for the overall
      score; see the returned config's `reference` field.
    tasks: overrides `default_tasks(frames)`.

  Returns:
    A ConfigDict whose fields are documented inline.
  """
  config = ml_collections.ConfigDict()
  config.data_dir = data_dir
  config.sizes = sizes  # The world's split table: 'default' | 'tiny'.
  config.image_size = image_size
  config.tasks = dict(tasks or default_tasks(frames))
  config.shots = list(shots)
  config.num_queries = num_queries  # Per task, the first of 'query'.
  config.support_size = support_size  # The first of 'support'; 0: all.
  config.batch_size = batch_size  # Prompts per call (the last batch padded).
  config.seed = 0  # Which support examples make the shots of each query.
  config.zero_shot_examples = 2  # Text-only examples of 0-shot (App. B.1.5).
  config.rices = False  # Retrieve shots by vision features (else random).
  config.ensemble = 1  # Close-ended: permutations of the shots averaged.
  # VQA tasks: also write the evaluation server's results file when the
  # queries have answers (a split without answers, test-dev, always does).
  config.vqa_results = False
  config.decoding = dict(
      max_new_tokens=20,  # Tasks may set their own (short answers).
      beam_size=3,  # The paper's; 1 = greedy.
      length_penalty=0.0,  # GNMT alpha; 0: plain log-probability.
      min_new_tokens=1)  # An empty answer is never right: <EOC> waits.
  # Prompts are padded to a multiple of this many tokens, and to at least
  # min_prompt_len, so that few shapes (hence compilations) are needed.
  config.pad_multiple = 64
  config.min_prompt_len = min_prompt_len
  # Media slots padded to the most shots of the run + 1 (one shape for all
  # shots; the empty slots are encoded but never attended to).
  config.pad_media = True
  config.log_every_secs = 5.0  # Progress lines.
  # The overall score (Table 3) is the mean over tasks of score / reference
  # at `overall_shots`. A reference is a number or {'<shots>': number}; None or
  # missing tasks are left out of the mean. The paper divides by its
  # Flamingo-3B scores; for tiny runs, use the tiny default recipe's own
  # scores, so that an ablation's overall score is its ratio to the recipe.
  config.overall_shots = 4
  config.reference = dict(reference or {})
  return config
