"""Metrics: PTB tokens, CIDEr-D, VQA accuracy, exact match, overall score."""

import collections
import json
import math
import os
import shutil
import subprocess

import numpy as np
import pytest

from flamingo_jax.evaluation import metrics
from flamingo_jax.evaluation import ptb

# (caption, tokens of CoreNLP 3.4.1 as pycocoevalcap runs it, filtered).
PTB_GOLDEN = [
    ('A man riding a wave on top of a surfboard.',
     'a man riding a wave on top of a surfboard'),
    ("Don't do it, it's John's dog!", "do n't do it it 's john 's dog"),
    ("I can't, won't; cannot. Gonna wanna gotta",
     "i ca n't wo n't can not gon na wan na got ta"),
    ('"Hello," she said. \'Quote\' here ``x\'\'',
     'hello she said quote here x'),
    ('A dog (brown) [big] {small} on the grass...',
     'a dog -lrb- brown -rrb- -lsb- big -rsb- -lcb- small -rcb- on the grass'),
    ("I'm you're we've they'll he'd THEY'RE",
     "i 'm you 're we 've they 'll he 'd they 're"),
    ("dogs' toys and the kids' room, y'all",
     "dogs toys and the kids room y' all"),
    ("o'clock O'Neill rock'n'roll ma'am 'em '90s",
     "o'clock o'neill rock 'n' roll ma'am 'em '90s"),
    ('Mr. Smith went to the U.S. today, e.g. at 10:30 a.m. etc.',
     'mr. smith went to the u.s. today e.g. at 10:30 a.m. etc.'),
    ('well-known black-and-white -- dash - hyphen x-ray',
     'well-known black-and-white dash hyphen x-ray'),
    ('a/b and/or c*d 3.5 1,000 $5 50% #1 #tag @home AT&T rock & roll',
     'a/b and/or c * d 3.5 1,000 $ 5 50 % # 1 #tag @home at&t rock & roll'),
    ('what?! wow!!! ok.. fine.', 'what ?! wow !!! ok fine'),
    ('caf\u00e9 \u201csmart quotes\u201d don\u2019t it\u2019s \u00bd cup, '
     '1 1/2 hot dogs',
     "caf\u00e9 smart quotes do n't it 's 1/2 cup 1\u00a01/2 hot dogs"),
    ('a cat :) sits ;-( here \U0001f600', 'a cat :-rrb- sits ;--lrb- here'),
    ('a t.v. on a desk.A woman', 'a t.v. on a desk.a woman'),
    ('the letter I. The end', 'the letter i the end'),
    ('No. 5 and no. 5 and no.', 'no. 5 and no. 5 and no'),
    ('dec.k cat.dog yahoo!com foo@bar.com. http://x.com/a.',
     'dec. k cat.dog yahoo!com foo@bar.com http://x.com/a'),
]

# A small corpus: 4 images, 3-5 references each, pre-tokenised.
REFS = [
    ['a man riding a wave on a surfboard', 'a surfer rides a large wave',
     'a man on a surfboard in the ocean', 'a person surfing a wave'],
    ['two dogs playing in the grass', 'a pair of dogs run on a lawn',
     'two brown dogs play together outside'],
    ['a plate of food with broccoli and rice', 'a dinner plate with rice',
     'broccoli and rice on a white plate', 'a plate of chicken and broccoli',
     'food on a plate'],
    ['a red bus on a city street', 'a double decker bus drives down a road',
     'a red double decker bus'],
]
CANDIDATES = ['a man riding a wave on a surfboard', 'two dogs in the grass',
              'a plate with a plate of rice', 'a train on the tracks']


def _naive_cider_d(candidates, references):
  """CIDEr-D re-derived term by term from the paper's formula."""
  def grams(sentence, n):
    words = sentence.split()
    return collections.Counter(
        tuple(words[i:i + n]) for i in range(len(words) - n + 1))

  num_images = len(references)
  num_bigrams = lambda sentence: max(len(sentence.split()) - 1, 0)
  scores = []
  for cand, refs in zip(candidates, references):
    per_n = []
    for n in range(1, 5):
      def idf(gram, n=n):
        images = sum(any(gram in grams(r, n) for r in rs) for rs in references)
        return math.log(num_images) - math.log(max(images, 1))

      total = 0.0
      for ref in refs:
        c, r = grams(cand, n), grams(ref, n)
        dot = sum(min(c[g], r[g]) * r[g] * idf(g) ** 2 for g in c)
        c_norm = math.sqrt(sum((c[g] * idf(g)) ** 2 for g in c))
        r_norm = math.sqrt(sum((r[g] * idf(g)) ** 2 for g in r))
        if c_norm > 0 and r_norm > 0:
          dot /= c_norm * r_norm
        delta = num_bigrams(cand) - num_bigrams(ref)  # Sic: bigrams.
        total += dot * math.exp(-delta ** 2 / (2 * 6.0 ** 2))
      per_n.append(total / len(refs))
    scores.append(10.0 * sum(per_n) / 4)
  return scores


