"""The frozen decoder-only language model (Chinchilla-shaped).

Flamingo conditions a pretrained, frozen Chinchilla LM (Hoffmann et al.,
2022), which is a Gopher-style (Rae et al., 2021) pre-norm Transformer:
RMSNorm, Transformer-XL relative position encodings (Dai et al., 2019) --
which carry their own parameters -- GELU feed-forward layers of 4x width,
untied input and output embeddings, and a 32k SentencePiece vocabulary.
Flamingo adds one token, `<EOC>` (end of chunk), whose input and output
embeddings are separate, trainable parameters (`lm/eoc_*`) while the rest of the
LM stays frozen; its id is `vocab_size`, so logits have `vocab_size + 1`
entries.

Sizes (paper Table 4; key size 128 throughout, which makes H*K = D):

  | size | layers | width | heads | parameters (this layout) | Table 5 |
  |------|--------|-------|-------|--------------------------|---------|
  | 3B   | 24     | 2048  | 16    | 1.44B                    | 1.4B    |
  | 9B   | 40     | 4096  | 32    | 8.99B                    | 7.1B    |
  | 80B  | 80     | 8192  | 64    | 70.3B                    | 70B     |

Each block has 13 D^2 weights: 4 D^2 for attention, 8 D^2 for the
feed-forward layer and D^2 for the relative-position key projection; the
embeddings add 2 x 32k x D. This reproduces the 3B and 80B LMs; the paper's
9B LM (7.1B) cannot come out of Table 4's 40 layers of width 4096 with a 4x
feed-forward layer (that alone is ~8B), so we keep Table 4's shape and report
the count that results. Numbers from `python -m flamingo_jax.summarize`.

The same decoder takes the layouts of the published LMs that Flamingo-style
checkpoints use (LLaMA, GPT-NeoX, MPT, GPT-2: rotary, ALiBi or learned
positions, LayerNorm, SwiGLU, biases, parallel residual, tied embeddings,
grouped-query attention, query/key norms) as fields of `DecoderLM`, i.e. of
`config.model.lm`: see `models/lm_layout.py` (their attention is
`models/self_attention.py`, their positions `models/positions.py`). Every
layout keeps the module tree, the scanned stack and the cached decoding.

Glossary of shapes:
  B: batch size.
  L: number of query tokens; S: number of key tokens (S = L without a cache).
  D: model width.
  H: number of heads; K: key size.
  O: number of relative offsets (max key position + 1).
  V: vocabulary size including `<EOC>` (vocab_size + 1).
  N: number of layers.
"""

from collections.abc import Callable
import dataclasses
import functools
from typing import Optional

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from flamingo_jax.models import decoding
from flamingo_jax.models import layers
from flamingo_jax.models import lm_layout
from flamingo_jax.models import self_attention
from flamingo_jax.models import stacking

# (x [B, L, D], blocks, block params [N, ...], positions [B, L]) -> x [B, L, D]
TrunkFn = Callable[[jax.Array, stacking.Stack, stacking.Params, jax.Array],
                   jax.Array]

# Table 4 of the paper, with the key size of 128 that Chinchilla uses.
LM_PARAMS = {
    '3B': dict(num_layers=24, width=2048, num_heads=16),
    '9B': dict(num_layers=40, width=4096, num_heads=32),
    '80B': dict(num_layers=80, width=8192, num_heads=64),
    'tiny': dict(num_layers=4, width=64, num_heads=4, head_size=16,
                 vocab_size=512),
}


def sinusoid_encoding(offsets: jax.Array, width: int) -> jax.Array:
  """Transformer sinusoids of integer offsets: [O] -> [O, width]."""
  inv_freq = 1.0 / (10000 ** (np.arange(0, width, 2) / width))  # [width/2]
  angles = offsets.astype(jnp.float32)[:, None] * inv_freq[None, :]  # [O, width/2]
  return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)  # [O, width]


def relative_shift(x: jax.Array) -> jax.Array:  # [..., L, O=L] -> [..., L, S=L]
  """out[..., t, s] = x[..., t, L-1-(t-s)] for s <= t (the rest is junk).

  `x` holds, for each query t, a term per offset in the order L-1..0; this
  moves each row left by L-1-t, so that key s lands on offset t - s. A pad
  and two reshapes (Dai et al., 2019, App. B), no gather.
  """
  *lead, length, num_offsets = x.shape
  x = jnp.pad(x, [(0, 0)] * len(lead) + [(0, 0), (1, 0)])  # [..., L, O+1]
  x = x.reshape(*lead, num_offsets + 1, length)  # [..., O+1, L]
  return x[..., 1:, :].reshape(*lead, length, num_offsets)  # [..., L, S]


