"""The contrastive image-text model that pretrains Flamingo's vision encoder.

Flamingo's vision encoder is pretrained CLIP/ALIGN-style on image-text pairs
before it is frozen (paper §2.1, App. B.1.3): a vision tower and a text tower
map an image and a caption into one embedding space, where a two-term
contrastive loss (`flamingo_jax.training.contrastive`) pulls matching pairs
together and pushes the other pairs of the batch apart.

  media ─vision_encoder (NFNet)─▶ pooled [B, C] ─image_projection─▶ [B, E]
  tokens ─text_encoder (bidirectional Transformer)─▶ mean over non-padding
         tokens [B, Dt] ─text_projection─▶ [B, E]
  both L2-normalised; logits = exp(temperature/log_scale) * img @ txt^T

The vision tower is built exactly as Flamingo builds its encoder (same
config section, same module name), so its parameter paths are Flamingo's
`vision_encoder/...` paths and a checkpoint of this model initialises
Flamingo's encoder through `config.init_from` (include 'vision_encoder/.*').
The pooled features are the spatial mean of the same final-conv grid that
Flamingo reads as visual tokens. The text tower is a small BERT-like
pre-norm encoder with learned positions over the tokenizer's ids (the
pipeline's caption batches); only the vision tower is kept afterwards.

Top-level parameter paths:
  vision_encoder/...     the NFNet (or ViT), as in Flamingo
  image_projection/w     [C, E]
  text_encoder/...       embed/embeddings, position_embeddings, layer_{i}/...,
                         final_norm
  text_projection/w      [Dt, E]
  temperature/log_scale  [], the learned inverse temperature, log-parametrised

Glossary of shapes:
  B: batch size.
  N: media slots (1 here); T: frames (1: images); H, W: image size.
  C: vision feature width (NFNet: 2 x its last stage width).
  L: text tokens; V: text vocabulary (the LM's vocab_size + 1 for <EOC>).
  Dt: text encoder width; Hh: heads; K: head size.
  E: joint embedding width.
"""

from collections.abc import Mapping
import dataclasses
from typing import Any, Optional

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from flamingo_jax.models import flamingo
from flamingo_jax.models import layers
from flamingo_jax.models import lm

PAD_ID = 0  # The tokenizer's <pad> (flamingo_jax.data.tokenizer).

# Text towers. 'tiny' is for the CPU recipe and tests; 'bert_base' is the
# shape of BERT-base, the paper's kind of text encoder (App. B.1.3).
TEXT_ENCODER_PARAMS = {
    'tiny': dict(num_layers=2, width=64, num_heads=4, head_size=16,
                 max_len=64),
    'bert_base': dict(num_layers=12, width=768, num_heads=12, head_size=64,
                      max_len=512),
}

# Text tower and joint embedding width for each vision encoder size. The
# paper does not give its embedding width here; 1024 is this project's choice.
CONTRASTIVE_SIZES = {
    'tiny': dict(text='tiny', embed_dim=64, flamingo='tiny'),
    'F6': dict(text='bert_base', embed_dim=1024, flamingo='3B'),
}

_EMBEDDING_INIT = hk.initializers.TruncatedNormal(stddev=0.02)


