"""VQA accuracy against a restatement of each official evaluation code.

REFERENCE (below, `_reference_*`): a restatement, written for this test and
independent of evaluation/vqa.py's code, of the per-question accuracy of
- '2016': GT-Vision-Lab/VQA PythonEvaluationTools/vqaEvaluation/vqaEval.py
  at 458a8b2 (2016, "fixed the apostrophe symbol issue"),
  https://github.com/GT-Vision-Lab/VQA/blob/458a8b2/PythonEvaluationTools/vqaEvaluation/vqaEval.py
- '2021': the same file at a013f00 (2021-03-11, "Fixed processing answers
  bug"; the repository's head),
  https://github.com/GT-Vision-Lab/VQA/blob/a013f00/PythonEvaluationTools/vqaEvaluation/vqaEval.py
- 'openflamingo': mlfoundations/open_flamingo open_flamingo/eval/vqa_metric.py
  at 655f693 (its head; unchanged in this respect since 60a5fd6, "always
  postproccess gt answers", 2023-05-24),
  https://github.com/mlfoundations/open_flamingo/blob/655f693/open_flamingo/eval/vqa_metric.py
Each is `VQAEval.evaluate`'s loop body for one question, with its
`processPunctuation` and `processDigitArticle`, answers as the annotation
file's dicts (leave-one-out by dict inequality: `answer_id` differs). The
official files are Python 2 (byte strings); the cases here are ASCII, where
Python 2 and 3 agree.

The contraction table (120 entries, the same in all three files) is not
restated: its SHA-256 as read from those files is pinned instead.
"""

import hashlib
import json
import re

import numpy as np
import pytest

from flamingo_jax.evaluation import vqa

# sha256(json.dumps(sorted(table.items()))) of `self.contractions`, read
# from each of the three files above (identical in all three).
OFFICIAL_CONTRACTIONS_SHA256 = (
    '3e5960526f62912d3b70896069c43c13d7c21be38d50ca28efbb9095b499454f')

# ---------------------------------------------------------------- REFERENCE
_REF_PUNCT = [';', '/', '[', ']', '"', '{', '}', '(', ')', '=', '+', '\\',
              '_', '-', '>', '<', '@', '`', ',', '?', '!']
_REF_NUMBERS = dict(zip(
    'none zero one two three four five six seven eight nine ten'.split(),
    '0 0 1 2 3 4 5 6 7 8 9 10'.split()))
_REF_ARTICLES = ('a', 'an', 'the')
# The official pattern, its '(?!<=' typo included; its sub() passes
# re.UNICODE (= 32) positionally, i.e. as the count.
_REF_PERIOD = re.compile(r'(?!<=\d)(\.)(?!\d)')
_REF_DIGIT_COMMA = re.compile(r'(\d)(\,)(\d)')


def _reference_punctuation(text):
  out = text
  for p in _REF_PUNCT:
    touches = (p + ' ') in text or (' ' + p) in text
    if touches or _REF_DIGIT_COMMA.search(text) is not None:
      out = out.replace(p, '')
    else:
      out = out.replace(p, ' ')
  return _REF_PERIOD.sub('', out, 32)


def _reference_digit_article(text):
  kept = []
  for word in text.lower().split():
    word = _REF_NUMBERS.get(word, word)
    if word not in _REF_ARTICLES:
      kept.append(word)
  return ' '.join(vqa.CONTRACTIONS.get(w, w) for w in kept)


def _reference_clean(text):
  return text.replace('\n', ' ').replace('\t', ' ').strip()


def _reference_accuracy(version, prediction, answers):
  gts = [{'answer': a, 'answer_id': i + 1} for i, a in enumerate(answers)]
  res = _reference_clean(prediction)
  if version == '2016':
    res = _reference_digit_article(_reference_punctuation(res))
    if len({d['answer'] for d in gts}) > 1:  # Unstripped answers.
      for d in gts:
        d['answer'] = _reference_punctuation(d['answer'])
  else:
    for d in gts:
      d['answer'] = _reference_clean(d['answer'])
    full = (version == 'openflamingo'
            or len({d['answer'] for d in gts}) > 1)  # Stripped answers.
    if full:
      for d in gts:
        d['answer'] = _reference_digit_article(
            _reference_punctuation(d['answer']))
      res = _reference_digit_article(_reference_punctuation(res))
  accs = []
  for held in gts:
    others = [d for d in gts if d != held]
    accs.append(min(1, float(sum(d['answer'] == res for d in others)) / 3))
  return float(sum(accs)) / len(accs)
# ------------------------------------------------------------ END REFERENCE

VERSIONS = ('2016', '2021', 'openflamingo')
_WORDS = ['yes', 'Yes', 'YES', 'no', 'two', 'Two', '2', 'ten', '10', 'none',
          '0', 'a', 'an', 'The', 'the', 'dog', 'dogs', 'Dog.', 'dont', 'isnt',
          'Im', "don't", 'oclock', '3.5', '1,000', '2,5', 'x-ray', 'red,',
          'e.g.', 'U.S.', 'left/right', '@home', '(maybe)', '"hi"', "it's",
          'wait:', 'ok!', 'why?', '5.', '.5', 'tv', 'TV', 'a-b', '{x}', '=',
          '+1', 'back\\slash', 'snake_case', '<3', '`q`', 'semi;colon']
