"""Layers shared by the Flamingo components: attention and feed-forward.

Glossary of shapes:
  B: batch size.
  T: number of queries (text tokens, or resampler latents).
  S: number of keys/values.
  D: model width of the queries; Dkv: width of the keys/values input.
  H: number of heads; K: head (key) size.
"""

from typing import Callable, Optional

import haiku as hk
import jax
import jax.numpy as jnp

# Mesh axes a batch is split over (training/sharding.py and the model's own
# batch constraints, `stacking.constrain_batch` and the NFNet's shard_map).
BATCH_AXES = ('data', 'fsdp')


def squared_relu(x: jax.Array) -> jax.Array:
  """Squared ReLU (So et al., 2021), the activation of Flamingo's new layers."""
  return jnp.square(jax.nn.relu(x))


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    'gelu': jax.nn.gelu,
    'squared_relu': squared_relu,
    'relu': jax.nn.relu,
}


def layer_norm(name: str) -> hk.LayerNorm:
  return hk.LayerNorm(axis=-1, create_scale=True, create_offset=True, name=name)


def check_rank(x: jax.Array, rank: int, what: str, layout: str) -> None:
  """Raises a ValueError naming the expected layout and the given shape."""
  if x.ndim != rank:
    raise ValueError(
        f'{what} must have rank {rank} ({layout}); got shape {tuple(x.shape)}.')


def dot_product_attention(
    q: jax.Array,  # [B, T, H, K]
    k: jax.Array,  # [B, S, H, K]
    v: jax.Array,  # [B, S, H, K]
    mask: Optional[jax.Array] = None,  # bool, broadcastable to [B, H, T, S]
    logit_bias: Optional[jax.Array] = None,  # broadcastable to [B, H, T, S]
) -> jax.Array:  # [B, T, H, K]
  """Softmax attention in float32.

  A query whose mask row is all False attends to nothing and gets exactly
  zero, not the uniform average a plain masked softmax would give: Flamingo's
  text tokens before the first image must receive nothing from the images.
  """
  scale = q.shape[-1] ** -0.5
  logits = jnp.einsum('bthk,bshk->bhts', q, k, preferred_element_type=jnp.float32)  # [B, H, T, S]
  logits = logits * scale
  if logit_bias is not None:
    logits = logits + logit_bias.astype(jnp.float32)
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1)  # [B, H, T, S]
  if mask is not None:
    weights = jnp.where(mask.any(axis=-1, keepdims=True), weights, 0.0)
  return jnp.einsum('bhts,bshk->bthk', weights.astype(v.dtype), v)  # [B, T, H, K]


class MultiHeadAttention(hk.Module):
  """Multi-head attention: queries from one sequence, keys/values from another.

  Parameters: `query`, `key`, `value` project to H*K features; `output` maps
  back to `output_size` (default: the query width D).
  """

  def __init__(
      self,
      num_heads: int,
      head_size: int,
      output_size: Optional[int] = None,
      with_bias: bool = False,
      name: Optional[str] = None,
  ):
    super().__init__(name=name)
    self.num_heads = num_heads
    self.head_size = head_size
    self.output_size = output_size
    self.with_bias = with_bias

  @hk.transparent
  def _project(self, x: jax.Array, name: str) -> jax.Array:
    y = hk.Linear(self.num_heads * self.head_size, with_bias=self.with_bias,
                  name=name)(x)  # [B, S, H*K]
    return y.reshape(*x.shape[:-1], self.num_heads, self.head_size)  # [B, S, H, K]

  def __call__(
      self,
      inputs_q: jax.Array,  # [B, T, D]
      inputs_kv: Optional[jax.Array],  # [B, S, Dkv]
      mask: Optional[jax.Array] = None,  # bool, broadcastable to [B, H, T, S]
      *,
      key_value: Optional[tuple[jax.Array, jax.Array]] = None,
      return_key_value: bool = False,
  ):  # -> [B, T, output_size or D], and the keys/values if asked
    """Attends from `inputs_q` to `inputs_kv`, or to given `key_value`
    ([B, S, H, K] each, as returned with `return_key_value`: for caching)."""
    check_rank(inputs_q, 3, 'attention queries', '[B, T, D]')
    q = self._project(inputs_q, 'query')  # [B, T, H, K]
    if key_value is None:
      check_rank(inputs_kv, 3, 'attention keys/values', '[B, S, Dkv]')
      key_value = (self._project(inputs_kv, 'key'),
                   self._project(inputs_kv, 'value'))  # [B, S, H, K]
    attended = dot_product_attention(q, *key_value, mask)  # [B, T, H, K]
    attended = attended.reshape(*attended.shape[:-2], -1)  # [B, T, H*K]
    output_size = self.output_size or inputs_q.shape[-1]
    out = hk.Linear(output_size, with_bias=self.with_bias,
                    name='output')(attended)  # [B, T, D]
    return (out, key_value) if return_key_value else out


class FeedForward(hk.Module):
  """Two-layer MLP, `hidden` (width x multiplier) then `output` (width)."""

  def __init__(
      self,
      multiplier: int = 4,
      activation: str = 'squared_relu',
      with_bias: bool = False,
      name: Optional[str] = None,
  ):
    super().__init__(name=name)
    if activation not in ACTIVATIONS:
      raise ValueError(
          f'Unknown activation {activation!r}; expected one of '
          f'{sorted(ACTIVATIONS)}.')
    self.multiplier = multiplier
    self.activation = ACTIVATIONS[activation]
    self.with_bias = with_bias

  def __call__(self, x: jax.Array) -> jax.Array:  # [..., D] -> [..., D]
    width = x.shape[-1]
    h = hk.Linear(self.multiplier * width, with_bias=self.with_bias,
                  name='hidden')(x)  # [..., D*multiplier]
    h = self.activation(h)  # [..., D*multiplier]
    return hk.Linear(width, with_bias=self.with_bias, name='output')(h)  # [..., D]
