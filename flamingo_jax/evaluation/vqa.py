"""VQA accuracy and answer normalisation, as the official VQA evaluation.

Reproduces `PythonEvaluationTools/vqaEvaluation/vqaEval.py` of
github.com/GT-Vision-Lab/VQA in either of its two versions, or OpenFlamingo's
copy, chosen by `eval_version` (the score of the same predictions differs
between them, so say which one a number used; tests/evaluation/
test_vqa_reference.py compares each with a restatement of its code):

  '2016' (the default; the code from the 2016 apostrophe fix 458a8b2 to
  2021, and the EvalAI server's copy, Cloud-CV/VQA-Evaluation):
  - The prediction is always normalised: newlines and tabs become spaces,
    the ends are stripped, then `process_punctuation` and
    `process_digit_article`.
  - The annotators' answers are taken as the dataset gives them and go
    through `process_punctuation` only, and only when they are not all the
    same (so raw references, e.g. 'Two', should be normalised first).

  '2021' (commit a013f00 of 2021-03-11, the current official code): the
  ends of the prediction and of the answers are stripped; then, only when
  the (stripped) answers disagree, both go through `process_punctuation`
  and `process_digit_article`. When all agree nothing else is done, so 'Yes'
  scores 0 against ten 'yes'.

  'openflamingo' (mlfoundations/open_flamingo `open_flamingo/eval/
  vqa_metric.py` since its commit 60a5fd6 of 2023-05-24, "always postprocess
  gt answers", in its 2.0.0 and 2.0.1 releases): as '2021', but the
  prediction and the answers are always normalised, agreeing or not, so
  'Yes' scores 1 against ten 'yes'. (Its earlier copies were neither.)

In all three, accuracy = mean over the n annotators i of
min(1, #{j != i : answer_j == prediction} / 3), n = 10 in VQAv2.

OK-VQA (`stem=True`): its annotations' `answer`s are stemmed ('racing' ->
'race'; the raw one is `raw_answer`), so the prediction is stemmed too
before it is compared, as the OK-VQA v1.1 evaluation does (OpenFlamingo's
ok_vqa_utils: WordNet verb lemmas of -ing words, singular of plural nouns,
with a list of exceptions taken from the data). Here, without NLTK data:
a prediction equal (normalised) to one of the question's `raw_answers` takes
that answer's stem, the dataset's own; otherwise `okvqa_stem` stems it by
rule. The server's answer types give `accuracy_by_answer_type`;
`vqa_results` writes the evaluation server's results file.
"""

from collections.abc import Sequence
import collections
import json
import os
import re
from typing import Any

import numpy as np

NUMBER_WORDS = {'none': '0', 'zero': '0', 'one': '1', 'two': '2',
                'three': '3', 'four': '4', 'five': '5', 'six': '6',
                'seven': '7', 'eight': '8', 'nine': '9', 'ten': '10'}
ARTICLES = frozenset(['a', 'an', 'the'])
PUNCTUATION = (';', '/', '[', ']', '"', '{', '}', '(', ')', '=', '+', '\\',
               '_', '-', '>', '<', '@', '`', ',', '?', '!')
CONTRACTIONS = {
    'aint': "ain't", 'arent': "aren't", 'cant': "can't", 'couldnt': "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    'couldve': "could've", 'didnt': "didn't", 'doesnt': "doesn't",
    'dont': "don't", 'hadnt': "hadn't", "hadnt've": "hadn't've",
    "hadn'tve": "hadn't've", 'hasnt': "hasn't", 'havent': "haven't",
    'hed': "he'd", "hed've": "he'd've", "he'dve": "he'd've", 'hes': "he's",
    'howd': "how'd", 'howll': "how'll", 'hows': "how's", "Id've": "I'd've",
    "I'dve": "I'd've", 'Im': "I'm", 'isnt': "isn't", 'itd': "it'd",
    "itd've": "it'd've", "it'dve": "it'd've", 'itll': "it'll", 'Ive': "I've",
    "let's": "let's", 'maam': "ma'am", 'mightnt': "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    'mightve': "might've", 'mustnt': "mustn't", 'mustve': "must've",
    'neednt': "needn't", 'notve': "not've", 'oclock': "o'clock",
    'oughtnt': "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", 'shant': "shan't", "shed've": "she'd've",
    "she'dve": "she'd've", "she's": "she's", 'shouldnt': "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    'shouldve': "should've", "somebody'd": 'somebodyd',
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    'somebodyll': "somebody'll", 'somebodys': "somebody's",
    'someoned': "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", 'someonell': "someone'll",
    'someones': "someone's", 'somethingd': "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've",
    'somethingll': "something'll", 'thats': "that's", 'thered': "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", 'therere': "there're",
    'theres': "there's", 'theyd': "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", 'theyll': "they'll", 'theyre': "they're",
    'theyve': "they've", 'twas': "'twas", 'wasnt': "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", 'werent': "weren't",
    'weve': "we've", 'whatll': "what'll", 'whatre': "what're",
    'whats': "what's", 'whatve': "what've", 'whens': "when's",
    'whered': "where'd", 'wheres': "where's", 'whereve': "where've",
    'whod': "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    'wholl': "who'll", 'whos': "who's", 'whove': "who've", 'whyll': "why'll",
    'whyre': "why're", 'whys': "why's", 'wont': "won't", 'wouldnt': "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've",
    'wouldve': "would've", 'yall': "y'all", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "yall'll": "y'all'll",
    "y'allll": "y'all'll", 'youd': "you'd", "youd've": "you'd've",
    "you'dve": "you'd've", 'youll': "you'll", 'youre': "you're",
    'youve': "you've"}
