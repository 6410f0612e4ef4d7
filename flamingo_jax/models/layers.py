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
import numpy as np

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
    # The published LM families' (models/lm_layout.py); 'gelu' above is the
    # tanh approximation (GPT-2's gelu_new), this one the exact erf form.
    'gelu_exact': lambda x: jax.nn.gelu(x, approximate=False),
    'silu': jax.nn.silu,
}


def layer_norm(name: str) -> hk.LayerNorm:
  return hk.LayerNorm(axis=-1, create_scale=True, create_offset=True, name=name)


def check_rank(x: jax.Array, rank: int, what: str, layout: str) -> None:
  """Raises a ValueError naming the expected layout and the given shape."""
  if x.ndim != rank:
    raise ValueError(
        f'{what} must have rank {rank} ({layout}); got shape {tuple(x.shape)}.')


# (q [B, T, H, K], k [B, S, H, K], v [B, S, H, K]) -> [B, T, H, K]
AttendFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]

# Implementations of `jax.nn.dot_product_attention` tried in order: cuDNN's
# fused flash attention where it applies (a GPU, bf16/fp16 inputs, shapes it
# supports: it never materialises the [B, H, T, S] scores), else XLA's.
_FUSED_DTYPES = (jnp.bfloat16, jnp.float16)


def attention_implementations(q: jax.Array) -> tuple[str, ...]:
  """The `implementation`s of `jax.nn.dot_product_attention` to try for `q`."""
  if jax.default_backend() == 'gpu' and q.dtype in _FUSED_DTYPES:
    return ('cudnn', 'xla')
  return ('xla',)


def dot_product_attention(
    q: jax.Array,  # [B, T, H, K]
    k: jax.Array,  # [B, S, H, K]
    v: jax.Array,  # [B, S, H, K]
    mask: Optional[jax.Array] = None,  # bool, broadcastable to [B, H, T, S]
    logit_bias: Optional[jax.Array] = None,  # broadcastable to [B, H, T, S]
    *,
    is_causal: bool = False,
) -> jax.Array:  # [B, T, H, K]
  """Softmax attention, the softmax in float32.

  Through `jax.nn.dot_product_attention`: cuDNN's flash attention on GPUs
  (bf16), XLA's elsewhere. `logit_bias` is added to the scaled logits;
  `is_causal` masks keys after the query (T == S), which the fused kernel
  does without a mask array.

  A query whose mask row is all False attends to nothing and gets exactly
  zero, not the uniform average a plain masked softmax would give: Flamingo's
  text tokens before the first image must receive nothing from the images.
  """
  if mask is not None:
    mask = jnp.broadcast_to(mask, mask.shape[:-1] + (k.shape[1],))  # [B, *, T, S]
  if logit_bias is not None:
    logit_bias = logit_bias.astype(q.dtype)  # [B, *, T, S]
  error = None
  for implementation in attention_implementations(q):
    try:
      out = jax.nn.dot_product_attention(
          q, k, v, bias=logit_bias, mask=mask, is_causal=is_causal,
          implementation=implementation)  # [B, T, H, K]
      break
    except (NotImplementedError, RuntimeError, ValueError) as e:
      # cuDNN refuses some shapes and versions at trace time; XLA takes all.
      error = e
  else:
    raise error
  if mask is not None:
    attends = mask.any(axis=-1)  # [B, 1 or H, T]
    attends = jnp.swapaxes(attends, 1, 2)[..., None]  # [B, T, 1 or H, 1]
    out = jnp.where(attends, out, jnp.zeros([], out.dtype))  # [B, T, H, K]
  return out


@jax.custom_vjp
def _dense(x: jax.Array, w: jax.Array) -> jax.Array:  # [..., Din] -> [..., Dout]
  return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))


def _dense_fwd(x, w):
  return _dense(x, w), (x, w)


def _dense_bwd(residuals, g):
  x, w = residuals
  dx = jax.lax.dot_general(g, w, (((g.ndim - 1,), (1,)), ((), ())))  # [..., Din]
  rows = tuple(range(x.ndim - 1))
  dw = jax.lax.dot_general(x, g, ((rows, rows), ((), ())))  # [Din, Dout]
  return dx.astype(x.dtype), dw.astype(w.dtype)


_dense.defvjp(_dense_fwd, _dense_bwd)


class Dense(hk.Linear):
  """`hk.Linear` (same parameters) whose weight gradient is x^T g as such.

  Autodiff computes a weight gradient as (g^T x)^T; XLA's CPU backend then
  transposes g in memory, fusing into that copy the whole chain that
  produces g (in a residual stack, the sum of every later layer's
  contribution): the resampler's backward pass ran at 2/3 of its matmuls'
  speed. Here the transposed operand is the layer's input. A custom VJP
  hides the matmuls from `jax.checkpoint` policies, so remat'd stacks keep
  `hk.Linear`.
  """

  def __call__(self, inputs: jax.Array, *,
               precision: Optional[jax.lax.Precision] = None) -> jax.Array:
    if precision is not None:
      raise ValueError('Dense computes at the default precision.')
    input_size = self.input_size = inputs.shape[-1]
    w_init = self.w_init or hk.initializers.TruncatedNormal(
        1.0 / np.sqrt(input_size))
    w = hk.get_parameter('w', [input_size, self.output_size], inputs.dtype,
                         init=w_init)  # [Din, Dout]
    dtype = jnp.promote_types(inputs.dtype, w.dtype)
    out = _dense(inputs.astype(dtype), w.astype(dtype))  # [..., Dout]
    if self.with_bias:
      b = hk.get_parameter('b', [self.output_size], inputs.dtype,
                           init=self.b_init)  # [Dout]
      out = out + jnp.broadcast_to(b, out.shape)  # [..., Dout]
    return out