@pytest.mark.parametrize('caption,expected', PTB_GOLDEN)
def test_ptb_tokenize_matches_corenlp(caption, expected):
  assert metrics.ptb_tokenize(caption) == expected.split(' ')


def test_ptb_tokenize_empty_and_blank():
  assert metrics.ptb_tokenize('') == []
  assert metrics.ptb_tokenize(' \n\t ') == []
  assert metrics.ptb_tokenize('. , !') == []


def test_ptb_golden_against_the_jar_when_available():
  """Re-derives PTB_GOLDEN with pycocoevalcap's jar, where Java is present."""
  tokenizer = pytest.importorskip('pycocoevalcap.tokenizer.ptbtokenizer')
  jar = os.path.join(os.path.dirname(tokenizer.__file__),
                     tokenizer.STANFORD_CORENLP_3_4_1_JAR)
  if not shutil.which('java') or not os.path.exists(jar):
    pytest.skip('needs java and the CoreNLP jar of pycocoevalcap')
  lines = '\n'.join(caption for caption, _ in PTB_GOLDEN)
  out = subprocess.run(
      ['java', '-cp', jar, 'edu.stanford.nlp.process.PTBTokenizer',
       '-preserveLines', '-lowerCase'], input=lines.encode(),
      capture_output=True, check=True, timeout=60).stdout.decode()
  for line, (_, expected) in zip(out.split('\n'), PTB_GOLDEN):
    tokens = [t for t in line.split(' ') if t and t not in ptb.PUNCTUATIONS]
    assert tokens == expected.split(' ')


def test_cider_d_matches_naive_rederivation():
  expected = _naive_cider_d(CANDIDATES, REFS)
  scores = metrics.cider_d_scores(CANDIDATES, REFS, tokenize=False)
  assert scores.shape == (4,) and scores.dtype == np.float64
  np.testing.assert_allclose(scores, expected, rtol=1e-12, atol=1e-12)
  assert metrics.cider_d(CANDIDATES, REFS) == pytest.approx(np.mean(expected))
  assert scores[0] > scores[1] > scores[3] == 0.0  # Exact > partial > none.


def test_cider_d_hand_computed():
  # Two words equal to the only reference: cos 1 for 1- and 2-grams, no 3-
  # or 4-grams -> 10 * (1 + 1 + 0 + 0) / 4.
  assert metrics.cider_d(['a b', 'c d'], [['a b'], ['c d']]) == 5.0
  # Clipping: 'dog dog' vs 'dog' gives min(2w, w) * w / (2w * w) = 0.5 for
  # unigrams (1.0 unclipped); its bigram is unseen; the lengths differ by
  # one bigram. 'cat' == 'cat' gives 10 * 1 / 4.
  scores = metrics.cider_d_scores(['dog dog', 'cat'], [['dog'], ['cat']])
  np.testing.assert_allclose(scores, [1.25 * math.exp(-1 / 72), 2.5],
                             rtol=1e-14)


def test_cider_d_properties():
  refs = [[r] * 3 for r in ('a man riding a red horse', 'two cats on a sofa',
                            'a kitchen with a white stove')]
  same = [r[0] for r in refs]
  np.testing.assert_allclose(metrics.cider_d_scores(same, refs), 10.0)
  unrelated = ['zebra', 'purple elephant', 'quantum yacht club']
  np.testing.assert_array_equal(metrics.cider_d_scores(unrelated, refs), 0.0)
  noisy = ['A MAN riding a red horse!', '"Two cats," on a sofa.',
           'A kitchen -- with a white stove...']
  assert metrics.cider_d(noisy, refs) == metrics.cider_d(same, refs)
  assert metrics.cider_d(['a b'], [['a b']]) == 0.0  # One image: idf = 0.