@dataclasses.dataclass
class RelativeSelfAttention(hk.Module):
  """Causal multi-head self-attention with Transformer-XL relative positions.

  logits[t, s] = (q_t + u) . k_s + (q_t + v) . W_r sinusoid(pos_t - pos_s),
  with learned biases u (`content_bias`) and v (`position_bias`), [H, K].

  The position term is computed for every (query, offset) pair, [B, H, L, O],
  then each key picks its offset: with `contiguous` positions (0..L-1 in
  every row, and no cache: the training forward pass) by Transformer-XL's
  shift of that array, else (left-padded prompts, caches) by a gather, whose
  gradient (a scatter) is several times slower on CPUs.

  The content term and the softmax run in `jax.nn.dot_product_attention`
  with the position term as its `bias` [B, H, L, S] (in the compute dtype):
  cuDNN's fused attention takes a bias and returns its gradient, so on GPUs
  the [B, H, L, S] float32 logits and probabilities are never materialised,
  only the bias. The position term cannot be folded into the keys instead
  (as rotary embeddings are): sinusoid(t - s) factorises over t and s only
  through a D-wide product per head, 16x the key size at 3B.
  """

  num_heads: int
  head_size: int
  contiguous: bool = False
  name: Optional[str] = None

  @hk.transparent
  def _project(self, x: jax.Array, name: str) -> jax.Array:
    y = hk.Linear(self.num_heads * self.head_size, with_bias=False,
                  name=name)(x)  # [..., H*K]
    return y.reshape(*x.shape[:-1], self.num_heads, self.head_size)  # [..., H, K]

  def __call__(
      self,
      x: jax.Array,  # [B, L, D]
      positions: jax.Array,  # [B, L] int
      view: Optional[decoding.CacheView] = None,
      *,
      cache: Optional[decoding.KVCache] = None,  # [B, S, H, K] each
  ):  # -> [B, L, D], or ([B, L, D], this chunk's KVCache) with a cache
    """Without a cache, the keys are the queries' own tokens (S = L).

    With one (generation), the keys are the cache's slots with this chunk
    written in at `view.index`; the chunk's own keys/values are returned for
    the caller to store.
    """
    width = x.shape[-1]
    q = self._project(x, 'query')  # [B, L, H, K]
    k = self._project(x, 'key')  # [B, L, H, K]
    v = self._project(x, 'value')  # [B, L, H, K]
    bias_shape = (self.num_heads, self.head_size)
    content_bias = hk.get_parameter('content_bias', bias_shape, init=jnp.zeros)
    position_bias = hk.get_parameter('position_bias', bias_shape,
                                     init=jnp.zeros)
    key_positions, key_mask, chunk = positions, None, None
    if cache is not None:
      chunk = decoding.KVCache(k, v)
      k = decoding.write(cache.key, k, view.index, axis=1)  # [B, S, H, K]
      v = decoding.write(cache.value, v, view.index, axis=1)  # [B, S, H, K]
      key_positions, key_mask = view.key_positions, view.key_mask

    # Relative offsets pos_t - pos_s; the causal mask keeps offsets >= 0.
    offsets = positions[:, :, None] - key_positions[:, None, :]  # [B, L, S]
    mask = offsets >= 0  # [B, L, S]
    if key_mask is not None:
      mask = mask & key_mask[:, None, :]  # [B, L, S]
    num_offsets = k.shape[1]
    shift = self.contiguous and cache is None
    # Offsets O-1..0 for the shift (Transformer-XL's order), else 0..O-1.
    rel_offsets = jnp.arange(num_offsets)[::-1] if shift else jnp.arange(
        num_offsets)  # [O]
    rel = sinusoid_encoding(rel_offsets, width).astype(x.dtype)  # [O, D]
    rel_k = self._project(rel, 'relative_key')  # [O, H, K]
    pos_logits = jnp.einsum('blhk,ohk->bhlo', q + position_bias, rel_k)  # [B, H, L, O]
    if shift:
      pos_logits = relative_shift(pos_logits)  # [B, H, L, S]
    else:
      index = jnp.clip(offsets, 0, num_offsets - 1)[:, None]  # [B, 1, L, S]
      index = jnp.broadcast_to(index, pos_logits.shape[:2] + index.shape[2:])  # [B, H, L, S]
      pos_logits = jnp.take_along_axis(pos_logits, index, axis=-1)  # [B, H, L, S]

    # With contiguous positions and no cache the mask is causal: the fused
    # attention applies that itself, without a mask array.
    attended = layers.dot_product_attention(
        q + content_bias, k, v, None if shift else mask[:, None],
        logit_bias=pos_logits * self.head_size**-0.5,
        is_causal=shift)  # [B, L, H, K]
    attended = attended.reshape(*attended.shape[:-2], -1)  # [B, L, H*K]
    out = hk.Linear(width, with_bias=False, name='output')(attended)  # [B, L, D]
    return out if cache is None else (out, chunk)