_PERIOD_STRIP = re.compile(r'(?!<=\d)(\.)(?!\d)')  # Sic: '(?!<=' not '(?<!'.
_COMMA_STRIP = re.compile(r'(\d)(,)(\d)')


def process_punctuation(text: str) -> str:
  """The official `processPunctuation`.

  Each mark of PUNCTUATION is deleted when it touches a space somewhere in
  the text, or the text has a digit,digit comma; otherwise it becomes a
  space. Then periods not followed by a digit are deleted (at most 32: the
  official code passes re.UNICODE as `count`).

  Args:
    text: an answer.

  Returns:
    The answer with its punctuation handled.
  """
  out = text
  has_number_comma = _COMMA_STRIP.search(text) is not None
  for mark in PUNCTUATION:
    if has_number_comma or mark + ' ' in text or ' ' + mark in text:
      out = out.replace(mark, '')
    else:
      out = out.replace(mark, ' ')
  return _PERIOD_STRIP.sub('', out, count=int(re.UNICODE))


def process_digit_article(text: str) -> str:
  """The official `processDigitArticle`.

  Lowercases, maps number words ('two' -> '2'), drops 'a', 'an' and 'the',
  restores contractions ('dont' -> "don't") and joins words by one space.

  Args:
    text: an answer.

  Returns:
    The normalised words.
  """
  words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
  words = [CONTRACTIONS.get(word, word) for word in words
           if word not in ARTICLES]
  return ' '.join(words)


def normalize_vqa_answer(answer: str) -> str:
  """A prediction as the official evaluation compares it ('Two!' -> '2')."""
  answer = answer.replace('\n', ' ').replace('\t', ' ').strip()
  return process_digit_article(process_punctuation(answer))


EVAL_VERSIONS = ('2016', '2021', 'openflamingo')


def vqa_accuracy(prediction: str, answers: Sequence[str], *,
                 eval_version: str = '2016', stem: bool = False,
                 raw_answers: Sequence[str] | None = None) -> float:
  """The official VQA accuracy of one prediction, in [0, 1].

  Args:
    prediction: the model's answer, raw (it is normalised here).
    answers: the annotators' answers (10 in VQAv2), as the dataset gives
      them. With m of n matching: m >= 4 gives 1, m = 3 gives 0.9
      (leaving out a match leaves 2/3), m = 2 gives 0.6, m = 1 gives 0.3.
    eval_version: '2016', '2021' or 'openflamingo' (the module docstring).
    stem: OK-VQA: stem the prediction (the answers are stemmed already).
    raw_answers: OK-VQA's unstemmed answers, in the order of `answers`: a
      prediction equal to one takes its stem from `answers`.

  Returns:
    The mean over annotators of min(1, matches among the others / 3).

  Raises:
    ValueError: `answers` is empty or not a list of strings, an unknown
      eval_version, or raw_answers not matching answers.
  """
  _check_answers(answers, 'answers')
  if eval_version not in EVAL_VERSIONS:
    raise ValueError(f'eval_version must be one of {EVAL_VERSIONS}; got '
                     f'{eval_version!r}.')
  if stem:
    prediction = stem_prediction(prediction, answers, raw_answers)
  prediction = prediction.replace('\n', ' ').replace('\t', ' ').strip()
  if eval_version == '2016':
    prediction = normalize_vqa_answer(prediction)
    if len(set(answers)) > 1:  # The answers as given, not stripped.
      answers = [process_punctuation(answer) for answer in answers]
  else:
    answers = [a.replace('\n', ' ').replace('\t', ' ').strip()
               for a in answers]
    if eval_version == 'openflamingo' or len(set(answers)) > 1:
      prediction = process_digit_article(process_punctuation(prediction))
      answers = [process_digit_article(process_punctuation(a))
                 for a in answers]
  matches = sum(answer == prediction for answer in answers)
  per_annotator = [min(1.0, (matches - (answer == prediction)) / 3.0)
                   for answer in answers]
  return float(sum(per_annotator)) / len(per_annotator)