def test_cider_d_agrees_with_pycocoevalcap():
  scorer_module = pytest.importorskip('pycocoevalcap.cider.cider_scorer')
  rng = np.random.default_rng(0)
  words = 'a the man dog red blue on in with two cat sits runs big'.split()
  sentence = lambda: ' '.join(rng.choice(words, rng.integers(1, 12)))
  refs = REFS + [[sentence() for _ in range(5)] for _ in range(40)]
  cands = CANDIDATES + [sentence() for _ in range(40)]
  scorer = scorer_module.CiderScorer(n=4, sigma=6.0)
  for cand, image_refs in zip(cands, refs):
    scorer += (cand, image_refs)
  score, scores = scorer.compute_score()
  ours = metrics.cider_d_scores(cands, refs, tokenize=False)
  np.testing.assert_allclose(ours, scores, rtol=0, atol=1e-9)
  assert metrics.cider_d(cands, refs, tokenize=False) == pytest.approx(
      score, abs=1e-9)


@pytest.mark.parametrize('predictions,references,match', [
    ([], [], 'at least one image'),
    (['a'], [['a'], ['b']], '1 predictions but 2'),
    (['a', 'b'], [['a'], []], r'references\[1\] is empty'),
    (['a'], ['a dog'], r'references\[0\] must be a list of str'),
    ('a dog', [['a dog']], 'not a single string'),
])
def test_cider_d_errors(predictions, references, match):
  with pytest.raises(ValueError, match=match):
    metrics.cider_d(predictions, references)


