"""Few-shot evaluation metrics (paper §3, Tables 1-3): one import for all.

Metric               | Reproduces                              | Scale
---------------------|-----------------------------------------|--------------
`cider_d`            | pycocoevalcap CIDEr-D on PTB tokens     | raw; papers
`cider_d_scores`     |   (COCO, Flickr30k, VATEX captioning)   | show x 100
`vqa_accuracy`       | official VQAv2 accuracy (also OK-VQA,   | [0, 1]; papers
`mean_vqa_accuracy`  |   VizWiz, TextVQA, ...); eval_version   | show x 100
`accuracy_by_answer_type` | '2016', '2021', 'openflamingo';   | [0, 1]
                     |   stem=True: OK-VQA                     |
`exact_match`        | single-answer QA (MSRVTT-QA, MSVD-QA)   | bool
`mean_exact_match`   |   after the VQA answer normalisation    | [0, 1]
`top1_accuracy`      | classification, multiple choice (STAR)  | [0, 1]
`overall_score`      | Table 3: mean of score / reference      | 1 = reference

Helpers: `ptb_tokenize` (pycocoevalcap's PTBTokenizer without Java, see
`ptb.py`), `normalize_vqa_answer` (the official `processPunctuation` +
`processDigitArticle`, see `vqa.py`), `okvqa_stem`, `vqa_results` (the VQA
evaluation server's results file). CIDEr-D is in `cider.py`.
"""

from collections.abc import Hashable, Mapping, Sequence

import numpy as np

from flamingo_jax.evaluation import cider
from flamingo_jax.evaluation import ptb
from flamingo_jax.evaluation import vqa

ptb_tokenize = ptb.ptb_tokenize
cider_d = cider.cider_d
cider_d_scores = cider.cider_d_scores
normalize_vqa_answer = vqa.normalize_vqa_answer
vqa_accuracy = vqa.vqa_accuracy
mean_vqa_accuracy = vqa.mean_vqa_accuracy
accuracy_by_answer_type = vqa.accuracy_by_answer_type
okvqa_stem = vqa.okvqa_stem
vqa_results = vqa.vqa_results


def exact_match(prediction: str, answer: str) -> bool:
  """Whether `prediction` equals `answer` once both are normalised.

  Both go through `normalize_vqa_answer`: 'Two dogs!' matches '2 dogs'.
  """
  for name, value in (('prediction', prediction), ('answer', answer)):
    if not isinstance(value, str):
      raise ValueError(f'{name} must be a str; got {value!r}.')
  return normalize_vqa_answer(prediction) == normalize_vqa_answer(answer)


def mean_exact_match(predictions: Sequence[str],
                     answers: Sequence[str]) -> float:
  """The fraction of `exact_match`es, in [0, 1] (the MSRVTT-QA accuracy)."""
  _check_pairs(predictions, answers, 'answers')
  return float(np.mean([exact_match(prediction, answer)
                        for prediction, answer in zip(predictions, answers)]))


def top1_accuracy(predicted_labels: Sequence[Hashable],
                  labels: Sequence[Hashable]) -> float:
  """The fraction of predicted labels equal to the true ones, in [0, 1]."""
  _check_pairs(predicted_labels, labels, 'labels')
  return float(np.mean([predicted == label for predicted, label
                        in zip(predicted_labels, labels)]))


def overall_score(scores: Mapping[str, float],
                  reference: Mapping[str, float]) -> float:
  """The paper's Table 3 overall score: the mean over tasks of score / ref.

  Args:
    scores: task name -> score, e.g. {'coco': 86.5, 'vqav2': 51.2}.
    reference: task name -> the score to divide by, on the same scale (the
      paper uses the state of the art of Table 1); tasks not in `scores` are
      ignored.

  Returns:
    The mean ratio; the paper shows it x 100 (%).

  Raises:
    ValueError: no scores, a task without a reference, or a reference of 0.
  """
  if not scores:
    raise ValueError('overall_score needs at least one task score.')
  missing = sorted(set(scores) - set(reference))
  if missing:
    raise ValueError(f'No reference score for tasks {missing}; the reference '
                     f'has {sorted(reference)}.')
  zero = sorted(task for task in scores if reference[task] == 0)
  if zero:
    raise ValueError(f'Reference scores of 0 for tasks {zero}.')
  return float(np.mean([scores[task] / reference[task] for task in scores]))


def _check_pairs(predictions: Sequence[Hashable], targets: Sequence[Hashable],
                 name: str) -> None:
  if isinstance(predictions, str) or isinstance(targets, str):
    raise ValueError(f'predictions and {name} must be sequences, not a '
                     'single string.')
  if len(predictions) != len(targets):
    raise ValueError(f'Got {len(predictions)} predictions but '
                     f'{len(targets)} {name}.')
  if len(predictions) == 0:
    raise ValueError(f'Got 0 predictions and 0 {name}: nothing to score.')
