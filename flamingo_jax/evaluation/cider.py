"""CIDEr-D, computed as pycocoevalcap's `cider/cider_scorer.py` does.

CIDEr-D (Vedantam et al., 2015) over a corpus of I images, image i with
candidate c_i and references S_i, all PTB-tokenised (see `ptb.py`):

  g_n(s)[w] = tf(w, s) * (log I - log max(1, df(w)))   for each n-gram w,
              n = 1..4; df(w) = #images whose references contain w
  sim_n(c, s) = sum_w min(g_n(c)[w], g_n(s)[w]) * g_n(s)[w]
                / (|g_n(c)| |g_n(s)|)                 (no division by 0)
                * exp(-(len(c) - len(s))^2 / (2 * 6.0^2))
  CIDEr-D_i = 10 * mean_n [ sum_{s in S_i} sim_n(c_i, s) / |S_i| ]
  CIDEr-D = mean_i CIDEr-D_i

The min() clips the candidate's weights to the reference's (the '-D'), the
gaussian penalises length differences. Kept from the original: `len` counts
bigrams (its length counter sits under `n == 1`, the 0-based index of
2-grams), i.e. words - 1 for a non-empty sentence; document frequencies come
from the references of the evaluated corpus only, so scores depend on the
whole corpus, and a corpus of one image scores 0 (log I = 0).

Scale: the raw value, as pycocoevalcap returns it. Papers report COCO CIDEr
x 100 (a reported CIDEr of 113.8 is 1.138 here).
"""

import collections
from collections.abc import Sequence
import math

import numpy as np

from flamingo_jax.evaluation import ptb

MAX_N = 4  # n-grams of 1..4 words.
SIGMA = 6.0  # Of the gaussian length penalty.

Counts = collections.Counter  # n-gram (tuple of words) -> count.
Vector = tuple[list[dict[tuple[str, ...], float]], list[float], int]


def cider_d_scores(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    *,
    tokenize: bool = True,
) -> np.ndarray:
  """Per-image CIDEr-D of a corpus (see the module docstring).

  Args:
    predictions: one candidate caption per image.
    references: per image, its reference captions (at least one).
    tokenize: run `ptb.ptb_tokenize` on every caption first, as the COCO
      evaluation does; if False, captions are split on whitespace as given.

  Returns:
    float64 [I], CIDEr-D of each image (raw, not x 100).

  Raises:
    ValueError: no images, a length mismatch, or an empty or malformed
      reference list.
  """
  _check(predictions, references)
  split = _tokens if tokenize else str.split
  candidates = [_ngrams(split(caption)) for caption in predictions]
  refs = [[_ngrams(split(caption)) for caption in image_refs]
          for image_refs in references]
  doc_freq = collections.Counter()
  for image_refs in refs:
    doc_freq.update(set().union(*image_refs))
  log_images = float(np.log(float(len(refs))))
  scores = []
  for candidate, image_refs in zip(candidates, refs):
    cand_vec = _tfidf(candidate, doc_freq, log_images)
    total = np.zeros([MAX_N])  # [MAX_N]: sum over references of sim_n.
    for ref in image_refs:
      total += _similarity(cand_vec, _tfidf(ref, doc_freq, log_images))
    scores.append(float(np.mean(total)) / len(image_refs) * 10.0)
  return np.array(scores, np.float64)


def cider_d(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    *,
    tokenize: bool = True,
) -> float:
  """Corpus CIDEr-D: the mean of `cider_d_scores` (raw, not x 100)."""
  return float(np.mean(cider_d_scores(predictions, references,
                                      tokenize=tokenize)))


def _check(predictions: Sequence[str],
           references: Sequence[Sequence[str]]) -> None:
  if isinstance(predictions, str) or isinstance(references, str):
    raise ValueError('predictions and references must be sequences, not a '
                     'single string.')
  if len(predictions) == 0:
    raise ValueError('CIDEr-D needs at least one image; got 0 predictions.')
  if len(predictions) != len(references):
    raise ValueError(f'Got {len(predictions)} predictions but '
                     f'{len(references)} reference lists.')
  for i, (prediction, refs) in enumerate(zip(predictions, references)):
    if not isinstance(prediction, str):
      raise ValueError(f'predictions[{i}] must be a str; got {prediction!r}.')
    if isinstance(refs, str) or not all(isinstance(r, str) for r in refs):
      raise ValueError(f'references[{i}] must be a list of str; got {refs!r}.')
    if len(refs) == 0:
      raise ValueError(f'references[{i}] is empty: every image needs at '
                       'least one reference.')


def _tokens(caption: str) -> list[str]:
  # Joined and re-split as pycocoevalcap does: '1\u00a01/2' -> '1', '1/2'.
  return ' '.join(ptb.ptb_tokenize(caption)).split()


def _ngrams(words: Sequence[str]) -> Counts:
  counts = collections.Counter()
  for n in range(1, MAX_N + 1):
    for start in range(len(words) - n + 1):
      counts[tuple(words[start:start + n])] += 1
  return counts


def _tfidf(counts: Counts, doc_freq: Counts, log_images: float) -> Vector:
  """Per n: the tf-idf weights, their norm; and the length (bigrams)."""
  weights = [{} for _ in range(MAX_N)]
  norms = [0.0] * MAX_N
  length = 0
  for ngram, count in counts.items():
    n = len(ngram) - 1
    idf = log_images - float(np.log(max(1.0, float(doc_freq[ngram]))))
    weights[n][ngram] = float(count) * idf
    norms[n] += weights[n][ngram] ** 2
    if n == 1:  # Sic: counts bigrams (see the module docstring).
      length += count
  return weights, [math.sqrt(norm) for norm in norms], length


def _similarity(candidate: Vector, reference: Vector) -> np.ndarray:
  """[MAX_N] clipped cosine similarities times the length penalty."""
  cand_weights, cand_norms, cand_len = candidate
  ref_weights, ref_norms, ref_len = reference
  penalty = math.exp(-float(cand_len - ref_len) ** 2 / (2 * SIGMA ** 2))
  sims = np.zeros([MAX_N])  # [MAX_N]
  for n in range(MAX_N):
    for ngram, weight in cand_weights[n].items():
      ref_weight = ref_weights[n].get(ngram, 0.0)
      sims[n] += min(weight, ref_weight) * ref_weight
    if cand_norms[n] != 0 and ref_norms[n] != 0:
      sims[n] /= cand_norms[n] * ref_norms[n]
    sims[n] *= penalty
  return sims