@pytest.mark.parametrize('matches,expected', [
    (0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_leave_one_out(matches, expected):
  # With m of 10 matching: leaving out a match leaves min(1, (m-1)/3) (m
  # times), leaving out another min(1, m/3) (10-m times).
  answers = ['yes'] * matches + ['no', 'maybe'] * 5
  answers = answers[:10]
  assert metrics.vqa_accuracy('yes', answers) == pytest.approx(expected)


@pytest.mark.parametrize('raw,normalised', [
    ('Two', '2'), ('none', '0'), ('ten', '10'), ('the dog.', 'dog'),
    ('An apple', 'apple'), ('isnt', "isn't"), ('dont', "don't"),
    ('yes!', 'yes'), ('Tennis.', 'tennis'), ('3.5', '3.5'),
    ('1,000', '1000'), ('red, white', 'red white'), ('x-ray', 'x ray'),
    ('x - ray', 'x ray'), ('  Two\tDogs!\n', '2 dogs')])
def test_vqa_normalisation(raw, normalised):
  assert metrics.normalize_vqa_answer(raw) == normalised


def test_vqa_accuracy_answer_processing_is_official():
  # The prediction is fully normalised ...
  assert metrics.vqa_accuracy('Two!', ['2'] * 10) == 1.0
  # ... the annotators' answers get only the punctuation step, and only when
  # they disagree.
  assert metrics.vqa_accuracy('dog', ['dog.'] * 3 + ['cat'] * 7) == 0.9
  assert metrics.vqa_accuracy('dog', ['the dog'] * 3 + ['cat'] * 7) == 0.0
  assert metrics.vqa_accuracy('dog', ['dog.'] * 10) == 0.0
  assert metrics.mean_vqa_accuracy(['yes', 'Two'], [['yes'] * 10, ['2'] + [
      'no'] * 9]) == pytest.approx((1.0 + 0.3) / 2)


@pytest.mark.parametrize('prediction,answers,v2016,v2021', [
    # All annotators agree: 2021 compares the stripped strings as they are.
    ('Yes', ['yes'] * 10, 1.0, 0.0),
    ('yes.', ['yes'] * 10, 1.0, 0.0),
    ('Two', ['2'] * 10, 1.0, 0.0),
    (' yes\n', ['yes'] * 10, 1.0, 1.0),
    # They disagree: 2021 normalises the answers fully, 2016 only their
    # punctuation.
    ('dog', ['The Dog'] * 3 + ['cat'] * 7, 0.0, 0.9),
    ('Two dogs', ['2 dogs'] * 4 + ['dogs'] * 6, 1.0, 1.0),
    ('dog', ['dog.'] * 3 + ['cat'] * 7, 0.9, 0.9),
])
def test_vqa_eval_versions(prediction, answers, v2016, v2021):
  assert metrics.vqa_accuracy(prediction, answers) == pytest.approx(v2016)
  assert metrics.vqa_accuracy(prediction, answers,
                              eval_version='2021') == pytest.approx(v2021)
  # OpenFlamingo's copy always normalises both sides.
  assert metrics.vqa_accuracy(prediction, answers,
                              eval_version='openflamingo') == pytest.approx(
                                  max(v2016, v2021))


@pytest.mark.parametrize('word,stem', [
    ('racing', 'race'), ('riding', 'ride'), ('swimming', 'swim'),
    ('walking', 'walk'), ('skiing', 'ski'), ('creating', 'create'),
    ('king', 'king'), ('dogs', 'dog'), ('berries', 'berry'),
    ('glasses', 'glass'), ('tennis', 'tennis'), ('yes', 'yes'),
    ('Surfing.', 'surf.'), ('two dogs', 'two dog')])
def test_okvqa_stem(word, stem):
  assert metrics.okvqa_stem(word) == stem


def test_okvqa_scoring_stems_the_prediction():
  assert metrics.vqa_accuracy('racing', ['race'] * 10, stem=True) == 1.0
  assert metrics.vqa_accuracy('racing', ['race'] * 10) == 0.0
  assert metrics.vqa_accuracy('Racing', ['race'] * 10, stem=True,
                              eval_version='2021') == 1.0
  # A raw answer of the question takes the dataset's own stem.
  answers, raw = ['fli'] * 3 + ['bird'] * 7, ['flying'] * 3 + ['birds'] * 7
  assert metrics.vqa_accuracy('Flying', answers, stem=True,
                              raw_answers=raw) == 0.9
  assert metrics.mean_vqa_accuracy(
      ['flying', 'racing'], [answers, ['race'] * 10], stem=True,
      raw_answers_lists=[raw, None]) == pytest.approx((0.9 + 1.0) / 2)


def test_accuracy_by_answer_type():
  scores = metrics.accuracy_by_answer_type(
      ['yes', '2', 'red', 'blue'],
      [['yes'] * 10, ['3'] * 10, ['red'] * 10, ['red'] * 10],
      ['yes/no', 'number', 'other', 'other'])
  assert scores == {'overall': 0.5, 'yes/no': 1.0, 'number': 0.0,
                    'other': 0.5}


def test_vqa_results_file(tmp_path):
  results = metrics.vqa_results([3, 1], [' Two dogs\n', 'yes'],
                                tmp_path / 'r.json')
  assert results == [{'question_id': 3, 'answer': 'Two dogs'},
                     {'question_id': 1, 'answer': 'yes'}]
  assert json.loads((tmp_path / 'r.json').read_text()) == results
  with pytest.raises(ValueError, match='duplicates'):
    metrics.vqa_results([1, 1], ['a', 'b'])


@pytest.mark.parametrize('call,match', [
    (lambda: metrics.vqa_accuracy('yes', []), 'answers is empty'),
    (lambda: metrics.vqa_accuracy('yes', ['yes'], eval_version='2017'),
     r"eval_version must be one of \('2016', '2021', 'openflamingo'\)"),
    (lambda: metrics.vqa_accuracy('yes', ['yes'], stem=True,
                                  raw_answers=['a', 'b']),
     'raw_answers has 2 answers, answers 1'),
    (lambda: metrics.vqa_accuracy('yes', 'yes'), 'must be a list of str'),
    (lambda: metrics.mean_vqa_accuracy([], []), 'non-empty'),
    (lambda: metrics.mean_vqa_accuracy(['a'], [['a'], ['b']]),
     '1 predictions but 2'),
    (lambda: metrics.mean_vqa_accuracy(['a'], [[]]),
     r'answers_lists\[0\] is empty'),
])
def test_vqa_errors(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_exact_match_and_top1():
  assert metrics.exact_match('Two dogs!', '2 dogs')
  assert metrics.exact_match('The cat.', 'cat')
  assert not metrics.exact_match('cat', 'cats')
  assert metrics.mean_exact_match(['a cat', 'dog', 'x'],
                                  ['cat', 'Dog.', 'y']) == pytest.approx(2 / 3)
  assert metrics.top1_accuracy([1, 2, 3, 4], [1, 2, 0, 4]) == 0.75
  assert metrics.top1_accuracy(np.array([5]), np.array([5])) == 1.0
  with pytest.raises(ValueError, match='3 predictions but 2 labels'):
    metrics.top1_accuracy([1, 2, 3], [1, 2])
  with pytest.raises(ValueError, match='0 predictions'):
    metrics.mean_exact_match([], [])
  with pytest.raises(ValueError, match='must be a str'):
    metrics.exact_match('a', 3)


def test_overall_score():
  reference = {'coco': 100.0, 'vqav2': 80.0, 'okvqa': 50.0}
  scores = {'coco': 80.0, 'vqav2': 60.0}
  assert metrics.overall_score(scores, reference) == pytest.approx(0.775)
  with pytest.raises(ValueError, match=r"tasks \['msrvtt'\]"):
    metrics.overall_score({'msrvtt': 30.0, 'coco': 1.0}, reference)
  with pytest.raises(ValueError, match='at least one'):
    metrics.overall_score({}, reference)
  with pytest.raises(ValueError, match=r'Reference scores of 0.*coco'):
    metrics.overall_score({'coco': 1.0}, {'coco': 0.0})