@dataclasses.dataclass
class DecoderBlock(hk.Module):
  """Pre-norm Transformer block: x += attn(norm(x)); x += ffw(norm(x)).

  `layout` (models/lm_layout.py) picks the norms, the attention's position
  encoding, the feed-forward layer and the parallel residual of the
  published families; the default is Chinchilla's.
  """

  num_heads: int
  head_size: int
  ffw_multiplier: int = 4
  activation: str = 'gelu'
  contiguous: bool = False  # See RelativeSelfAttention.
  layout: lm_layout.Layout = lm_layout.Layout()
  name: Optional[str] = None

  def __call__(
      self,
      x: jax.Array,  # [B, L, D]
      positions: jax.Array,  # [B, L]
      view: Optional[decoding.CacheView] = None,
      *,
      cache: Optional[decoding.KVCache] = None,
      between: Optional[Callable[[jax.Array], jax.Array]] = None,
  ):  # -> [B, L, D], or ([B, L, D], KVCache of the chunk) with a cache
    """`between` (optional): a layer run on the residual stream after the
    self-attention and before the feed-forward layer (Flamingo's
    `vanilla_xattn` ablation). It returns x, or (x, aux), and then the block
    returns aux last."""
    if self.layout.parallel_residual:
      if between is not None:
        raise ValueError(
            'a layer between self-attention and feed-forward (the '
            'vanilla_xattn ablation) needs a sequential block; this LM '
            'layout has a parallel residual (GPT-NeoX).')
      return self._parallel(x, positions, view, cache)
    h = self._norm('attention_norm')(x)  # [B, L, D]
    attention = self._attention()
    if cache is None:
      attended, chunk = attention(h, positions), None  # [B, L, D]
    else:
      attended, chunk = attention(h, positions, view, cache=cache)  # [B, L, D]
    x = x + attended  # [B, L, D]
    aux = ()
    if between is not None:
      x = between(x)  # [B, L, D], or ([B, L, D], aux)
      if isinstance(x, tuple):
        x, aux = x[0], x[1:]
    h = self._norm('ffw_norm')(x)  # [B, L, D]
    x = x + self._ffw()(h)  # [B, L, D]
    if cache is not None:
      aux = (chunk, *aux)
    return (x, *aux) if aux else x

  # The layout's parts (Chinchilla's unless `layout` says otherwise).

  @hk.transparent
  def _norm(self, name: str) -> hk.Module:
    return lm_layout.norm(self.layout, name)  # Default: RMSNorm, eps 1e-5.

  @hk.transparent
  def _attention(self) -> hk.Module:
    layout = self.layout
    if layout.positions == 'relative':
      return RelativeSelfAttention(self.num_heads, self.head_size,
                                   self.contiguous, name='self_attention')
    return self_attention.SelfAttention(
        self.num_heads, self.head_size, layout.num_kv_heads,
        # Learned absolute positions are added to the embeddings.
        'none' if layout.positions in ('learned', 'none') else
        layout.positions, layout.rotary_fraction, layout.rotary_base,
        layout.alibi_bias_max, layout.use_bias, self.contiguous,
        # MosaicGPT's q/k LayerNorms: the layout's norm, over H*K features.
        functools.partial(lm_layout.norm, layout) if layout.qk_norm else
        None, name='self_attention')

  @hk.transparent
  def _ffw(self) -> hk.Module:
    layout = self.layout
    if layout.ffw == 'mlp' and not layout.use_bias and (
        layout.ffw_hidden is None):
      return layers.FeedForward(self.ffw_multiplier, self.activation,
                                name='ffw')
    return lm_layout.FamilyFeedForward(
        layout.ffw_hidden, self.ffw_multiplier, self.activation,
        layout.ffw == 'gated', layout.use_bias, name='ffw')

  @hk.transparent
  def _parallel(self, x, positions, view, cache):
    """GPT-NeoX's parallel residual: x + attn(norm1(x)) + ffw(norm2(x))."""
    attention = self._attention()
    h = self._norm('attention_norm')(x)  # [B, L, D]
    if cache is None:
      attended, chunk = attention(h, positions), None  # [B, L, D]
    else:
      attended, chunk = attention(h, positions, view, cache=cache)  # [B, L, D]
    dense = self._ffw()(self._norm('ffw_norm')(x))  # [B, L, D]
    x = x + attended + dense  # [B, L, D]
    return x if cache is None else (x, chunk)