_SEPARATORS = [' ', ' ', ' ', '', '  ', ' , ', ' - ', '\t', '\n']


def _phrase(rng):
  words = rng.choice(_WORDS, size=rng.integers(1, 4))
  text = words[0]
  for word in words[1:]:
    text += rng.choice(_SEPARATORS) + word
  return rng.choice(['', ' ', '\n', '\t']) + text + rng.choice(
      ['', ' ', '.', '!', '?', ' \n'])


def _variant(rng, text):
  """`text` as another annotator or a model might write it."""
  choice = rng.integers(6)
  if choice == 0:
    return text.upper()
  if choice == 1:
    return text.strip()
  if choice == 2:
    return 'the ' + text
  if choice == 3:
    return text + rng.choice(['.', '!', ' ', ','])
  return text


def _cases(seed, count):
  rng = np.random.default_rng(seed)
  cases = []
  for _ in range(count):
    base = _phrase(rng)
    agree = int(rng.integers(0, 11))  # How many annotators give `base`.
    if rng.random() < 0.3:  # All the same (up to a variant): agreement.
      answers = [base] * 10
      if rng.random() < 0.5:
        answers[int(rng.integers(10))] = _variant(rng, base)
    else:
      answers = [base if i < agree else _phrase(rng) for i in range(10)]
      answers = [_variant(rng, a) if rng.random() < 0.3 else a
                 for a in answers]
      rng.shuffle(answers)
    prediction = _variant(rng, base) if rng.random() < 0.8 else _phrase(rng)
    cases.append((prediction, [str(a) for a in answers]))
  return cases


# Hand-picked: each side of every branch of the three codes.
ADVERSARIAL = [
    ('Yes', ['yes'] * 10), ('yes.', ['yes'] * 10), ('Two', ['2'] * 10),
    (' yes\n', ['yes'] * 10), ('yes', ['yes '] * 9 + ['yes']),
    ('Yes', ['yes '] * 9 + ['yes']), ('dog', ['dog.'] * 10),
    ('dog', ['The Dog'] * 3 + ['cat'] * 7), ('dog', ['dog.'] * 3 + ['cat'] * 7),
    ('Two dogs', ['2 dogs'] * 4 + ['dogs'] * 6), ('1,000', ['1000'] * 10),
    ('1,000', ['1000'] * 5 + ['1,000'] * 5), ('3.5', ['3.5'] * 4 + ['3'] * 6),
    ('x-ray', ['x ray'] * 3 + ['xray'] * 7), ('x - ray', ['x-ray'] * 9 + ['?']),
    ("don't", ['dont'] * 4 + ['no'] * 6), ('Im', ['im'] * 2 + ['Im'] * 8),
    ('none', ['0'] * 3 + ['none'] * 7), ('an apple', ['apple'] * 10),
    ('an apple', ['apple'] * 9 + ['apple.']), ('red, white', ['red white'] * 6
                                               + ['red'] * 4),
    ('left/right', ['left right'] * 5 + ['leftright'] * 5),
    ('', ['yes'] * 5 + [''] * 5), ('e.g.', ['eg'] * 4 + ['e.g.'] * 6),
    ('a.b.c.d.e.f.g.h.i.j.k.l.m.n.o.p.q.r.s.t.u.v.w.x.y.z.a.b.c.d.e.f.g.h.',
     ['abcdefghijklmnopqrstuvwxyzabcdefgh'] * 5 + ['no'] * 5),
] + [('yes', ['yes'] * m + ['no'] * (10 - m)) for m in range(11)]


def test_contraction_table_is_the_official_one():
  table = json.dumps(sorted(vqa.CONTRACTIONS.items())).encode()
  assert hashlib.sha256(table).hexdigest() == OFFICIAL_CONTRACTIONS_SHA256
  assert list(vqa.PUNCTUATION) == _REF_PUNCT


@pytest.mark.parametrize('version', VERSIONS)
def test_vqa_accuracy_equals_the_official_code(version):
  cases = ADVERSARIAL + _cases(seed=15, count=400)
  differing = [
      (prediction, answers, ours, ref)
      for prediction, answers in cases
      if (ours := vqa.vqa_accuracy(prediction, answers, eval_version=version))
      != (ref := _reference_accuracy(version, prediction, answers))]
  assert not differing, differing[:5]
  # The cases tell the versions apart and cover every accuracy level.
  others = [v for v in VERSIONS if v != version]
  for other in others:
    apart = sum(_reference_accuracy(version, p, a)
                != _reference_accuracy(other, p, a) for p, a in cases)
    assert apart >= 10, (version, other, apart)
  levels = {round(_reference_accuracy(version, p, a), 6) for p, a in cases}
  assert {0.0, 0.3, 0.6, 0.9, 1.0} <= levels
