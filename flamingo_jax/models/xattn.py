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
      original Transformer decoder (Vaswani et al., 2017): a residual
      cross-attention with no dense layer of its own, run *inside* each LM
      block it is given, between the block's self-attention and its
      feed-forward layer (arXiv v1 §4.4.2), where the decoder of Vaswani et
      al. has it. Its tanh gate is kept (`gating='tanh'`, as the paper does
      for a fair comparison); `gating='none'` drops it as for the others.
  (iv) `xattn_type='grafting'`: the frozen LM runs unchanged and new layers
      are grafted on top of its last block, each a self-attention, a
      cross-attention and a dense layer (all residual, ungated), trained from
      scratch; the LM's final norm and unembedding read their output.
      This project uses as many grafted layers as the interleaved variant
      with the same `xattn_every` would insert: 24 at 3B, 69.2M parameters
      each (self-attention with the LM's relative positions 21.0M,
      cross-attention 14.7M, 4x dense 33.6M), 3.73B in total. The paper
      prints 3.3B for this row and states no layout; 3.3B needs a grafted
      stack of about 1.23B, which 18 of our layers (3.32B) or 24 with a 2x
      dense layer (3.33B) would give, and nothing in the paper picks either,
      so we keep the layer it describes at the default's count and report
      the difference (`summarize --config experiments/flamingo.py:3B,
      grafting`; `--config.model.xattn.every` changes the count).

IDEFICS's layer (Laurençon et al., 2023, `IdeficsGatedCrossAttentionLayer`;
`variants.VARIANTS['idefics']`), the same block with, as fields:
  norm='rms_norm'        RMSNorm (eps `norm_eps`) as `query_norm` and
                         `ffw_norm`, where the paper has LayerNorm; no norm
                         on the visual tokens (`visual_norm=False`);
  ffw_activation='swiglu'  a SwiGLU dense layer (`ffw/gate`, `ffw/hidden`,
                         `ffw/output`) of `ffw_hidden` features (the LM's
                         intermediate size) instead of 4x Squared ReLU;
  alpha_type='vector'    a tanh gate per feature, alpha [D], where the
                         paper's is one scalar ('float', the default);
  qk_norm='rms_norm'     IDEFICS's `qk_layer_norms`: an RMSNorm over each
                         head's projected queries and keys.
Its heads are the LM's (H * K = D); its keys/values read the resampler's
output directly. IDEFICS inserts a layer before every `cross_layer_interval`
-th LM block from the first, the paper's placement ('interleaved').

Two forms of the same cross-attention (`attention_plan` picks one, once per
forward pass, from phi and the shapes):
  dense: every token scores all M = N * R visual tokens and a mask keeps its
      image's (or, for `all_previous_images`, its images'). Its cost grows
      with the number of images N.
  per image (`attend='last_image'`, when cheaper): the tokens are sorted by
      the image they see and packed into groups of C slots, each group
      holding tokens of one image (`ImageRouting`); a group attends to that
      image's R tokens only. The packing is exact for every phi (no order is
      assumed; phi from `media_index` is non-decreasing apart from its 0s),
      and it takes at most L // C + N groups, so the scores cost
      (L + N * C) * R per head instead of L * N * R.

Glossary of shapes:
  B: batch size.
  L: number of text tokens.
  N: number of media slots; R: visual tokens per medium; M = N * R.
  D: LM width; Dv: visual token width.
  H: number of heads; K: key size.
  C: slots per group (GROUP_SIZE); G: number of groups; P = G * C slots.