def mean_vqa_accuracy(predictions: Sequence[str],
                      answers_lists: Sequence[Sequence[str]],
                      **options) -> float:
  """The mean `vqa_accuracy` over questions, in [0, 1] (papers: x 100).

  `options` are vqa_accuracy's (eval_version, stem); with stem, an option
  `raw_answers_lists` gives each question's raw_answers.
  """
  scores = _scores(predictions, answers_lists, **options)
  return float(np.mean(scores))


def accuracy_by_answer_type(predictions: Sequence[str],
                            answers_lists: Sequence[Sequence[str]],
                            answer_types: Sequence[str],
                            **options) -> dict[str, float]:
  """{'overall': mean, 'yes/no': mean, 'number': ..., 'other': ...}, [0, 1].

  As the official evaluation's perAnswerType (unrounded): the mean
  accuracy of the questions of each answer type they have.
  """
  if len(answer_types) != len(predictions):
    raise ValueError(f'Got {len(predictions)} predictions but '
                     f'{len(answer_types)} answer types.')
  scores = _scores(predictions, answers_lists, **options)
  by_type = collections.defaultdict(list)
  for answer_type, score in zip(answer_types, scores):
    by_type[str(answer_type)].append(score)
  return {'overall': float(np.mean(scores)),
          **{t: float(np.mean(v)) for t, v in sorted(by_type.items())}}


def _scores(predictions, answers_lists, *, raw_answers_lists=None,
            **options) -> list[float]:
  if isinstance(predictions, str) or len(predictions) == 0:
    raise ValueError('predictions must be a non-empty list of str; got '
                     f'{predictions!r}.')
  if len(predictions) != len(answers_lists):
    raise ValueError(f'Got {len(predictions)} predictions but '
                     f'{len(answers_lists)} answer lists.')
  for i, answers in enumerate(answers_lists):
    _check_answers(answers, f'answers_lists[{i}]')
  raw = raw_answers_lists or [None] * len(predictions)
  return [vqa_accuracy(p, a, raw_answers=r, **options)
          for p, a, r in zip(predictions, answers_lists, raw)]


def vqa_results(question_ids: Sequence[int], predictions: Sequence[str],
                path: str | os.PathLike | None = None
                ) -> list[dict[str, Any]]:
  """The evaluation server's results: [{"question_id": int, "answer": str}].

  The answers are the predictions as generated (newlines and tabs made
  spaces, ends stripped): the server normalises them itself. With `path`,
  also writes them there as JSON (e.g. vqa_test-dev2015_<method>_results.json
  for VQAv2 test-dev on EvalAI; the server wants every question of the
  split, so `question_ids` should be all of them).
  """
  if len(question_ids) != len(predictions):
    raise ValueError(f'Got {len(question_ids)} question ids but '
                     f'{len(predictions)} predictions.')
  if len(set(question_ids)) != len(question_ids):
    raise ValueError('question_ids has duplicates.')
  results = [{'question_id': int(q),
              'answer': p.replace('\n', ' ').replace('\t', ' ').strip()}
             for q, p in zip(question_ids, predictions)]
  if path is not None:
    with open(path, 'w', encoding='utf-8') as f:
      json.dump(results, f)
  return results


# ------------------------------------------------------------- OK-VQA --

# Words ending in -s that are not plurals (left as they are).
_NOT_PLURAL = frozenset([
    'this', 'does', 'hers', 'ours', 'yours', 'theirs', 'always', 'perhaps',
    'sometimes', 'whereas', 'thus', 'news', 'series', 'species', 'christmas',
    'texas', 'vegas', 'lens', 'physics', 'politics', 'mathematics',
    'athletics', 'gymnastics', 'aerobics', 'economics', 'paris', 'athens',
    'mars', 'atlas', 'canvas', 'chaos', 'alias', 'bias'])