# Per-head normalisations of the projected queries and keys (`qk_norm`):
# IDEFICS's optional q/k norms (Dehghani et al., 2023), an RMSNorm in its
# gated cross-attention, a LayerNorm in its resampler. Not in Flamingo.
QK_NORMS = ('layer_norm', 'rms_norm')


class MultiHeadAttention(hk.Module):
  """Multi-head attention: queries from one sequence, keys/values from another.

  Parameters: `query`, `key`, `value` project to H*K features; `output` maps
  back to `output_size` (default: the query width D). With `qk_norm`, the
  projected queries and keys are normalised over each head's K features
  (`query_norm`, `key_norm`, scale [K] (and offset [K] for 'layer_norm'))
  before the scores; cached keys are the normalised ones.
  """

  def __init__(
      self,
      num_heads: int,
      head_size: int,
      output_size: Optional[int] = None,
      with_bias: bool = False,
      linear: type[hk.Linear] = hk.Linear,
      qk_norm: Optional[str] = None,  # None or one of QK_NORMS.
      qk_norm_eps: float = 1e-5,
      name: Optional[str] = None,
  ):
    super().__init__(name=name)
    if qk_norm is not None and qk_norm not in QK_NORMS:
      raise ValueError(f'Unknown qk_norm {qk_norm!r}; expected None or one '
                       f'of {QK_NORMS}.')
    self.num_heads = num_heads
    self.head_size = head_size
    self.output_size = output_size
    self.with_bias = with_bias
    self.linear = linear  # hk.Linear or Dense: the same parameters.
    self.qk_norm = qk_norm
    self.qk_norm_eps = qk_norm_eps

  @hk.transparent
  def _head_norm(self, x: jax.Array, name: str) -> jax.Array:  # [B, S, H, K]
    """`qk_norm` over each head's features, or `x` as it is."""
    if self.qk_norm is None:
      return x  # [B, S, H, K]
    if self.qk_norm == 'rms_norm':
      return hk.RMSNorm(axis=-1, eps=self.qk_norm_eps, name=name)(x)  # [B, S, H, K]
    return hk.LayerNorm(axis=-1, create_scale=True, create_offset=True,
                        eps=self.qk_norm_eps, name=name)(x)  # [B, S, H, K]

  @hk.transparent
  def _project(self, x: jax.Array, name: str) -> jax.Array:
    y = self.linear(self.num_heads * self.head_size,
                    with_bias=self.with_bias, name=name)(x)  # [B, S, H*K]
    return y.reshape(*x.shape[:-1], self.num_heads, self.head_size)  # [B, S, H, K]

  def __call__(
      self,
      inputs_q: jax.Array,  # [B, T, D]
      inputs_kv: Optional[jax.Array],  # [B, S, Dkv]
      mask: Optional[jax.Array] = None,  # bool, broadcastable to [B, H, T, S]
      *,
      key_value: Optional[tuple[jax.Array, jax.Array]] = None,
      return_key_value: bool = False,
      attend: Optional[AttendFn] = None,
  ):  # -> [B, T, output_size or D], and the keys/values if asked
    """Attends from `inputs_q` to `inputs_kv`, or to given `key_value`
    ([B, S, H, K] each, as returned with `return_key_value`: for caching).

    `attend(q, k, v) -> [B, T, H, K]` replaces the masked softmax attention
    (e.g. the cross-attention's per-image form); `mask` is then unused.
    """
    check_rank(inputs_q, 3, 'attention queries', '[B, T, D]')
    q = self._project(inputs_q, 'query')  # [B, T, H, K]
    q = self._head_norm(q, 'query_norm')  # [B, T, H, K]
    if key_value is None:
      check_rank(inputs_kv, 3, 'attention keys/values', '[B, S, Dkv]')
      k = self._project(inputs_kv, 'key')  # [B, S, H, K]
      key_value = (self._head_norm(k, 'key_norm'),
                   self._project(inputs_kv, 'value'))  # [B, S, H, K]
    if attend is None:
      attended = dot_product_attention(q, *key_value, mask)  # [B, T, H, K]
    else:
      attended = attend(q, *key_value)  # [B, T, H, K]
    attended = attended.reshape(*attended.shape[:-2], -1)  # [B, T, H*K]
    output_size = self.output_size or inputs_q.shape[-1]
    out = self.linear(output_size, with_bias=self.with_bias,
                      name='output')(attended)  # [B, T, D]
    return (out, key_value) if return_key_value else out


class FeedForward(hk.Module):
  """Two-layer MLP, `hidden` (width x multiplier) then `output` (width)."""

  def __init__(
      self,
      multiplier: int = 4,
      activation: str = 'squared_relu',
      with_bias: bool = False,
      linear: type[hk.Linear] = hk.Linear,
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
    self.linear = linear  # hk.Linear or Dense: the same parameters.

  def __call__(self, x: jax.Array) -> jax.Array:  # [..., D] -> [..., D]
    width = x.shape[-1]
    h = self.linear(self.multiplier * width, with_bias=self.with_bias,
                    name='hidden')(x)  # [..., D*multiplier]
    h = self.activation(h)  # [..., D*multiplier]
    return self.linear(width, with_bias=self.with_bias,
                       name='output')(h)  # [..., D]