"""

import dataclasses
from typing import NamedTuple, Optional, Union

import haiku as hk
import jax
import jax.numpy as jnp

from flamingo_jax.models import decoding
from flamingo_jax.models import layers
from flamingo_jax.models import lm as lm_lib
from flamingo_jax.models import lm_layout

XATTN_TYPES = ('gated_xattn_dense', 'vanilla_xattn', 'grafting')
GATINGS = ('tanh', 'none')
ATTEND_MODES = ('last_image', 'all_previous_images')
NORMS = ('layer_norm', 'rms_norm')
ALPHA_TYPES = ('float', 'vector')


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


# Slots per group of the per-image form: groups pad each image's tokens to
# a multiple of C, so a smaller C wastes fewer slots, a larger one gathers
# fewer copies of the images' keys/values (`python -m flamingo_jax.bench_xattn`).
GROUP_SIZE = 32


class ImageRouting(NamedTuple):
  """Tokens packed by image for the per-image cross-attention."""
  slot: jax.Array  # [B, L] int32: the token's slot in [0, P).
  source: jax.Array  # [B, P] int32: each slot's token; L for an empty slot.
  image: jax.Array  # [B, G, N] bool: one-hot, the image of each group.
  attends: jax.Array  # [B, L] bool: the token sees an image.


# What an xattn layer receives: a mask [B, L, M] bool (dense form) or the
# packing of the per-image form.
Routing = Union[jax.Array, ImageRouting]


def route_by_image(
    media_index: jax.Array,  # [B, L] int, 1-based slot, 0 = none
    media_mask: jax.Array,  # [B, N] bool
    group_size: int = GROUP_SIZE,  # C
) -> ImageRouting:
  """Packs each row's tokens into groups of `group_size`, one image each.

  A token sees image phi - 1 when phi >= 1 and that slot holds a medium; the
  others (`attends` False) get no slot and zero from cross-attention.
  """
  length = media_index.shape[1]
  num_media = media_mask.shape[1]
  num_groups = length // group_size + min(num_media, length)  # G
  image = jnp.clip(media_index - 1, 0, num_media - 1)  # [B, L]
  attends = (media_index >= 1) & jnp.take_along_axis(
      media_mask.astype(bool), image, axis=1)  # [B, L]
  # Tokens that see no image form group N, which gets no slot.
  group = jnp.where(attends, image, num_media)  # [B, L]
  one_hot = group[:, :, None] == jnp.arange(num_media + 1)  # [B, L, N+1]
  running = jnp.cumsum(one_hot, axis=1, dtype=jnp.int32)  # [B, L, N+1]
  rank = jnp.take_along_axis(running, group[:, :, None], axis=2)[..., 0] - 1  # [B, L]
  counts = running[:, -1, :num_media]  # [B, N]
  groups = -(-counts // group_size)  # [B, N]: ceil
  group_end = jnp.cumsum(groups, axis=1)  # [B, N]
  first_group = group_end - groups  # [B, N]
  start = jnp.take_along_axis(first_group, image, axis=1)  # [B, L]
  num_slots = num_groups * group_size  # P
  slot = jnp.where(attends, start * group_size + rank, num_slots)  # [B, L]
  # Per row (vmap), so that a batch split over devices stays split.
  source = jax.vmap(lambda slot: jnp.full([num_slots], length, jnp.int32).at[
      slot].set(jnp.arange(length, dtype=jnp.int32), mode='drop'))(slot)  # [B, P]
  # Group g attends to the image whose groups end first after g; trailing
  # groups (all slots empty) to the last image.
  image_of_group = (jnp.arange(num_groups)[None, :, None]
                    >= group_end[:, None, :]).sum(-1)  # [B, G]
  image_of_group = jnp.minimum(image_of_group, num_media - 1)  # [B, G]
  return ImageRouting(
      slot=jnp.minimum(slot, num_slots - 1).astype(jnp.int32),
      source=source,
      image=image_of_group[:, :, None] == jnp.arange(num_media),
      attends=attends)


def attend_per_image(
    q: jax.Array,  # [B, L, H, K]
    k: jax.Array,  # [B, M, H, K]
    v: jax.Array,  # [B, M, H, K]
    routing: ImageRouting,
) -> jax.Array:  # [B, L, H, K]
  """Each token's attention over its own image's R visual tokens only.

  Plain einsums, the softmax in float32: per group the scores are only
  [H, C, R], so a fused kernel would save little, and the keys/values are
  selected per group already in the layout the scores read.
  """
  batch, _, heads, key_size = q.shape
  _, num_groups, num_media = routing.image.shape  # G, N
  group_size = routing.source.shape[1] // num_groups  # C
  padded = jnp.concatenate([q, jnp.zeros_like(q[:, :1])], axis=1)  # [B, L+1, H, K]
  grouped_q = jnp.take_along_axis(
      padded, routing.source[:, :, None, None], axis=1)  # [B, P, H, K]
  grouped_q = grouped_q.reshape(batch, num_groups, group_size, heads,
                                key_size)  # [B, G, C, H, K]
  image = jnp.argmax(routing.image, axis=-1)  # [B, G]

  def per_group(x):  # [B, M, H, K] -> [B, G, H, R, K]
    per_image = x.reshape(batch, num_media, -1, heads, key_size)  # [B, N, R, H, K]
    # Transposed before the copies, so that it is done once per image.
    per_image = jnp.swapaxes(per_image, 2, 3)  # [B, N, H, R, K]
    return jnp.take_along_axis(
        per_image, image[:, :, None, None, None], axis=1)  # [B, G, H, R, K]

  logits = jnp.einsum('bgchk,bghrk->bghcr', grouped_q, per_group(k),
                      preferred_element_type=jnp.float32)  # [B, G, H, C, R]
  weights = jax.nn.softmax(logits * key_size**-0.5, axis=-1)  # [B, G, H, C, R]
  out = jnp.einsum('bghcr,bghrk->bgchk', weights.astype(v.dtype),
                   per_group(v))  # [B, G, C, H, K]
  out = out.reshape(batch, num_groups * group_size, heads, key_size)  # [B, P, H, K]
  out = jnp.take_along_axis(out, routing.slot[:, :, None, None], axis=1)  # [B, L, H, K]
  return jnp.where(routing.attends[:, :, None, None], out,
                   jnp.zeros([], out.dtype))  # [B, L, H, K]


def attention_plan(
    media_index: jax.Array,  # [B, L] int, 1-based slot, 0 = none
    media_mask: jax.Array,  # [B, N] bool
    num_visual_tokens: int,  # R
    attend: str = 'last_image',
    group_size: Optional[int] = None,  # C; None: GROUP_SIZE
) -> Routing:
  """The cross-attention's routing, computed once for every xattn layer.

  The per-image form for 'last_image' when it scores fewer (query, key)
  pairs than the dense form (several images and more than a few tokens:
  not one-token decoding steps), else the dense form's mask.
  """
  group_size = group_size or GROUP_SIZE
  length = media_index.shape[1]
  num_media = media_mask.shape[1]
  num_groups = length // group_size + min(num_media, length)
  if attend == 'last_image' and num_groups * group_size < length * num_media:
    return route_by_image(media_index, media_mask, group_size)
  return cross_attention_mask(media_index, media_mask, num_visual_tokens,
                              attend)  # [B, L, N*R]


@dataclasses.dataclass
class GatedXAttnDense(hk.Module):
  """One cross-attention block; see the module docstring for the variants."""

  num_heads: int
  head_size: int = 128
  ffw_multiplier: int = 4
  xattn_type: str = 'gated_xattn_dense'
  gating: str = 'tanh'
  # OpenFlamingo's variant (see `variants.VARIANTS`): GELU feed-forward and
  # no LayerNorm on the visual tokens (its resampler's output is normed).
  ffw_activation: str = 'squared_relu'
  visual_norm: bool = True
  # IDEFICS's variant (module docstring): 'rms_norm' pre-norms, a 'swiglu'
  # dense layer of `ffw_hidden` features (None: ffw_multiplier * D), tanh
  # gates per feature ('vector'), q/k norms.
  norm: str = 'layer_norm'
  norm_eps: float = 1e-5
  ffw_hidden: Optional[int] = None
  alpha_type: str = 'float'
  qk_norm: Optional[str] = None
  name: Optional[str] = None

  def _check_options(self):
    if self.xattn_type not in XATTN_TYPES:
      raise ValueError(f'Unknown xattn_type {self.xattn_type!r}; expected one '
                       f'of {XATTN_TYPES}.')
    if self.gating not in GATINGS:
      raise ValueError(f'Unknown gating {self.gating!r}; expected one of '
                       f'{GATINGS}.')
    for field, value, allowed in (('norm', self.norm, NORMS),
                                  ('alpha_type', self.alpha_type,
                                   ALPHA_TYPES)):
      if value not in allowed:
        raise ValueError(f'Unknown {field} {value!r}; expected one of '
                         f'{allowed}.')

  @hk.transparent
  def _gate(self, name: str, width: int) -> jax.Array:  # [] or [D]
    """tanh(alpha), or 1 without gating (`gating='none'`, and grafting)."""
    if self.xattn_type == 'grafting' or self.gating == 'none':
      return jnp.ones([])
    shape = (width,) if self.alpha_type == 'vector' else ()
    alpha = hk.get_parameter(name, shape, init=jnp.zeros)  # [] or [D]
    return jnp.tanh(alpha)

  @hk.transparent
  def _norm(self, name: str) -> hk.Module:
    if self.norm == 'rms_norm':
      return hk.RMSNorm(axis=-1, eps=self.norm_eps, name=name)
    return layers.layer_norm(name)

  @hk.transparent
  def _ffw(self) -> hk.Module:
    if self.ffw_activation == 'swiglu':
      return lm_layout.FamilyFeedForward(
          self.ffw_hidden, self.ffw_multiplier, 'silu', gated=True,
          with_bias=False, name='ffw')
    if self.ffw_hidden is not None:
      return lm_layout.FamilyFeedForward(
          self.ffw_hidden, self.ffw_multiplier, self.ffw_activation,
          gated=False, with_bias=False, name='ffw')
    return layers.FeedForward(self.ffw_multiplier, self.ffw_activation,
                              name='ffw')

  def __call__(
      self,
      y: jax.Array,  # [B, L, D]
      visual: Optional[jax.Array],  # [B, M, Dv]; None with `cross_kv`
      routing: Routing,  # `attention_plan`'s: a [B, L, M] mask or packing
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
    width = y.shape[-1]
    queries = self._norm('query_norm')(y)  # [B, L, D]
    keys = None
    if cross_kv is None:
      keys = visual  # [B, M, Dv]
      if self.visual_norm:
        keys = layers.layer_norm('visual_norm')(visual)  # [B, M, Dv]
    attention = layers.MultiHeadAttention(
        self.num_heads, self.head_size, qk_norm=self.qk_norm,
        qk_norm_eps=self.norm_eps, name='cross_attention')
    if isinstance(routing, ImageRouting):
      mask, attend = None, lambda q, k, v: attend_per_image(q, k, v, routing)
    else:
      mask, attend = routing[:, None], None  # [B, 1, L, M]
    attended, key_value = attention(
        queries, keys, mask, key_value=cross_kv, return_key_value=True,
        attend=attend)  # [B, L, D]
    if cross_kv is None:
      updates['cross_kv'] = decoding.KVCache(*key_value)  # [B, M, H, K]
    gate = self._gate('attn_gate', width).astype(y.dtype)  # [] or [D]
    y = y + gate * attended  # [B, L, D]
    if self.xattn_type != 'vanilla_xattn':
      dense = self._ffw()(self._norm('ffw_norm')(y))  # [B, L, D]
      gate = self._gate('ffw_gate', width).astype(y.dtype)  # [] or [D]
      y = y + gate * dense  # [B, L, D]
    return y if view is None else (y, updates)
