"""Generation and scoring with cached decoding: greedy, beam search, scores.

Every function takes the model's parameters and a prompt batch from
`prompts.collate` (left-padded). The media go through the vision encoder and
resampler once, each xattn layer computes their keys/values once (in
`Flamingo.prefill`), and every new token is one jitted `decode_step` inside a
`lax.while_loop` over fixed-shape caches: nothing recompiles per token.

- `greedy`: the most likely token at each step, until a stop token.
- `beam_search`: beams kept per prompt (the paper uses 3), finished
  hypotheses ranked by log-probability / length penalty (GNMT's
  ((5 + length) / 6) ** alpha; alpha = 0, the default, is plain
  log-probability); stops as soon as no live beam can beat the best finished
  one.
- `score`: the log-likelihood of candidate continuations of each prompt
  (close-ended classification, multiple choice), the prompt run once and its
  cache shared by every candidate.
- `greedy_uncached`: the reference, recomputing the whole sequence for every
  token; tests check that `greedy` gives exactly its tokens, and the
  benchmark reports the speed-up.

Glossary of shapes:
  B: prompts; P: prompt columns; K: beams; C: candidates per prompt.
  T: new tokens (max_new_tokens); Lc: candidate length; V: vocabulary.
"""

from collections.abc import Mapping, Sequence
import dataclasses
import functools
from typing import Any, NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from flamingo_jax.models import decoding
from flamingo_jax.models import flamingo
from flamingo_jax.models import precision

Batch = Mapping[str, Any]  # As from prompts.collate.
NEG_INF = -1e9  # Finite, so that sums of impossible scores stay ordered.


@dataclasses.dataclass(frozen=True)
class Options:
  """What to generate. Hashable: jitted functions specialise on it."""
  max_new_tokens: int = 20
  stop_ids: tuple[int, ...] = ()  # E.g. (<EOC>, <EOS>): end a hypothesis.
  banned_ids: tuple[int, ...] = ()  # E.g. (<pad>, <BOS>, <image>).
  beam_size: int = 3
  length_penalty: float = 0.0
  # Stop tokens are banned before this many new tokens (with alpha 0 an
  # immediate stop can otherwise win a beam).
  min_new_tokens: int = 0

  def __post_init__(self):
    if self.max_new_tokens < 1:
      raise ValueError(f'max_new_tokens must be >= 1; got '
                       f'{self.max_new_tokens}.')
    if not 0 <= self.min_new_tokens <= self.max_new_tokens:
      raise ValueError(f'min_new_tokens must be in [0, max_new_tokens='
                       f'{self.max_new_tokens}]; got {self.min_new_tokens}.')
    if self.beam_size < 1:
      raise ValueError(f'beam_size must be >= 1; got {self.beam_size}.')