_VOWELS = frozenset('aeiou')


def _consonant(word: str, i: int) -> bool:
  """Porter's consonant: not a vowel, and y only after a vowel."""
  if word[i] in _VOWELS:
    return False
  return word[i] != 'y' or i == 0 or not _consonant(word, i - 1)


def _measure(stem: str) -> int:
  """Porter's m: the number of vowel-consonant sequences."""
  kinds = ''.join('c' if _consonant(stem, i) else 'v'
                  for i in range(len(stem)))
  return len(re.findall(r'v+c+', kinds))


def _ends_cvc(stem: str) -> bool:
  return (len(stem) >= 3 and _consonant(stem, -3 % len(stem))
          and not _consonant(stem, len(stem) - 2)
          and _consonant(stem, len(stem) - 1) and stem[-1] not in 'wxy')


def _stem_word(word: str) -> str:
  """One lower-case word: -ing verbs to their base, plurals to singular."""
  if len(word) > 4 and word.endswith('ing'):
    stem = word[:-3]
    if not any(c in _VOWELS or c == 'y' for c in stem):
      return word  # 'king', 'string': not a verb form.
    if stem.endswith(('at', 'bl', 'iz')):
      return stem + 'e'  # 'creating' -> 'create'.
    if (len(stem) >= 2 and stem[-1] == stem[-2] and stem[-1] not in 'lsz'
        and _consonant(stem, len(stem) - 1)):
      return stem[:-1]  # 'swimming' -> 'swim'.
    if _measure(stem) == 1 and _ends_cvc(stem):
      return stem + 'e'  # 'racing' -> 'race', 'riding' -> 'ride'.
    return stem  # 'walking' -> 'walk', 'morning' -> 'morn'.
  if (len(word) > 3 and word.endswith('s') and word not in _NOT_PLURAL
      and not word.endswith(('ss', 'us', 'is', 'ous', "'s"))):
    if word.endswith('ies') and len(word) > 4:
      return word[:-3] + 'y'  # 'berries' -> 'berry'; 'ties' -> 'tie'.
    if word.endswith(('sses', 'ches', 'shes', 'xes', 'zes')):
      return word[:-2]  # 'glasses' -> 'glass', 'boxes' -> 'box'.
    return word[:-1]  # 'dogs' -> 'dog', 'waves' -> 'wave'.
  return word


def okvqa_stem(text: str) -> str:
  """OK-VQA's stemming of an answer, by rule ('racing' -> 'race').

  Lower-cases; each word's letters are stemmed, punctuation around them
  kept: -ing forms by Porter's step 1b (the -ing removed; a double
  consonant undone, or an e restored after a short consonant-vowel-
  consonant stem), plural nouns to singular (-ies -> -y, -sses/-ches/
  -shes/-xes/-zes lose -es, else -s; words like 'yes' and 'tennis' kept).
  An approximation of the OK-VQA v1.1 procedure, which needs NLTK's
  WordNet and part-of-speech data (see the module docstring).
  """
  words = []
  for word in text.lower().split():
    match = re.fullmatch(r"(\W*)([\w']+?)(\W*)", word)
    words.append(match.group(1) + _stem_word(match.group(2)) + match.group(3)
                 if match else word)
  return ' '.join(words)


def stem_prediction(prediction: str, answers: Sequence[str],
                    raw_answers: Sequence[str] | None = None) -> str:
  """An OK-VQA prediction as stemmed for scoring against `answers`.

  Equal (normalised) to one of `raw_answers`: the stem the dataset gave
  that answer (`answers[i]`); otherwise `okvqa_stem`.
  """
  if raw_answers is not None:
    if len(raw_answers) != len(answers):
      raise ValueError(f'raw_answers has {len(raw_answers)} answers, '
                       f'answers {len(answers)}.')
    normalised = normalize_vqa_answer(prediction)
    for raw, stemmed in zip(raw_answers, answers):
      if normalize_vqa_answer(raw) == normalised:
        return stemmed
  return okvqa_stem(prediction)


def _check_answers(answers: Sequence[str], name: str) -> None:
  if isinstance(answers, str) or not all(isinstance(a, str) for a in answers):
    raise ValueError(f'{name} must be a list of str; got {answers!r}.')
  if len(answers) == 0:
    raise ValueError(f'{name} is empty: a question needs at least one answer.')
