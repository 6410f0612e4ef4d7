"""Position encodings of the published LM families (besides Chinchilla's).

Chinchilla's Transformer-XL relative positions live in `lm.py`
(`RelativeSelfAttention`); the other families' are here, each a function of
the tokens' integer positions, so that they work the same on a whole
sequence, on a left-padded prompt (padding takes no position) and on cached
decoding chunks (`models/decoding.py`):

- rotary (Su et al., 2021; GPT-NeoX, LLaMA): queries and keys are rotated by
  position-dependent angles before the dot product, so q_t . k_s depends on
  t - s only. We use the "rotate-half" convention of GPT-NeoX and of
  Hugging Face's LLaMA (the first half of the rotated dimensions pairs with
  the second half, not even with odd dimensions as in the original LLaMA
  code; Hugging Face's LLaMA weights are already permuted for it). GPT-NeoX
  rotates only the first `rotary_fraction` of each head's dimensions.
- ALiBi (Press et al., 2022; MPT): a bias -slope_h * (t - s) on the
  attention logits, one slope per head (`alibi_slopes`).
- learned absolute positions (GPT-2): a table of `max_positions` rows added
  to the token embeddings (in `lm.DecoderLM`).

Glossary of shapes:
  B: batch size.
  L: number of query tokens; S: number of key tokens.
  H: number of heads; K: head (key) size; R: rotated dimensions (even).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np


def rotary_dims(head_size: int, fraction: float) -> int:
  """The number of rotated dimensions of a head, R (GPT-NeoX's rotary_ndims
  = int(head_size * rotary_pct)); must be even and > 0."""
  dims = int(head_size * fraction)
  if dims <= 0 or dims % 2 or dims > head_size:
    raise ValueError(
        f'rotary_fraction {fraction} of head_size {head_size} gives {dims} '
        'rotated dimensions; they must be even and in [2, head_size].')
  return dims


def apply_rotary(
    x: jax.Array,  # [B, L, H, K]
    positions: jax.Array,  # [B, L] int
    dims: int,  # R <= K: the first R dimensions of each head are rotated
    base: float = 10000.0,
) -> jax.Array:  # [B, L, H, K]
  """Rotary position embedding, rotate-half convention (see the docstring).

  Angles are computed in float32 whatever the input dtype.
  """
  # The frequencies in float32, as Hugging Face computes them.
  exponents = np.arange(0, dims, 2).astype(np.float32) / np.float32(dims)
  inv_freq = np.float32(1.0) / np.power(np.float32(base), exponents)  # [R/2]
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(
      inv_freq, jnp.float32)  # [B, L, R/2]
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, L, 1, R]
  cos, sin = jnp.cos(angles), jnp.sin(angles)  # [B, L, 1, R]
  rotated, rest = x[..., :dims].astype(jnp.float32), x[..., dims:]  # [B, L, H, R]
  first, second = jnp.split(rotated, 2, axis=-1)  # [B, L, H, R/2]
  half_turn = jnp.concatenate([-second, first], axis=-1)  # [B, L, H, R]
  out = (rotated * cos + half_turn * sin).astype(x.dtype)  # [B, L, H, R]
  return jnp.concatenate([out, rest], axis=-1)  # [B, L, H, K]


def alibi_slopes(num_heads: int, bias_max: float = 8.0) -> np.ndarray:
  """ALiBi's per-head slopes [H] (float32), as MPT computes them.

  For H a power of two: 2^(-bias_max * h / H), h = 1..H. Otherwise the
  slopes of the next power of two, odd-indexed ones first, then the
  even-indexed ones, cut to H.
  """
  if num_heads < 1:
    raise ValueError(f'num_heads must be >= 1; got {num_heads}.')
  power = 2 ** math.ceil(math.log2(num_heads))
  exponents = np.arange(1, power + 1, dtype=np.float64) * (bias_max / power)
  slopes = 1.0 / np.power(2.0, exponents)  # [power]
  if power != num_heads:
    slopes = np.concatenate([slopes[1::2], slopes[::2]])[:num_heads]
  return slopes.astype(np.float32)


def alibi_bias(
    slopes: np.ndarray,  # [H]
    query_positions: jax.Array,  # [B, L] int
    key_positions: jax.Array,  # [B, S] int
) -> jax.Array:  # [B, H, L, S] float32
  """-slope_h * (t - s): the ALiBi term of the attention logits."""
  distance = (query_positions[:, :, None]
              - key_positions[:, None, :]).astype(jnp.float32)  # [B, L, S]
  return -jnp.asarray(slopes)[None, :, None, None] * distance[:, None]  # [B, H, L, S]