@dataclasses.dataclass
class TextEncoder(hk.Module):
  """A pre-norm bidirectional Transformer over token ids, mean pooled.

  Parameters: `embed/embeddings` [V, Dt], `position_embeddings` [max_len,
  Dt], `layer_{i}/{attention_norm,attention,ffw_norm,ffw}/...` and
  `final_norm`.
  """

  vocab_size: int  # V: every id of the batches, <EOC> included.
  num_layers: int = 2
  width: int = 64  # Dt.
  num_heads: int = 4  # Hh.
  head_size: int = 16  # K.
  max_len: int = 64  # Rows of the learned position table.
  ffw_multiplier: int = 4
  pad_id: int = PAD_ID  # Ignored by attention and pooling.
  name: Optional[str] = 'text_encoder'

  def __post_init__(self):
    super().__init__(name=self.name)

  def __call__(self, tokens: jax.Array) -> jax.Array:  # [B, L] -> [B, Dt]
    """Mean of the final token states over non-padding tokens."""
    layers.check_rank(tokens, 2, 'text tokens', '[B, L]')
    if tokens.shape[1] > self.max_len:
      raise ValueError(f'Text encoder max_len is {self.max_len}; got tokens '
                       f'of shape {tuple(tokens.shape)}.')
    valid = tokens != self.pad_id  # [B, L]
    x = hk.Embed(self.vocab_size, self.width, w_init=_EMBEDDING_INIT,
                 name='embed')(tokens)  # [B, L, Dt]
    positions = hk.get_parameter('position_embeddings',
                                 [self.max_len, self.width],
                                 init=_EMBEDDING_INIT)  # [max_len, Dt]
    x = x + positions[:tokens.shape[1]].astype(x.dtype)  # [B, L, Dt]
    mask = valid[:, None, None, :]  # [B, 1, 1, L]: keys that may be read.
    for i in range(self.num_layers):
      with hk.name_scope(f'layer_{i}'):
        h = layers.layer_norm('attention_norm')(x)  # [B, L, Dt]
        attention = layers.MultiHeadAttention(self.num_heads, self.head_size,
                                              name='attention')
        x = x + attention(h, h, mask)  # [B, L, Dt]
        h = layers.layer_norm('ffw_norm')(x)  # [B, L, Dt]
        x = x + layers.FeedForward(self.ffw_multiplier, activation='gelu',
                                   name='ffw')(h)  # [B, L, Dt]
    x = layers.layer_norm('final_norm')(x)  # [B, L, Dt]
    weights = valid.astype(x.dtype)[..., None]  # [B, L, 1]
    # An all-padding row pools to zeros (and embeds to ~0), never NaN.
    count = jnp.maximum(weights.sum(axis=1), 1.0)  # [B, 1]
    return (x * weights).sum(axis=1) / count  # [B, Dt]


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:  # [B, E]
  """`x / |x|` along the last axis, computed in float32."""
  x = x.astype(jnp.float32)  # [B, E]
  return x * jax.lax.rsqrt(
      jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))  # [B, E]


class LearnedTemperature(hk.Module):
  """The logit scale 1 / tau = exp(log_scale), clipped at `max_scale`."""

  def __init__(self, init_temperature: float, max_scale: float = 100.0,
               name: str = 'temperature'):
    super().__init__(name=name)
    self.init_temperature = init_temperature
    self.max_scale = max_scale

  def __call__(self) -> jax.Array:  # []
    init = hk.initializers.Constant(-np.log(self.init_temperature))
    log_scale = hk.get_parameter('log_scale', (), jnp.float32, init=init)
    return jnp.minimum(jnp.exp(log_scale.astype(jnp.float32)),
                       self.max_scale)  # []


class ContrastiveModel:
  """Image and text towers into a joint space. Build it inside a transform.

  Not an `hk.Module`, so that the vision tower's paths start at
  `vision_encoder/` exactly as in Flamingo.
  """

  def __init__(self, config: Mapping[str, Any]):
    config = config.to_dict() if hasattr(config, 'to_dict') else dict(config)
    self.config = config
    self.vision_encoder = flamingo.vision_encoder(config['vision'])
    self.text_encoder = TextEncoder(**config['text'], name='text_encoder')
    self.embed_dim = config['embed_dim']
    self.temperature = LearnedTemperature(config['init_temperature'],
                                          config['max_logit_scale'])

  def _normalise(self, images: jax.Array) -> jax.Array:  # [B, H, W, 3]
    return flamingo.normalise_pixels(images, self.config['vision']['encoder'])

  def embed_images(
      self,
      media: jax.Array,  # [B, N, T, H, W, 3] uint8 (slot 0, frame 0 used)
      *,
      is_training: bool = False,
  ) -> jax.Array:  # [B, E], unit norm
    layers.check_rank(media, 6, 'media', '[B, N, T, H, W, 3]')
    images = self._normalise(media[:, 0, 0])  # [B, H, W, 3]
    features = self.vision_encoder(images, is_training=is_training)
    pooled = features['pooled']  # [B, C]
    embedded = hk.Linear(self.embed_dim, with_bias=False,
                         name='image_projection')(pooled)  # [B, E]
    return l2_normalize(embedded)  # [B, E]

  def image_features(
      self,
      images: jax.Array,  # [B, H, W, 3] uint8
  ) -> jax.Array:  # [B, C]
    """The spatial mean of the visual tokens Flamingo's resampler reads
    (the attribute probe's features; inference mode)."""
    tokens = self.vision_encoder(self._normalise(images),
                                 is_training=False)['tokens']  # [B, S, C]
    return tokens.mean(axis=1)  # [B, C]

  def embed_text(self, tokens: jax.Array) -> jax.Array:  # [B, L] -> [B, E]
    pooled = self.text_encoder(tokens)  # [B, Dt]
    embedded = hk.Linear(self.embed_dim, with_bias=False,
                         name='text_projection')(pooled)  # [B, E]
    return l2_normalize(embedded)  # [B, E]

  def __call__(
      self,
      tokens: jax.Array,  # [B, L] int
      media: jax.Array,  # [B, N, T, H, W, 3] uint8
      *,
      is_training: bool = False,
  ) -> dict[str, jax.Array]:
    """Returns 'image' [B, E], 'text' [B, E] (unit norm), 'scale' []."""
    if tokens.shape[0] != media.shape[0]:
      raise ValueError(f'tokens and media must have the same batch size; got '
                       f'tokens {tuple(tokens.shape)} and media '
                       f'{tuple(media.shape)}.')
    image = self.embed_images(media, is_training=is_training)  # [B, E]
    text = self.embed_text(tokens)  # [B, E]
    return {'image': image, 'text': text, 'scale': self.temperature()}


