"""Cached generation and scoring against full recomputation."""

import dataclasses

import jax
import numpy as np
import pytest

from flamingo_jax.data import media_index as media_index_lib
from flamingo_jax.inference import generate
from flamingo_jax.inference import prompts
from flamingo_jax.models import flamingo

BOS, IMAGE, EOC = 2, 4, 512
BANNED = (0, BOS, IMAGE)
STEPS = 6


def _prompt(rng, length, num_images):
  tokens = rng.integers(5, 500, size=length).astype(np.int32)
  tokens[0] = BOS
  tokens[sorted(rng.choice(np.arange(1, length), num_images,
                           replace=False))] = IMAGE
  phi = media_index_lib.compute_media_index(tokens == IMAGE, num_images)
  media = rng.integers(0, 255, size=(num_images, 1, 64, 64, 3), dtype=np.uint8)
  return prompts.EncodedPrompt(tokens, phi, media)


@pytest.fixture(scope='module')
def setup():
  config = flamingo.model_config('tiny')
  model = flamingo.transform(config)
  params = jax.jit(model.init)(jax.random.PRNGKey(0),
                               *flamingo.example_inputs(config))
  # Open the gates so that the media change what is generated.
  params = {module: {name: (value + 1.0 if name.endswith('_gate') else value)
                     for name, value in leaves.items()}
            for module, leaves in params.items()}
  rng = np.random.default_rng(0)
  batch = prompts.collate([_prompt(rng, 5, 1), _prompt(rng, 11, 2),
                           _prompt(rng, 3, 0)], pad_multiple=4)
  decoder = generate.Decoder(config)
  options = generate.Options(max_new_tokens=STEPS, banned_ids=BANNED,
                             beam_size=1)
  greedy = decoder.greedy(params, batch, options)
  return decoder, params, batch, options, greedy


def test_greedy_equals_uncached_recomputation(setup):
  decoder, params, batch, options, greedy = setup
  reference = decoder.greedy_uncached(params, batch, options)
  np.testing.assert_array_equal(greedy.tokens, reference.tokens)
  np.testing.assert_allclose(greedy.scores, reference.scores, rtol=1e-4)
  assert not np.isin(np.asarray(greedy.tokens), BANNED).any()


def test_greedy_stops_at_a_stop_token(setup):
  decoder, params, batch, options, greedy = setup
  stop = int(greedy.tokens[0, 2])
  stopped = decoder.greedy(
      params, batch, generate.Options(max_new_tokens=STEPS, banned_ids=BANNED,
                                      stop_ids=(stop,)))
  assert int(stopped.lengths[0]) == 3
  np.testing.assert_array_equal(stopped.tokens[0, :3], greedy.tokens[0, :3])
  assert not np.asarray(stopped.tokens[0, 3:]).any()


def test_min_new_tokens_holds_back_the_stop_tokens(setup):
  decoder, params, batch, _, greedy = setup
  stop = int(greedy.tokens[0, 0])  # Row 0 would stop at once.
  options = generate.Options(max_new_tokens=STEPS, banned_ids=BANNED,
                             stop_ids=(stop,), beam_size=1, min_new_tokens=3)
  held = decoder.greedy(params, batch, options)
  assert not np.isin(np.asarray(held.tokens[:, :3]), stop).any()
  assert (np.asarray(held.lengths) > 3).all()
  reference = decoder.greedy_uncached(params, batch, options)
  np.testing.assert_array_equal(held.tokens, reference.tokens)
  beams = decoder.beam_search(params, batch, dataclasses.replace(
      options, beam_size=3))
  assert not np.isin(np.asarray(beams.tokens[:, :3]), stop).any()
  assert (np.asarray(beams.lengths) > 3).all()


@pytest.mark.parametrize('kwargs, match', [
    (dict(max_new_tokens=0), 'max_new_tokens'),
    (dict(max_new_tokens=4, min_new_tokens=5), 'min_new_tokens'),
    (dict(beam_size=0), 'beam_size'),
])
def test_bad_options_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    generate.Options(**kwargs)


def test_one_beam_is_greedy(setup):
  decoder, params, batch, options, greedy = setup
  beam = decoder.beam_search(params, batch, options)
  np.testing.assert_array_equal(beam.tokens, greedy.tokens)
  np.testing.assert_allclose(beam.scores, greedy.scores, rtol=1e-5)


def test_beam_search_score_is_the_log_likelihood_of_its_output(setup):
  decoder, params, batch, _, greedy = setup
  options = generate.Options(max_new_tokens=STEPS, beam_size=3)
  beam = decoder.beam_search(params, batch, options)
  valid = np.arange(STEPS)[None] < np.asarray(beam.lengths)[:, None]
  scored = decoder.score(params, batch, np.asarray(beam.tokens)[:, None],
                         valid[:, None])
  np.testing.assert_allclose(scored[:, 0], beam.scores, rtol=1e-4)
  # Three beams find hypotheses at least as likely as the greedy one here.
  plain = decoder.greedy(params, batch, options)
  assert (np.asarray(beam.scores) >= np.asarray(plain.scores) - 1e-4).all()


def test_scores_equal_uncached_log_likelihoods(setup):
  decoder, params, batch, _, greedy = setup
  rng = np.random.default_rng(1)
  candidates = rng.integers(5, 500, size=(3, 2, STEPS)).astype(np.int32)
  valid = np.ones(candidates.shape, bool)
  valid[:, 1, 4:] = False  # A shorter second candidate.
  scores = np.asarray(decoder.score(params, batch, candidates, valid))
  tokens, ok = np.asarray(batch['tokens']), np.asarray(batch['valid'])
  for c in range(2):
    # Prompt then candidate, left-aligned in the uncached forward's buffer.
    buffer = np.zeros([3, tokens.shape[1] + STEPS], np.int32)
    phi = np.zeros_like(buffer)
    starts = ok.sum(1)
    for row in range(3):
      buffer[row, :starts[row]] = tokens[row, ok[row]]
      phi[row, :starts[row]] = np.asarray(batch['media_index'])[row, ok[row]]
      buffer[row, starts[row]:starts[row] + STEPS] = candidates[row, c]
      phi[row, starts[row]:] = phi[row, starts[row] - 1]
    logits = np.asarray(decoder._forward(params, buffer, batch['media'],
                                         batch['media_mask'], phi))
    logp = jax.nn.log_softmax(logits, axis=-1)
    for row in range(3):
      expected = sum(
          float(logp[row, starts[row] + j - 1, candidates[row, c, j]])
          for j in range(STEPS) if valid[row, c, j])
      assert scores[row, c] == pytest.approx(expected, rel=1e-4)
