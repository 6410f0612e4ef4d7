"""Causal self-attention of the published LM families (rotary, ALiBi, none).

The attention of every layout but Chinchilla's (whose Transformer-XL
relative attention is `lm.RelativeSelfAttention`): queries, keys and values
projected per head (`query`, `key`, `value`, optional biases), positions
applied as the layout says (`models/positions.py`: rotary to queries and
keys, ALiBi as a logit bias; learned absolute positions are added to the
embeddings, so here they are 'none'), grouped-query attention when
`num_kv_heads < num_heads` (each group of num_heads / num_kv_heads query
heads reads one key/value head; `jax.nn.dot_product_attention` takes the
grouped keys as they are), and the `output` projection.

With `qk_norm` (MosaicGPT's `attn_qk_ln`, MPT's `attn_config.qk_ln`), the
projected queries and keys are normalised (the layout's norm, parameters
`q_norm`, `k_norm`) over all their heads' features at once, before the
head split and before any rotation.

With a cache (generation, `models/decoding.py`), keys are cached after
their rotation, so each is rotated once; the cache holds num_kv_heads
heads.

Glossary of shapes:
  B: batch size.
  L: number of query tokens; S: number of key tokens (S = L without a cache).
  D: model width.
  H: number of query heads; G: number of key/value heads; K: head size.
"""

from collections.abc import Callable
import dataclasses
from typing import Optional

import haiku as hk
import jax

from flamingo_jax.models import decoding
from flamingo_jax.models import layers
from flamingo_jax.models import positions as positions_lib


@dataclasses.dataclass
class SelfAttention(hk.Module):
  """Causal multi-head (or grouped-query) self-attention; see the docstring.

  `positions`: 'rotary', 'alibi' or 'none'. `contiguous`: positions are
  0..L-1 in every row and there is no cache (the training forward pass), so
  the causal mask needs no array. `qk_norm` (optional): name -> the norm
  applied to the queries' and keys' H*K (G*K) features (see the module
  docstring).
  """

  num_heads: int
  head_size: int
  num_kv_heads: Optional[int] = None
  positions: str = 'rotary'
  rotary_fraction: float = 1.0
  rotary_base: float = 10000.0
  alibi_bias_max: float = 8.0
  with_bias: bool = False
  contiguous: bool = False
  qk_norm: Optional[Callable[[str], hk.Module]] = None
  name: Optional[str] = None

  @hk.transparent
  def _project(self, x: jax.Array, heads: int, name: str,
               norm: Optional[str] = None) -> jax.Array:
    y = hk.Linear(heads * self.head_size, with_bias=self.with_bias,
                  name=name)(x)  # [B, L, heads*K]
    if norm is not None and self.qk_norm is not None:
      y = self.qk_norm(norm)(y)  # [B, L, heads*K]
    return y.reshape(*x.shape[:-1], heads, self.head_size)  # [B, L, heads, K]

  def __call__(
      self,
      x: jax.Array,  # [B, L, D]
      positions: jax.Array,  # [B, L] int
      view: Optional[decoding.CacheView] = None,
      *,
      cache: Optional[decoding.KVCache] = None,  # [B, S, G, K] each
  ):  # -> [B, L, D], or ([B, L, D], this chunk's KVCache) with a cache
    if self.positions not in ('rotary', 'alibi', 'none'):
      raise ValueError(f'SelfAttention positions must be rotary, alibi or '
                       f'none; got {self.positions!r}.')
    kv_heads = self.num_kv_heads or self.num_heads
    q = self._project(x, self.num_heads, 'query', 'q_norm')  # [B, L, H, K]
    k = self._project(x, kv_heads, 'key', 'k_norm')  # [B, L, G, K]
    v = self._project(x, kv_heads, 'value')  # [B, L, G, K]
    if self.positions == 'rotary':
      dims = positions_lib.rotary_dims(self.head_size, self.rotary_fraction)
      q = positions_lib.apply_rotary(q, positions, dims, self.rotary_base)  # [B, L, H, K]
      k = positions_lib.apply_rotary(k, positions, dims, self.rotary_base)  # [B, L, G, K]
    key_positions, key_mask, chunk = positions, None, None
    if cache is not None:
      chunk = decoding.KVCache(k, v)
      k = decoding.write(cache.key, k, view.index, axis=1)  # [B, S, G, K]
      v = decoding.write(cache.value, v, view.index, axis=1)  # [B, S, G, K]
      key_positions, key_mask = view.key_positions, view.key_mask

    fast = self.contiguous and cache is None
    mask = None
    if not fast:
      mask = positions[:, :, None] >= key_positions[:, None, :]  # [B, L, S]
      if key_mask is not None:
        mask = mask & key_mask[:, None, :]  # [B, L, S]
      mask = mask[:, None]  # [B, 1, L, S]
    bias = None
    if self.positions == 'alibi':
      slopes = positions_lib.alibi_slopes(self.num_heads, self.alibi_bias_max)
      bias = positions_lib.alibi_bias(slopes, positions, key_positions)  # [B, H, L, S]
    attended = layers.dot_product_attention(
        q, k, v, mask, logit_bias=bias, is_causal=fast)  # [B, L, H, K]
    attended = attended.reshape(*attended.shape[:-2], -1)  # [B, L, H*K]
    out = hk.Linear(x.shape[-1], with_bias=self.with_bias,
                    name='output')(attended)  # [B, L, D]
    return out if cache is None else (out, chunk)