def model_config(size: str = 'tiny',
                 vision: Optional[Mapping[str, Any]] = None,
                 vocab_size: Optional[int] = None) -> dict[str, Any]:
  """`config.model` of a contrastive run (plain dict).

  Args:
    size: a key of CONTRASTIVE_SIZES.
    vision: the vision section of the Flamingo config it pretrains for
      (`config.model.vision`); default: Flamingo's of the same size.
    vocab_size: the tokenizer's vocabulary (the LM's vocab_size); the text
      tower embeds vocab_size + 1 ids to include <EOC>.
  """
  if size not in CONTRASTIVE_SIZES:
    raise ValueError(f'Unknown contrastive size {size!r}; expected one of '
                     f'{sorted(CONTRASTIVE_SIZES)}.')
  spec = CONTRASTIVE_SIZES[size]
  flamingo_config = flamingo.model_config(spec['flamingo'])
  if vision is None:
    vision = flamingo_config['vision']
  if vocab_size is None:
    vocab_size = flamingo_config['lm'].get('vocab_size',
                                            lm.DecoderLM.vocab_size)
  return dict(
      vision=dict(vision),
      image_size=flamingo_config['image_size'],
      text=dict(TEXT_ENCODER_PARAMS[spec['text']], vocab_size=vocab_size + 1),
      embed_dim=spec['embed_dim'],
      init_temperature=0.07,  # CLIP's; learned from there.
      max_logit_scale=100.0,
  )


def transform(config: Mapping[str, Any]) -> hk.Transformed:
  """`init(rng, tokens, media, is_training=...)`; apply returns embeddings."""

  def forward(tokens, media, is_training=False):
    return ContrastiveModel(config)(tokens, media, is_training=is_training)

  return hk.transform(forward)


def transform_features(config: Mapping[str, Any]) -> hk.Transformed:
  """apply(params, rng, images [B, H, W, 3] uint8) -> [B, C]
  (`ContrastiveModel.image_features`)."""
  return hk.transform(lambda images: ContrastiveModel(config).image_features(
      images))


def example_inputs(config: Mapping[str, Any], batch: int = 1,
                   seq_len: int = 8) -> tuple[jax.Array, jax.Array]:
  """Zero (tokens, media) of the right shapes (for init, `jax.eval_shape`)."""
  size = config['image_size']
  tokens = jnp.zeros([batch, seq_len], jnp.int32)
  media = jnp.zeros([batch, 1, 1, size, size, 3], jnp.uint8)
  return tokens, media


def abstract_params(config: Mapping[str, Any]) -> hk.Params:
  """Parameter shapes and dtypes without allocating them."""
  return jax.eval_shape(transform(config).init, jax.random.PRNGKey(0),
                        *example_inputs(config))
