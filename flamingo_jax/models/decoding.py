"""Caches for autoregressive decoding: self-attention keys/values and media.

Generation runs the model on chunks of tokens: the prompt first, then one
token per step. Everything earlier chunks computed and later ones need is kept
in fixed-shape buffers, so one compiled step serves every token:

  self-attention keys/values   one `KVCache` [N, B, S, H, K] per stack of
                               layers (the LM's blocks; grafted layers)
  cross-attention keys/values  `cross_kv` [X, B, M, H, K]: every medium goes
                               through the vision encoder, the resampler and
                               each xattn layer's key/value projections once
  key_positions, key_mask      [B, S]: the position of the token in each cache
                               slot, and whether the slot holds a real token

Rows of a batch may have prompts of different lengths: padding anywhere in a
chunk is marked invalid and takes no position, so a left-padded prompt is
computed exactly as the unpadded one. Each chunk is written at the same slots
for every row (`index`), and each row numbers its own tokens
(`next_position`). Prompts are therefore left-padded (so that every row's
last prompt token is in the last slot) and candidate continuations
right-padded.

Glossary of shapes:
  B: batch size (prompts, or prompts x beams).
  L: tokens in the current chunk.
  S: cache capacity (longest prompt + new tokens).
  N: number of layers of a stack; X: number of cross-attention layers.
  M: visual tokens per row (media slots x tokens per medium).
  H: number of heads; K: key size.
"""

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp


class KVCache(NamedTuple):
  """Keys and values: [B, S, H, K] per layer, [N, B, S, H, K] per stack."""
  key: jax.Array
  value: jax.Array


class CacheView(NamedTuple):
  """What every layer of one step needs to read and extend its own cache."""
  index: jax.Array  # [] int32: the first slot this chunk writes.
  key_positions: jax.Array  # [B, S] int32, after this chunk's write.
  key_mask: jax.Array  # [B, S] bool, after this chunk's write.


class DecodeState(NamedTuple):
  """Everything one decoding step carries to the next (a pytree)."""
  lm: KVCache  # [N, B, S, H, K]: the LM blocks' self-attention.
  grafted: Optional[KVCache]  # [X, B, S, H, K], only for xattn 'grafting'.
  cross_kv: Optional[KVCache]  # [X, B, M, H, K]: the media, per xattn layer.
  media_mask: jax.Array  # [B, N] bool: which media slots are real.
  key_positions: jax.Array  # [B, S] int32
  key_mask: jax.Array  # [B, S] bool
  next_position: jax.Array  # [B] int32: valid tokens so far, per row.
  index: jax.Array  # [] int32: slots used so far (same for every row).

  @property
  def capacity(self) -> int:
    return self.key_mask.shape[1]


def empty_kv(num_layers: int, batch: int, capacity: int, num_heads: int,
             head_size: int, dtype) -> KVCache:
  shape = (num_layers, batch, capacity, num_heads, head_size)
  return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


def write(buffer: jax.Array, chunk: jax.Array, index: jax.Array,
          axis: int) -> jax.Array:
  """`chunk` written into `buffer` from `index` along `axis`."""
  return jax.lax.dynamic_update_slice_in_dim(
      buffer, chunk.astype(buffer.dtype), index, axis)


def chunk_positions(next_position: jax.Array,  # [B]
                    valid: jax.Array,  # [B, L] bool
                    ) -> jax.Array:  # [B, L] int32
  """Positions of a chunk's tokens, counting only valid ones.

  An invalid (padding) token repeats the position of the valid token before
  it (-1 before any); it is masked out as a key, so that value is never read.
  """
  counts = jnp.cumsum(valid.astype(jnp.int32), axis=1)  # [B, L]
  return next_position[:, None] + counts - 1  # [B, L]


def begin_chunk(state: DecodeState, valid: jax.Array  # [B, L] bool
                ) -> tuple[jax.Array, CacheView]:
  """The chunk's positions [B, L] and the view its layers share."""
  positions = chunk_positions(state.next_position, valid)  # [B, L]
  view = CacheView(
      index=state.index,
      key_positions=write(state.key_positions, positions, state.index, 1),
      key_mask=write(state.key_mask, valid, state.index, 1))
  return positions, view


def end_chunk(state: DecodeState, view: CacheView, valid: jax.Array,
              lm_chunk: KVCache, grafted_chunk: Optional[KVCache]
              ) -> DecodeState:
  """Writes a chunk's keys/values ([N, B, L, H, K]) into the caches."""
  def extend(cache, chunk):
    return KVCache(write(cache.key, chunk.key, view.index, 2),
                   write(cache.value, chunk.value, view.index, 2))
  return state._replace(
      lm=extend(state.lm, lm_chunk),
      grafted=(None if state.grafted is None
               else extend(state.grafted, grafted_chunk)),
      key_positions=view.key_positions,
      key_mask=view.key_mask,
      next_position=state.next_position + valid.sum(axis=1, dtype=jnp.int32),
      index=state.index + valid.shape[1])


def repeat_rows(state: DecodeState, repeats: int) -> DecodeState:
  """Each row repeated `repeats` times, in place ([B] -> [B * repeats]).

  For beams and for scoring several candidates after one prompt.
  """
  def rep(x, axis):
    return jnp.repeat(x, repeats, axis=axis)
  return DecodeState(
      lm=jax.tree.map(lambda x: rep(x, 1), state.lm),
      grafted=jax.tree.map(lambda x: rep(x, 1), state.grafted),
      cross_kv=jax.tree.map(lambda x: rep(x, 1), state.cross_kv),
      media_mask=rep(state.media_mask, 0),
      key_positions=rep(state.key_positions, 0),
      key_mask=rep(state.key_mask, 0),
      next_position=rep(state.next_position, 0),
      index=state.index)


def select_rows(state: DecodeState, rows: jax.Array  # [B] int
                ) -> DecodeState:
  """The self-attention caches of `rows` (beam reordering).

  Only the caches that differ between beams are gathered: beams of one
  prompt share their media, positions and masks, and beam reordering never
  mixes prompts.
  """
  def take(x):
    return jnp.take(x, rows, axis=1)
  return state._replace(lm=jax.tree.map(take, state.lm),
                        grafted=jax.tree.map(take, state.grafted))