@dataclasses.dataclass
class DecoderLM(hk.Module):
  """The decoder LM. Parameters (the API for freezing and sharding rules):

    lm/embed/embeddings                 [vocab_size, D]   frozen
    lm/eoc_embedding, lm/eoc_unembedding  [D]            trainable <EOC>
    lm/blocks/block/...                 [N, ...]          frozen, stacked
    lm/final_norm/scale                 [D]               frozen
    lm/unembed/w                        [D, vocab_size]   frozen

  The fields after `remat_policy` choose the layout of a published family
  (models/lm_layout.py: rotary/ALiBi/learned positions, LayerNorm, SwiGLU,
  biases, parallel residual, tied embeddings, grouped-query attention,
  query/key norms);
  their defaults are Chinchilla's, whose parameter paths are the ones above.
  """

  num_layers: int
  width: int
  num_heads: int
  head_size: int = 128
  vocab_size: int = 32000
  ffw_multiplier: int = 4
  activation: str = 'gelu'
  remat_policy: Optional[str] = None  # stacking.REMAT_POLICIES; None = 'none'.
  # The layout (models/lm_layout.py's table); the defaults are Chinchilla's.
  positions: str = 'relative'
  rotary_fraction: float = 1.0
  rotary_base: float = 10000.0
  alibi_bias_max: float = 8.0
  max_positions: int = 2048  # Rows of the 'learned' position table.
  norm: str = 'rms'
  norm_bias: bool = True
  norm_eps: float = 1e-5
  ffw: str = 'mlp'
  ffw_hidden: Optional[int] = None
  use_bias: bool = False
  parallel_residual: bool = False
  tied_embeddings: bool = False
  num_kv_heads: Optional[int] = None
  qk_norm: bool = False
  name: Optional[str] = 'lm'

  @property
  def layout(self) -> lm_layout.Layout:
    """The block-level fields, checked."""
    fields = {f.name: getattr(self, f.name)
              for f in dataclasses.fields(lm_layout.Layout)}
    layout = lm_layout.Layout(**fields)
    layout.check(self.num_heads)
    return layout

  @property
  def kv_heads(self) -> int:
    """Key/value heads per layer (the self-attention caches' H)."""
    return self.num_kv_heads or self.num_heads

  @property
  def eoc_id(self) -> int:
    return self.vocab_size

  def _validate_tokens(self, tokens: jax.Array) -> None:
    layers.check_rank(tokens, 2, 'tokens', '[B, L]')

  @hk.transparent
  def embed(self, tokens: jax.Array) -> jax.Array:  # [B, L] -> [B, L, D]
    self._validate_tokens(tokens)
    table = hk.Embed(self.vocab_size, self.width, name='embed')
    self._table = table  # Read by unembed when tied_embeddings.
    eoc_row = hk.get_parameter('eoc_embedding', [self.width],
                               init=hk.initializers.TruncatedNormal(1.0))  # [D]
    x = table(jnp.clip(tokens, 0, self.vocab_size - 1))  # [B, L, D]
    is_eoc = (tokens == self.eoc_id)[..., None]  # [B, L, 1]
    return jnp.where(is_eoc, eoc_row.astype(x.dtype), x)  # [B, L, D]

  @hk.transparent
  def unembed(self, x: jax.Array) -> jax.Array:  # [B, L, D] -> [B, L, V]
    x = lm_layout.norm(self.layout, 'final_norm')(x)  # [B, L, D]
    if self.tied_embeddings:
      logits = self._tied_unembed(x)  # [B, L, V-1]
    else:
      logits = hk.Linear(self.vocab_size, with_bias=False, name='unembed')(x)  # [B, L, V-1]
    eoc_out = hk.get_parameter(
        'eoc_unembedding', [self.width],
        init=hk.initializers.TruncatedNormal(self.width**-0.5))  # [D]
    eoc_logit = jnp.einsum('bld,d->bl', x, eoc_out.astype(x.dtype))  # [B, L]
    return jnp.concatenate([logits, eoc_logit[..., None]], axis=-1)  # [B, L, V]

  def blocks(self, contiguous: bool = False) -> stacking.Stack:
    """The stack of decoder blocks; parameters under `lm/blocks/block`.

    `contiguous`: positions are 0..L-1 in every row (a faster attention).
    """
    policy = stacking.remat_policy(self.remat_policy)
    return stacking.Stack(
        lambda: DecoderBlock(self.num_heads, self.head_size,
                             self.ffw_multiplier, self.activation,
                             contiguous, self.layout, name='block'),
        self.num_layers, name='blocks', remat_policy=policy)

  @hk.transparent
  def block_params(self, x: jax.Array, positions: jax.Array) -> stacking.Params:
    """The blocks' parameters, [N, ...] (created at init).

    Fetched once per module instance, so that calling the LM twice in one
    transform (a prompt, then the next token) reuses the same parameters.
    """
    if getattr(self, '_block_params', None) is None:
      self._block_params = self.blocks().params(x, positions)
    return self._block_params

  def __call__(
      self,
      tokens: jax.Array,  # [B, L]
      trunk: Optional[TrunkFn] = None,
      *,
      positions: Optional[jax.Array] = None,  # [B, L]; default 0..L-1
  ):  # -> [B, L, V], or ([B, L, V], aux) if the trunk returns (x, aux)
    """Embeds, runs the blocks, unembeds.

    Alone, this is the frozen LM (what Flamingo reduces to with closed gates).
    `trunk(x, blocks, block_params, positions) -> x` replaces the plain scan
    over the blocks; Flamingo passes one that interleaves its cross-attention.
    It runs inside this module's name scope: create other parameters outside.
    A trunk may return `(x, aux)` (caches, in generation); `aux` is then
    returned with the logits.
    """
    x = self.embed(tokens)  # [B, L, D]
    contiguous = positions is None
    if contiguous:
      positions = default_positions(tokens)  # [B, L]
    if self.positions == 'learned':
      x = self._add_learned_positions(x, positions)  # [B, L, D]
    params = self.block_params(x, positions)
    blocks = self.blocks(contiguous)
    aux = None
    if trunk is None:
      x = blocks.scan(params, x, positions)  # [B, L, D]
    else:
      x = trunk(x, blocks, params, positions)  # [B, L, D]
      if isinstance(x, tuple):
        x, aux = x
    logits = self.unembed(x)  # [B, L, V]
    return logits if aux is None else (logits, aux)


  @hk.transparent
  def _tied_unembed(self, x: jax.Array) -> jax.Array:  # [B, L, D] -> [B, L, V-1]
    """Logits through the embedding table (GPT-2, MPT)."""
    table = self._table.embeddings  # [V-1, D]
    return jnp.einsum('bld,vd->blv', x, table.astype(x.dtype))  # [B, L, V-1]

  @hk.transparent
  def _add_learned_positions(self, x: jax.Array,  # [B, L, D]
                             positions: jax.Array  # [B, L]
                             ) -> jax.Array:  # [B, L, D]
    """GPT-2's absolute position table, `lm/position_embed/embeddings`.

    Positions past the table are an error where they are known (eagerly).
    """
    if not isinstance(positions, jax.core.Tracer):
      most = int(np.max(np.asarray(positions), initial=0))
      if most >= self.max_positions:
        raise ValueError(f'Position {most} is past the {self.max_positions} '
                         'rows of the learned position table '
                         '(max_positions).')
    table = hk.Embed(self.max_positions, self.width, name='position_embed')
    # Padding tokens (position -1) are masked out as keys; any row will do.
    return x + table(jnp.clip(positions, 0, self.max_positions - 1)).astype(
        x.dtype)  # [B, L, D]


def default_positions(tokens: jax.Array) -> jax.Array:
  """0..L-1 for every row: [B, L] -> [B, L]."""
  return jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
