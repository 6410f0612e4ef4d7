"""VQA accuracy and answer normalisation, as the official VQA evaluation.

Reproduces `PythonEvaluationTools/vqaEvaluation/vqaEval.py` of
github.com/GT-Vision-Lab/VQA (its normalisation is the same from the 2016
apostrophe fix 458a8b2 to today):

  - The prediction is normalised: newlines and tabs become spaces, the ends
    are stripped, then `process_punctuation` and `process_digit_article`.
  - The annotators' answers are taken as the dataset gives them and go
    through `process_punctuation` only, and only when they are not all the
    same (so raw references, e.g. 'Two', should be normalised first).
  - accuracy = mean over the n annotators i of
    min(1, #{j != i : answer_j == prediction} / 3), n = 10 in VQAv2.

Not reproduced: the 2021 commit a013f00 normalises the prediction only when
the annotators disagree; the 2016 code and the EvalAI server's copy
(Cloud-CV/VQA-Evaluation) always do, as here. That server rewrites
`processPunctuation` with regexes, which can differ on rare answers.
"""

from collections.abc import Sequence
import re

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


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
  """The official VQA accuracy of one prediction, in [0, 1].

  Args:
    prediction: the model's answer, raw (it is normalised here).
    answers: the annotators' answers (10 in VQAv2), as the dataset gives
      them. With m of n matching: m >= 4 gives 1, m = 3 gives 0.9
      (leaving out a match leaves 2/3), m = 2 gives 0.6, m = 1 gives 0.3.

  Returns:
    The mean over annotators of min(1, matches among the others / 3).

  Raises:
    ValueError: `answers` is empty or not a list of strings.
  """
  _check_answers(answers, 'answers')
  prediction = normalize_vqa_answer(prediction)
  if len(set(answers)) > 1:
    answers = [process_punctuation(answer) for answer in answers]
  matches = sum(answer == prediction for answer in answers)
  per_annotator = [min(1.0, (matches - (answer == prediction)) / 3.0)
                   for answer in answers]
  return float(sum(per_annotator)) / len(per_annotator)


def mean_vqa_accuracy(predictions: Sequence[str],
                      answers_lists: Sequence[Sequence[str]]) -> float:
  """The mean `vqa_accuracy` over questions, in [0, 1] (papers: x 100)."""
  if isinstance(predictions, str) or len(predictions) == 0:
    raise ValueError('predictions must be a non-empty list of str; got '
                     f'{predictions!r}.')
  if len(predictions) != len(answers_lists):
    raise ValueError(f'Got {len(predictions)} predictions but '
                     f'{len(answers_lists)} answer lists.')
  for i, answers in enumerate(answers_lists):
    _check_answers(answers, f'answers_lists[{i}]')
  return float(np.mean([vqa_accuracy(prediction, answers) for
                        prediction, answers in zip(predictions,
                                                   answers_lists)]))


def _check_answers(answers: Sequence[str], name: str) -> None:
  if isinstance(answers, str) or not all(isinstance(a, str) for a in answers):
    raise ValueError(f'{name} must be a list of str; got {answers!r}.')
  if len(answers) == 0:
    raise ValueError(f'{name} is empty: a question needs at least one answer.')
