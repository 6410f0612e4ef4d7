"""The Perceiver Resampler: visual features to a fixed number of visual tokens.

Flamingo (Alayrac et al., 2022), Section 2.1, Figure 5 and Appendix A.1.1. The
vision encoder's features of every frame (an image is a 1-frame video) get a
learned temporal embedding, are flattened into one sequence, and R learned
latents cross-attend to them (keys/values are the features concatenated with
the latents) through a stack of pre-norm attention + Squared-ReLU FFW layers.
The R output latents are the visual tokens the language model attends to, so
their number does not depend on the image resolution or the number of frames.

There are no spatial position embeddings: the vision encoder's features
already encode position (the paper adds only temporal embeddings).
OpenFlamingo's resampler can also embed each medium's place in its sample
(`max_num_media`, its `media_time_embs`): with `max_media` set, row n of
`media_time_embeddings` is added to every token of the sample's medium n
(0-based), after the temporal embeddings; the paper has no such table.

Published variants (`variants.VARIANTS`), each a field defaulting to the
paper's layout:
  ffw_activation  'squared_relu' (the paper), 'gelu_exact' (OpenFlamingo),
                  'relu' (IDEFICS's `IdeficsPerceiverResampler`: LayerNorm,
                  ReLU MLP of 4x width, no biases).
  qk_norm         False (the paper); True: IDEFICS's
                  `qk_layer_norms_perceiver`, a LayerNorm over each head's
                  projected queries and keys (`attention/query_norm`,
                  `attention/key_norm`).
Neither OpenFlamingo's released models nor IDEFICS have temporal embeddings:
their imports set `time_embeddings` to zero, which is the same function.

Glossary of shapes:
  B: batch size.
  T: number of frames; F: max_frames, rows of the learned temporal table.
  M: max_media, rows of the per-medium table (OpenFlamingo's; optional).
  S: spatial tokens per frame.
  N: T*S, the flattened visual tokens.
  Din: width of the vision encoder's features; D: resampler width.
  R: number of learned latents (the 'perceiver' type's output tokens).
  H: number of heads; K: head size.
"""

import dataclasses
from typing import Optional

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from flamingo_jax.models.layers import check_rank
from flamingo_jax.models.layers import Dense
from flamingo_jax.models.layers import FeedForward
from flamingo_jax.models.layers import layer_norm
from flamingo_jax.models.layers import MultiHeadAttention

# The ablations of the paper's Table 3 (vi):
#   'perceiver': R learned latents cross-attend to [features; latents] (the
#       Flamingo default); output R tokens.
#   'mlp': no latents; pre-norm residual Squared-ReLU MLP layers applied to
#       each time-embedded visual token on its own; output N = T*S tokens.
#   'transformer': no latents; pre-norm self-attention + FFW layers over all
#       time-embedded visual tokens; output N = T*S tokens.
RESAMPLER_TYPES = ('perceiver', 'mlp', 'transformer')

# Sizes of the Perceiver Resampler. 'medium' is Flamingo's (Table 4: 6
# layers, width 1536, 16 heads, the same at every model size), the default;
# 'small' and 'large' are the resampler-size ablation (arXiv v1 Table 7, v2
# Table 10 (i)), whose Flamingo-3B totals the paper gives as 3.1B / 3.2B /
# 3.4B without their layouts: we vary the depth, 2 / 6 / 12 layers, which
# come to 3.10B / 3.23B / 3.42B (`python -m flamingo_jax.summarize --config
# experiments/flamingo.py:3B,resampler_small`). 'tiny' is for CPU tests.
#
# The key/value size per head: App. A.1.4 says D/H = 96 for the resampler,
# which gives 175M parameters (with the 3072-wide NFNet-F6 features,
# counting the input projection); Table 5 says 194M, which needs 128. We
# keep 128 (Table 5's count) as the default; `resampler_kv96`
# (experiments/flamingo.py) is App. A.1.4's value.
RESAMPLER_PARAMS = {
    'tiny': dict(num_layers=2, width=32, num_heads=2, head_size=16,
                 num_latents=8),
    'small': dict(num_layers=2, width=1536, num_heads=16, head_size=128),
    'medium': dict(num_layers=6, width=1536, num_heads=16, head_size=128),
    'large': dict(num_layers=12, width=1536, num_heads=16, head_size=128),
}

_EMBEDDING_INIT = hk.initializers.TruncatedNormal(stddev=0.02)


def _check_resampler_type(resampler_type: str) -> None:
  if resampler_type not in RESAMPLER_TYPES:
    raise ValueError(f'Unknown resampler_type {resampler_type!r}; expected '
                     f'one of {RESAMPLER_TYPES}.')