def special_ids(tokenizer: Any, vocab_size: int
                ) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(stop_ids, banned_ids) of a tokenizer for an LM of `vocab_size`.

  Stops at `<EOC>` and `<EOS>`; bans `<pad>`, `<BOS>` and `<image>`, except
  a token that is also a stop (GPT-NeoX's and MPT's `<|endoftext|>` is
  both BOS and EOS; GPT-2 users often pad with EOS), and, when the
  tokenizer's `<EOC>` is one of its own tokens (an imported tokenizer, e.g.
  OpenFlamingo's `<|endofchunk|>`), the LM's extra `<EOC>` logit (id
  `vocab_size`), which is then never trained to mean anything.
  """
  stop_ids = tuple(dict.fromkeys((tokenizer.eoc_id, tokenizer.eos_id)))
  banned = [tokenizer.pad_id, tokenizer.bos_id, tokenizer.image_id]
  if tokenizer.eoc_id != vocab_size:
    banned.append(vocab_size)
  banned_ids = tuple(i for i in dict.fromkeys(banned)
                     if i not in stop_ids and i >= 0)
  return stop_ids, banned_ids


class Result(NamedTuple):
  tokens: jax.Array  # [B, T] int32; after a stop token: 0.
  lengths: jax.Array  # [B] int32: tokens up to and including the stop.
  scores: jax.Array  # [B] float32: log-probability (beams: normalised).


class Decoder:
  """Jitted cached generation and scoring for one model config."""

  def __init__(self, model_config: Mapping[str, Any], *,
               compute_dtype: Any = jnp.float32):
    self.model_config = model_config
    self.compute_dtype = compute_dtype

  # -- The model's two cached entry points, as pure functions. -------------

  def _prefill(self, params, batch, capacity):
    def fn(batch):
      model = flamingo.Flamingo(self.model_config)
      visual = model.encode_media(batch['media'], batch['media_mask'])  # [B, N, R, D]
      logits, state = model.prefill(
          batch['tokens'], batch['valid'], batch['media_index'], visual,
          batch['media_mask'], capacity)  # [B, P, V]
      return logits[:, -1].astype(jnp.float32), state  # [B, V]
    model = precision.with_compute_dtype(hk.transform(fn), self.compute_dtype)
    return model.apply(params, None, batch)

  def _step(self, params, tokens, valid, media_index, state):
    def fn(tokens, valid, media_index, state):
      model = flamingo.Flamingo(self.model_config)
      logits, state = model.decode_step(tokens, valid, media_index, state)  # [B, L, V]
      return logits.astype(jnp.float32), state
    model = precision.with_compute_dtype(hk.transform(fn), self.compute_dtype)
    return model.apply(params, None, tokens, valid, media_index, state)

  def _next(self, params, tokens, phi, state):
    """One new token per row: [B] -> logits [B, V]."""
    ones = jnp.ones([tokens.shape[0], 1], bool)
    logits, state = self._step(params, tokens[:, None], ones, phi[:, None],
                               state)  # [B, 1, V]
    return logits[:, 0], state  # [B, V]

  # -- Public API. ----------------------------------------------------------

  @functools.partial(jax.jit, static_argnums=(0, 3))
  def greedy(self, params: hk.Params, batch: Batch,
             options: Options) -> Result:
    """The argmax token at each step; rows stop at any of `stop_ids`."""
    steps = options.max_new_tokens
    capacity = batch['tokens'].shape[1] + steps
    logits, state = self._prefill(params, batch, capacity)  # [B, V]
    phi = batch['media_index'][:, -1]  # [B]: new tokens see the last medium.
    rows = logits.shape[0]

    def cond(carry):
      t, done = carry[0], carry[2]
      return (t < steps) & ~jnp.all(done)

    def body(carry):
      t, out, done, total, logits, state = carry
      logp = _log_probs(logits, options, t)  # [B, V]
      token = jnp.argmax(logp, axis=-1).astype(jnp.int32)  # [B]
      token = jnp.where(done, 0, token)  # [B]
      total = total + jnp.where(
          done, 0.0, jnp.take_along_axis(logp, token[:, None], -1)[:, 0])
      out = out.at[:, t].set(token)  # [B, T]
      done = done | _is_stop(token, options.stop_ids)  # [B]
      logits, state = self._next(params, token, phi, state)  # [B, V]
      return t + 1, out, done, total, logits, state

    carry = (jnp.zeros([], jnp.int32), jnp.zeros([rows, steps], jnp.int32),
             jnp.zeros([rows], bool), jnp.zeros([rows], jnp.float32), logits,
             state)
    _, out, _, total, _, _ = jax.lax.while_loop(cond, body, carry)
    return Result(out, _lengths(out, options.stop_ids), total)

  @functools.partial(jax.jit, static_argnums=(0, 3))
  def beam_search(self, params: hk.Params, batch: Batch,
                  options: Options) -> Result:
    """The best finished hypothesis of `options.beam_size` beams per row."""
    steps, beams = options.max_new_tokens, options.beam_size
    capacity = batch['tokens'].shape[1] + steps
    logits, state = self._prefill(params, batch, capacity)  # [B, V]
    rows, vocab = logits.shape
    state = decoding.repeat_rows(state, beams)
    logits = jnp.repeat(logits, beams, axis=0)  # [B*K, V]
    phi = jnp.repeat(batch['media_index'][:, -1], beams)  # [B*K]
    penalty = functools.partial(_length_penalty, alpha=options.length_penalty)

    def cond(carry):
      t, alive_score, finished_score = carry[0], carry[1], carry[4]
      # The best a live beam could still reach: its score now, normalised
      # with the largest penalty (log-probabilities only fall).
      best_alive = alive_score[:, 0] / penalty(steps)  # [B]
      return (t < steps) & ~jnp.all(finished_score[:, 0] >= best_alive)

    def body(carry):
      t, alive_score, alive_seq, finished_seq, finished_score, logits, state = carry
      logp = _log_probs(logits, options, t).reshape(rows, beams, vocab)  # [B, K, V]
      scores = (alive_score[:, :, None] + logp).reshape(rows, -1)  # [B, K*V]
      top, index = jax.lax.top_k(scores, 2 * beams)  # [B, 2K]
      parent, token = index // vocab, (index % vocab).astype(jnp.int32)  # [B, 2K]
      seqs = jnp.take_along_axis(alive_seq, parent[:, :, None], 1)  # [B, 2K, T]
      seqs = seqs.at[:, :, t].set(token)  # [B, 2K, T]
      stopped = _is_stop(token, options.stop_ids) | (t == steps - 1)  # [B, 2K]

      done_score = jnp.where(stopped, top / penalty(t + 1), NEG_INF)  # [B, 2K]
      finished_score, keep = jax.lax.top_k(
          jnp.concatenate([finished_score, done_score], 1), beams)  # [B, K]
      finished_seq = jnp.take_along_axis(
          jnp.concatenate([finished_seq, seqs], 1), keep[:, :, None], 1)  # [B, K, T]

      alive_score, keep = jax.lax.top_k(
          jnp.where(stopped, NEG_INF, top), beams)  # [B, K]
      alive_seq = jnp.take_along_axis(seqs, keep[:, :, None], 1)  # [B, K, T]
      token = jnp.take_along_axis(token, keep, 1).reshape(-1)  # [B*K]
      parent = jnp.take_along_axis(parent, keep, 1)  # [B, K]
      flat_parent = (jnp.arange(rows)[:, None] * beams + parent).reshape(-1)  # [B*K]
      state = decoding.select_rows(state, flat_parent)
      logits, state = self._next(params, token, phi, state)  # [B*K, V]
      return (t + 1, alive_score, alive_seq, finished_seq, finished_score,
              logits, state)

    alive_score = jnp.tile(
        jnp.asarray([0.0] + [NEG_INF] * (beams - 1), jnp.float32), (rows, 1))  # [B, K]
    empty = jnp.zeros([rows, beams, steps], jnp.int32)  # [B, K, T]
    carry = (jnp.zeros([], jnp.int32), alive_score, empty, empty,
             jnp.full([rows, beams], NEG_INF, jnp.float32), logits, state)
    _, alive_score, alive_seq, finished_seq, finished_score, _, _ = (
        jax.lax.while_loop(cond, body, carry))
    # A row whose beams all stopped early has finished ones; take the best.
    best = finished_seq[:, 0]  # [B, T]
    tokens = _after_stop_zeroed(best, options.stop_ids)  # [B, T]
    return Result(tokens, _lengths(tokens, options.stop_ids),
                  finished_score[:, 0])

  @functools.partial(jax.jit, static_argnums=(0,))
  def score(self, params: hk.Params, batch: Batch,
            candidates: jax.Array,  # [B, C, Lc] int, right-padded
            candidate_valid: jax.Array,  # [B, C, Lc] bool
            ) -> jax.Array:  # [B, C] float32: summed log-probabilities
    """log p(candidate | prompt) for every candidate of every prompt."""
    rows, num, length = candidates.shape
    capacity = batch['tokens'].shape[1] + length
    last, state = self._prefill(params, batch, capacity)  # [B, V]
    state = decoding.repeat_rows(state, num)
    flat = candidates.reshape(rows * num, length)  # [B*C, Lc]
    valid = candidate_valid.reshape(rows * num, length)  # [B*C, Lc]
    phi = jnp.repeat(batch['media_index'][:, -1], num)  # [B*C]
    phi = jnp.broadcast_to(phi[:, None], flat.shape)  # [B*C, Lc]
    logits, _ = self._step(params, flat, valid, phi, state)  # [B*C, Lc, V]
    # Token j is predicted by token j-1's logits; the first by the prompt's.
    logits = jnp.concatenate(
        [jnp.repeat(last, num, axis=0)[:, None], logits[:, :-1]], 1)  # [B*C, Lc, V]
    logp = jax.nn.log_softmax(logits, axis=-1)  # [B*C, Lc, V]
    token_logp = jnp.take_along_axis(logp, flat[..., None], -1)[..., 0]  # [B*C, Lc]
    total = jnp.sum(jnp.where(valid, token_logp, 0.0), axis=1)  # [B*C]
    return total.reshape(rows, num)  # [B, C]

  # -- The uncached reference. ----------------------------------------------

  def greedy_uncached(self, params: hk.Params, batch: Batch,
                      options: Options) -> Result:
    """Greedy decoding recomputing the whole sequence for each new token.

    The prompts are moved to the left of a fixed [B, P + T] buffer, so one
    compiled forward pass serves every step.
    """
    tokens = np.asarray(batch['tokens'])
    valid = np.asarray(batch['valid'], bool)
    rows, width = tokens.shape
    steps = options.max_new_tokens
    buffer = np.zeros([rows, width + steps], np.int32)
    phi_buffer = np.zeros_like(buffer)
    lengths = valid.sum(1)
    for row in range(rows):
      buffer[row, :lengths[row]] = tokens[row, valid[row]]
      phi_buffer[row, :lengths[row]] = np.asarray(
          batch['media_index'])[row, valid[row]]
    phi = np.asarray(batch['media_index'])[:, -1]
    out = np.zeros([rows, steps], np.int32)
    done = np.zeros([rows], bool)
    total = np.zeros([rows], np.float32)
    for t in range(steps):
      logits = self._forward(params, buffer, batch['media'],
                             batch['media_mask'], phi_buffer)  # [B, S, V]
      last = np.asarray(logits)[np.arange(rows), lengths - 1]  # [B, V]
      logp = np.asarray(_log_probs(jnp.asarray(last), options, t))
      token = np.where(done, 0, logp.argmax(-1)).astype(np.int32)
      total += np.where(done, 0.0, logp[np.arange(rows), token])
      out[:, t] = token
      done |= np.isin(token, options.stop_ids)
      buffer[np.arange(rows), lengths] = token
      phi_buffer[np.arange(rows), lengths] = phi
      lengths = lengths + 1
      if done.all():
        break
    out = jnp.asarray(out)
    return Result(out, _lengths(out, options.stop_ids), jnp.asarray(total))

  @functools.partial(jax.jit, static_argnums=(0,))
  def _forward(self, params, tokens, media, media_mask, media_index):
    model = precision.with_compute_dtype(
        flamingo.transform(self.model_config), self.compute_dtype)
    return model.apply(params, None, tokens, media, media_mask,
                       media_index).astype(jnp.float32)


def _log_probs(logits: jax.Array, options: Options,
               t: jax.Array | int) -> jax.Array:
  """log_softmax of new token t over the vocabulary without the banned
  tokens (and the stop tokens, before `min_new_tokens`)."""
  if options.banned_ids:
    logits = logits.at[..., jnp.asarray(options.banned_ids)].set(-jnp.inf)
  if options.min_new_tokens and options.stop_ids:
    stop = jnp.asarray(options.stop_ids)
    early = jnp.asarray(t) < options.min_new_tokens
    logits = logits.at[..., stop].set(
        jnp.where(early, -jnp.inf, logits[..., stop]))
  return jax.nn.log_softmax(logits, axis=-1)


def _is_stop(token: jax.Array, stop_ids: Sequence[int]) -> jax.Array:
  if not stop_ids:
    return jnp.zeros(token.shape, bool)
  return jnp.isin(token, jnp.asarray(stop_ids))


def _lengths(tokens: jax.Array, stop_ids: Sequence[int]) -> jax.Array:
  """Tokens up to and including the first stop (all of them if none)."""
  stop = _is_stop(tokens, stop_ids)  # [B, T]
  first = jnp.argmax(stop, axis=1)  # [B]
  return jnp.where(stop.any(1), first + 1, tokens.shape[1]).astype(jnp.int32)


def _after_stop_zeroed(tokens: jax.Array, stop_ids: Sequence[int]) -> jax.Array:
  keep = jnp.arange(tokens.shape[1])[None] < _lengths(tokens, stop_ids)[:, None]
  return jnp.where(keep, tokens, 0)


def _length_penalty(length, alpha: float):
  """GNMT's ((5 + length) / 6) ** alpha; 1 when alpha = 0."""
  if alpha == 0.0:
    return 1.0
  return ((5.0 + length) / 6.0) ** alpha
