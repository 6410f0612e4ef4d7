"""GATED XATTN-DENSE: how Flamingo's text tokens look at the visual tokens.

The block (paper §2.2, Fig. 4) is inserted between frozen LM blocks:

  y = y + tanh(alpha_xattn) * attention(q=LN(y), kv=LN(visual))
  y = y + tanh(alpha_dense) * ffw(LN(y))          # Squared-ReLU, 4x width

Both alphas are scalar parameters (`attn_gate`, `ffw_gate`) initialised at 0,
so at initialisation Flamingo is exactly its frozen LM.

Which images a token sees (§2.3 and App. A.3): each text token attends only to
the visual tokens of the last image that precedes it, given per token as
`media_index` (phi, 1-based; 0 = no image yet). Tokens before the first image
get exactly zero from cross-attention. The `all_previous_images` ablation
(Table 10 ii) lets a token see every image up to and including phi.

Ablations of the block (paper Table 3):
  (iii) `gating='none'`: the cross-attention and dense outputs are added to
      the residual stream directly, without the zero-initialised tanh gates.
  (iv) `xattn_type='vanilla_xattn'`: the cross-attention sub-layer of the
      original Transformer decoder (Vaswani et al., 2017): a residual,
      ungated cross-attention with no dense layer of its own.
  (iv) `xattn_type='grafting'`: the frozen LM runs unchanged and new layers
      are grafted on top of its last block, each a self-attention, a
      cross-attention and a dense layer (all residual, ungated), trained from
      scratch; the LM's final norm and unembedding read their output.
      This project uses as many grafted layers as the interleaved variant
      with the same `xattn_every` would insert.

Glossary of shapes:
  B: batch size.
  L: number of text tokens.
  N: number of media slots; R: visual tokens per medium; M = N * R.
  D: LM width; Dv: visual token width.
  H: number of heads; K: key size.
"""

import dataclasses
from typing import Optional

import haiku as hk
import jax
import jax.numpy as jnp

from flamingo_jax.models import decoding
from flamingo_jax.models import layers
from flamingo_jax.models import lm as lm_lib

XATTN_TYPES = ('gated_xattn_dense', 'vanilla_xattn', 'grafting')
GATINGS = ('tanh', 'none')
ATTEND_MODES = ('last_image', 'all_previous_images')


def cross_attention_mask(
    media_index: jax.Array,  # [B, L] int, 1-based slot, 0 = none
    media_mask: jax.Array,  # [B, N] bool
    num_visual_tokens: int,  # R
    attend: str = 'last_image',
) -> jax.Array:  # [B, L, N*R] bool
  """Which visual tokens each text token may attend to (computed once)."""
  if attend not in ATTEND_MODES:
    raise ValueError(f'Unknown attend mode {attend!r}; expected one of '
                     f'{ATTEND_MODES}.')
  slots = jnp.arange(1, media_mask.shape[1] + 1)  # [N]
  phi = media_index[:, :, None]  # [B, L, 1]
  if attend == 'last_image':
    visible = slots[None, None, :] == phi  # [B, L, N]
  else:
    visible = (slots[None, None, :] <= phi) & (phi >= 1)  # [B, L, N]
  visible = visible & media_mask[:, None, :]  # [B, L, N]
  return jnp.repeat(visible, num_visual_tokens, axis=-1)  # [B, L, N*R]


@dataclasses.dataclass
class GatedXAttnDense(hk.Module):
  """One cross-attention block; see the module docstring for the variants."""

  num_heads: int
  head_size: int = 128
  ffw_multiplier: int = 4
  xattn_type: str = 'gated_xattn_dense'
  gating: str = 'tanh'
  name: Optional[str] = None

  def _check_options(self):
    if self.xattn_type not in XATTN_TYPES:
      raise ValueError(f'Unknown xattn_type {self.xattn_type!r}; expected one '
                       f'of {XATTN_TYPES}.')
    if self.gating not in GATINGS:
      raise ValueError(f'Unknown gating {self.gating!r}; expected one of '
                       f'{GATINGS}.')

  @hk.transparent
  def _gate(self, name: str) -> jax.Array:
    """tanh(alpha) for the gated block, 1 for the ungated variants."""
    if self.xattn_type != 'gated_xattn_dense' or self.gating == 'none':
      return jnp.ones([])
    alpha = hk.get_parameter(name, (), init=jnp.zeros)  # []
    return jnp.tanh(alpha)

  def __call__(
      self,
      y: jax.Array,  # [B, L, D]
      visual: Optional[jax.Array],  # [B, M, Dv]; None with `cross_kv`
      mask: jax.Array,  # [B, L, M] bool
      positions: jax.Array,  # [B, L] (used by the grafting self-attention)
      view: Optional[decoding.CacheView] = None,
      *,
      cross_kv: Optional[decoding.KVCache] = None,  # [B, M, H, K] each
      cache: Optional[decoding.KVCache] = None,  # [B, S, H, K] (grafting)
  ):  # -> [B, L, D]; with a view: ([B, L, D], dict of cache updates)
    """One block.

    With a `view` (generation) it also returns what to cache: the visual
    tokens' keys/values as 'cross_kv' when it computed them (the prompt's
    chunk), and the grafting self-attention's chunk as 'cache'. Later chunks
    pass `cross_kv` instead of `visual`.
    """
    self._check_options()
    updates = {}
    if self.xattn_type == 'grafting':
      h = hk.RMSNorm(axis=-1, name='self_attention_norm')(y)  # [B, L, D]
      attention = lm_lib.RelativeSelfAttention(
          self.num_heads, self.head_size, name='self_attention')
      if view is None:
        attended = attention(h, positions)  # [B, L, D]
      else:
        attended, updates['cache'] = attention(h, positions, view, cache=cache)  # [B, L, D]
      y = y + attended  # [B, L, D]
    queries = layers.layer_norm('query_norm')(y)  # [B, L, D]
    keys = None
    if cross_kv is None:
      keys = layers.layer_norm('visual_norm')(visual)  # [B, M, Dv]
    attention = layers.MultiHeadAttention(self.num_heads, self.head_size,
                                          name='cross_attention')
    attended, key_value = attention(
        queries, keys, mask[:, None], key_value=cross_kv,
        return_key_value=True)  # [B, L, D]
    if cross_kv is None:
      updates['cross_kv'] = decoding.KVCache(*key_value)  # [B, M, H, K]
    y = y + self._gate('attn_gate').astype(y.dtype) * attended  # [B, L, D]
    if self.xattn_type != 'vanilla_xattn':
      ffw = layers.FeedForward(self.ffw_multiplier, 'squared_relu', name='ffw')
      dense = ffw(layers.layer_norm('ffw_norm')(y))  # [B, L, D]
      y = y + self._gate('ffw_gate').astype(y.dtype) * dense  # [B, L, D]
    return y if view is None else (y, updates)