def num_output_tokens(resampler_type: str, num_latents: int, num_frames: int,
                      num_spatial: int) -> int:
  """Number of visual tokens a resampler of this type outputs per example."""
  _check_resampler_type(resampler_type)
  if resampler_type == 'perceiver':
    return num_latents
  return num_frames * num_spatial


def interpolate_time_embeddings(
    table: jax.Array,  # [F, D]
    num_frames: int,
) -> jax.Array:  # [T, D]
  """Temporal embeddings for `num_frames` frames from a learned [F, D] table.

  Up to F frames use the first T rows. Longer videos (the paper trains on 8
  frames and evaluates on 30) sample the table by linear interpolation at T
  evenly spaced points of [0, F-1], so the first and last rows are the learned
  endpoints.

  Args:
    table: the learned temporal embeddings, [F, D].
    num_frames: T, the number of frames to embed (a static int).

  Returns:
    The [T, D] temporal embeddings.
  """
  check_rank(table, 2, 'time embedding table', '[F, D]')
  if num_frames < 1:
    raise ValueError(f'num_frames must be >= 1; got {num_frames}.')
  max_frames = table.shape[0]
  if num_frames <= max_frames:
    return table[:num_frames]  # [T, D]
  # The positions are static, so they are computed in numpy at trace time.
  positions = np.linspace(0.0, max_frames - 1, num_frames)  # [T]
  lower = np.floor(positions).astype(np.int32)  # [T]
  upper = np.minimum(lower + 1, max_frames - 1)  # [T]
  frac = jnp.asarray(positions - lower, table.dtype)[:, None]  # [T, 1]
  return (1 - frac) * table[lower] + frac * table[upper]  # [T, D]


def _ffw_block(x: jax.Array, multiplier: int,
               activation: str = 'squared_relu') -> jax.Array:  # [B, *, D]
  """Pre-norm residual feed-forward (Squared ReLU; OpenFlamingo: GELU)."""
  h = layer_norm('ffw_norm')(x)  # [B, *, D]
  ffw = FeedForward(multiplier, activation=activation, linear=Dense,
                    name='ffw')
  h = ffw(h)  # [B, *, D]
  return x + h  # [B, *, D]


def _cross_attention_block(
    latents: jax.Array,  # [B, R, D]
    features: jax.Array,  # [B, N, D]
    num_heads: int,
    head_size: int,
    qk_norm: bool = False,
) -> jax.Array:  # [B, R, D]
  """Latents attend to [features; latents] (Figure 5 of the paper)."""
  latents_normed = layer_norm('latents_norm')(latents)  # [B, R, D]
  features_normed = layer_norm('features_norm')(features)  # [B, N, D]
  # The latents also attend to themselves, so they can mix information.
  kv = jnp.concatenate([features_normed, latents_normed], axis=1)  # [B, N+R, D]
  attention = MultiHeadAttention(
      num_heads, head_size, linear=Dense,
      qk_norm='layer_norm' if qk_norm else None, name='attention')
  attended = attention(latents_normed, kv)  # [B, R, D]
  return latents + attended  # [B, R, D]


def _self_attention_block(
    x: jax.Array,  # [B, N, D]
    num_heads: int,
    head_size: int,
) -> jax.Array:  # [B, N, D]
  """Pre-norm residual self-attention over all visual tokens."""
  h = layer_norm('attention_norm')(x)  # [B, N, D]
  attention = MultiHeadAttention(num_heads, head_size, linear=Dense,
                                 name='attention')
  h = attention(h, h)  # [B, N, D]
  return x + h  # [B, N, D]


@dataclasses.dataclass
class PerceiverResampler(hk.Module):
  """Maps [B, T, S, Din] visual features to [B, R, D] (or [B, N, D]) tokens.

  Parameters: `input_projection` (only when Din != D), `time_embeddings`
  [F, D], `media_time_embeddings` [M, D] (only with `max_media`), `latents`
  [R, D] (the 'perceiver' type only), `layer_{i}/...` and `output_norm`.
  """

  num_layers: int = 6  # Number of attention + FFW (or FFW only) layers.
  width: int = 1536  # D, the width of the latents and of the output tokens.
  num_heads: int = 16  # H.
  head_size: int = 128  # K; H*K need not equal D.
  num_latents: int = 64  # R, the output tokens of the 'perceiver' type.
  max_frames: int = 8  # F; longer videos interpolate the temporal table.
  ffw_multiplier: int = 4  # FFW hidden width is D * ffw_multiplier.
  resampler_type: str = 'perceiver'  # One of RESAMPLER_TYPES.
  # The paper's Squared ReLU; OpenFlamingo's resampler: 'gelu_exact'.
  ffw_activation: str = 'squared_relu'
  # IDEFICS's `qk_layer_norms_perceiver` (module docstring).
  qk_norm: bool = False
  # M: OpenFlamingo's `max_num_media`, rows of `media_time_embeddings` (the
  # medium's slot in its sample); None (the paper's): no such table.
  max_media: Optional[int] = None
  name: Optional[str] = 'perceiver_resampler'

  def __post_init__(self):
    super().__init__(name=self.name)
    _check_resampler_type(self.resampler_type)

  def __call__(
      self,
      features: jax.Array,  # [B, T, S, Din]
      media_slots: Optional[jax.Array] = None,  # [B] int, 0-based
  ) -> jax.Array:  # [B, R, D], or [B, N, D] for 'mlp' and 'transformer'
    """Resamples visual features of images or videos into visual tokens.

    `media_slots`: each medium's place in its sample (0..M-1), read only
    with `max_media` (where it is required).
    """
    check_rank(features, 4, 'resampler features', '[B, T, S, Din]')
    x = self._project(features)  # [B, T, S, D]
    x = self._add_time_embeddings(x)  # [B, T, S, D]
    if self.max_media is not None:
      x = self._add_media_time_embeddings(x, media_slots)  # [B, T, S, D]
    batch, frames, spatial, width = x.shape
    x = x.reshape(batch, frames * spatial, width)  # [B, N, D]
    if self.resampler_type == 'perceiver':
      x = self._resample(x)  # [B, R, D]
    else:
      x = self._process_tokens(x)  # [B, N, D]
    return layer_norm('output_norm')(x)  # [B, R or N, D]

  # Helpers are transparent so parameter paths carry no method scope.
  @hk.transparent
  def _project(self, features: jax.Array) -> jax.Array:  # [B, T, S, D]
    """Brings the vision encoder's width to D (NFNet-F6's 3072 to 1536)."""
    if features.shape[-1] == self.width:
      return features  # [B, T, S, D]
    projection = Dense(self.width, name='input_projection')
    return projection(features)  # [B, T, S, D]

  @hk.transparent
  def _add_time_embeddings(self, x: jax.Array) -> jax.Array:  # [B, T, S, D]
    table = hk.get_parameter('time_embeddings', [self.max_frames, self.width],
                             init=_EMBEDDING_INIT)  # [F, D]
    embeddings = interpolate_time_embeddings(table, x.shape[1])  # [T, D]
    # The same embedding for every spatial token of a frame.
    return x + embeddings[:, None, :].astype(x.dtype)  # [B, T, S, D]

  @hk.transparent
  def _add_media_time_embeddings(
      self, x: jax.Array,  # [B, T, S, D]
      media_slots: Optional[jax.Array],  # [B] int
  ) -> jax.Array:  # [B, T, S, D]
    """OpenFlamingo's `x + media_time_embs[:T]` (its T: the media of a
    sample), one medium at a time."""
    if media_slots is None:
      raise ValueError('A resampler with max_media needs each medium\'s '
                       'media_slots (its place in the sample).')
    table = hk.get_parameter('media_time_embeddings',
                             [self.max_media, self.width],
                             init=_EMBEDDING_INIT)  # [M, D]
    rows = jnp.take(table, media_slots, axis=0)  # [B, D]
    return x + rows[:, None, None, :].astype(x.dtype)  # [B, T, S, D]

  @hk.transparent
  def _resample(self, features: jax.Array) -> jax.Array:  # [B, R, D]
    latents = hk.get_parameter('latents', [self.num_latents, self.width],
                               init=_EMBEDDING_INIT)  # [R, D]
    latents = jnp.broadcast_to(
        latents.astype(features.dtype),
        (features.shape[0], *latents.shape))  # [B, R, D]
    for i in range(self.num_layers):
      with hk.name_scope(f'layer_{i}'):
        latents = _cross_attention_block(
            latents, features, self.num_heads, self.head_size,
            self.qk_norm)  # [B, R, D]
        latents = _ffw_block(latents, self.ffw_multiplier,
                             self.ffw_activation)  # [B, R, D]
    return latents  # [B, R, D]

  @hk.transparent
  def _process_tokens(self, x: jax.Array) -> jax.Array:  # [B, N, D]
    """The latent-free ablations: output one token per visual token."""
    for i in range(self.num_layers):
      with hk.name_scope(f'layer_{i}'):
        if self.resampler_type == 'transformer':
          x = _self_attention_block(
              x, self.num_heads, self.head_size)  # [B, N, D]
        x = _ffw_block(x, self.ffw_multiplier,
                       self.ffw_activation)  # [B, N, D]
    return x  # [B, N, D]
