"""A CLIP-style Vision Transformer, the alternative vision encoder.

Flamingo's Table 3 (vii) ablates the NFNet-F6 vision encoder against CLIP's
ViT-L/14 (Radford et al., 2021). This is that encoder: a bias-free convolution
cuts the image into patches, a class token and learned position embeddings are
added, then `ln_pre`, a stack of pre-norm residual blocks (multi-head
attention, quick-GELU MLP) and `ln_post`. The patch tokens feed the Perceiver
Resampler; the projected class token is the embedding for contrastive
pretraining.

Published towers differ in a few ways, each a constructor field whose
default is the layout above (`flamingo_jax.weights` sets them per
checkpoint):
  activation   'quick_gelu' (OpenAI's CLIP weights were trained with it) or
               'gelu' (exact, erf: OpenCLIP's LAION towers, e.g. H/14).
  tokens       which activations are the `tokens`:
               'ln_post'           the last block's output after `ln_post`
                                   (the default; what open_clip >= 2.23
                                   returns as its tokens);
               'last_block'        the last block's output without `ln_post`
                                   (open_clip 2.16-2.22, which OpenFlamingo
                                   was trained with, `vision_encoder(x)[1]`;
                                   Hugging Face's `last_hidden_state`, which
                                   IDEFICS reads);
               'penultimate_block' the second-to-last block's output (the
                                   LLaVA convention, `hidden_states[-2]`).
  keep_class_token  the class token stays first among the `tokens` (IDEFICS
               resamples all 1 + P; OpenFlamingo drops it).
  projection   False for towers published without one (Hugging Face's
               `CLIPVisionModel`): `pooled` is then `ln_post(class token)`,
               [B, D].
Sizes come from VIT_PARAMS[variant]; explicit sizes override them, and
`variant='custom'` takes all six from the arguments.

Glossary of shapes:
  B: batch size.
  H, W: image height and width in pixels; C = 3 channels.
  h, w: patch grid (H // patch_size, W // patch_size); P = h*w patch tokens.
  g: side of the patch grid the position embeddings are learned for,
    image_size // patch_size.
  D: transformer width; E: embed_dim of the contrastive projection.
  M: MLP hidden width.
"""

from typing import Optional

import haiku as hk
import jax
import jax.numpy as jnp

from flamingo_jax.models.layers import check_rank
from flamingo_jax.models.layers import layer_norm
from flamingo_jax.models.layers import MultiHeadAttention

# CLIP's visual towers ('L/14' is the one the paper ablates and OpenFlamingo
# uses; 'H/14' is OpenCLIP's LAION tower, IDEFICS's); 'tiny' is for CPU
# tests.
VIT_PARAMS = {
    'L/14': dict(patch_size=14, width=1024, depth=24, num_heads=16,
                 mlp_dim=4096, embed_dim=768),
    'H/14': dict(patch_size=14, width=1280, depth=32, num_heads=16,
                 mlp_dim=5120, embed_dim=1024),
    'B/16': dict(patch_size=16, width=768, depth=12, num_heads=12,
                 mlp_dim=3072, embed_dim=512),
    'tiny': dict(patch_size=4, width=32, depth=2, num_heads=2, mlp_dim=64,
                 embed_dim=16),
}

_NUM_CHANNELS = 3
SIZE_FIELDS = ('patch_size', 'width', 'depth', 'num_heads', 'mlp_dim',
               'embed_dim')
CUSTOM = 'custom'  # The variant whose sizes are all given explicitly.
TOKENS = ('ln_post', 'last_block', 'penultimate_block')


def sizes(variant: str, **overrides: Optional[int]) -> dict[str, int]:
  """The six sizes of `variant`, with the non-None `overrides` applied."""
  given = {k: v for k, v in overrides.items() if v is not None}
  unknown = sorted(set(given) - set(SIZE_FIELDS))
  if unknown:
    raise ValueError(f'Unknown ViT size fields {unknown}; expected '
                     f'{SIZE_FIELDS}.')
  if variant == CUSTOM:
    missing = [k for k in SIZE_FIELDS if k not in given]
    if missing:
      raise ValueError(f"ViT variant 'custom' needs every size; missing "
                       f'{missing}.')
    return given
  if variant not in VIT_PARAMS:
    raise ValueError(f'Unknown ViT variant {variant!r}; expected one of '
                     f'{sorted(VIT_PARAMS)} or {CUSTOM!r}.')
  return {**VIT_PARAMS[variant], **given}


def feature_width(variant: str, width: Optional[int] = None) -> int:
  """Width D of the `tokens` the variant outputs (the resampler's Din)."""
  return sizes(variant, width=width)['width']


def quick_gelu(x: jax.Array) -> jax.Array:
  """CLIP's sigmoid approximation of GELU; its weights were trained with it."""
  return x * jax.nn.sigmoid(1.702 * x)


def exact_gelu(x: jax.Array) -> jax.Array:
  """GELU with the error function (PyTorch's nn.GELU, OpenCLIP's default)."""
  return jax.nn.gelu(x, approximate=False)


ACTIVATIONS = {'quick_gelu': quick_gelu, 'gelu': exact_gelu}


def resize_position_embeddings(
    table: jax.Array,  # [1 + g*g, D]
    grid: tuple[int, int],
) -> jax.Array:  # [1 + h*w, D]
  """Bilinearly resizes the patch rows of a [class; g x g grid] table.

  The class-token row has no position on the grid, so it is kept as is.

  Args:
    table: position embeddings, the class token's row first, then the rows of
      a square g x g grid in row-major order.
    grid: (h, w), the patch grid of the input images.

  Returns:
    The [1 + h*w, D] position embeddings for that grid.
  """
  check_rank(table, 2, 'position embeddings', '[1 + g*g, D]')
  num_patches, width = table.shape[0] - 1, table.shape[1]
  side = round(num_patches ** 0.5)
  if side * side != num_patches:
    raise ValueError('position embeddings must hold 1 + g*g rows; got shape '
                     f'{tuple(table.shape)}.')
  if tuple(grid) == (side, side):
    return table  # [1 + g*g, D]
  patches = table[1:].reshape(side, side, width)  # [g, g, D]
  patches = jax.image.resize(
      patches, (*grid, width), method='bilinear')  # [h, w, D]
  patches = patches.reshape(grid[0] * grid[1], width)  # [P, D]
  return jnp.concatenate([table[:1], patches], axis=0)  # [1 + P, D]


def _mlp(x: jax.Array, mlp_dim: int,
         activation: str) -> jax.Array:  # [B, 1 + P, D]
  """Two-layer (quick-)GELU MLP, with biases as in CLIP.

  Not layers.FeedForward: that has no quick-GELU and sizes its hidden layer by
  a multiplier, where CLIP's variants give mlp_dim.
  """
  with hk.name_scope('mlp'):
    h = hk.Linear(mlp_dim, name='hidden')(x)  # [B, 1 + P, M]
    h = ACTIVATIONS[activation](h)  # [B, 1 + P, M]
    return hk.Linear(x.shape[-1], name='output')(h)  # [B, 1 + P, D]


def _residual_block(
    x: jax.Array,  # [B, 1 + P, D]
    num_heads: int,
    mlp_dim: int,
    activation: str,
) -> jax.Array:  # [B, 1 + P, D]
  """Pre-norm self-attention then pre-norm MLP, each residual (with biases)."""
  head_size = x.shape[-1] // num_heads
  h = layer_norm('ln_1')(x)  # [B, 1 + P, D]
  attention = MultiHeadAttention(num_heads, head_size, with_bias=True,
                                 name='attention')
  x = x + attention(h, h)  # [B, 1 + P, D]
  h = layer_norm('ln_2')(x)  # [B, 1 + P, D]
  return x + _mlp(h, mlp_dim, activation)  # [B, 1 + P, D]


class VisionTransformer(hk.Module):
  """CLIP-style ViT: images to patch tokens and a pooled, projected embedding.

  Parameters: `patch_embedding`, `class_embedding`, `position_embeddings`
  (for the `image_size` grid), `ln_pre`, `transformer/...` (stacked over
  depth by `hk.layer_stack`), `ln_post` and `projection` (unless
  `projection=False`). See the module docstring for the other fields.
  """

  def __init__(
      self,
      variant: str = 'L/14',
      *,
      image_size: int = 224,  # The resolution the position embeddings fit.
      activation: str = 'quick_gelu',  # Or 'gelu' (exact).
      tokens: str = 'ln_post',  # Or 'last_block', 'penultimate_block'.
      keep_class_token: bool = False,  # Class token first in `tokens`.
      projection: bool = True,  # False: `pooled` is ln_post(class), [B, D].
      patch_size: Optional[int] = None,  # Sizes: override VIT_PARAMS.
      width: Optional[int] = None,
      depth: Optional[int] = None,
      num_heads: Optional[int] = None,
      mlp_dim: Optional[int] = None,
      embed_dim: Optional[int] = None,
      name: Optional[str] = 'vit',
  ):
    super().__init__(name=name)
    params = sizes(variant, patch_size=patch_size, width=width, depth=depth,
                   num_heads=num_heads, mlp_dim=mlp_dim, embed_dim=embed_dim)
    if activation not in ACTIVATIONS:
      raise ValueError(f'Unknown ViT activation {activation!r}; expected one '
                       f'of {sorted(ACTIVATIONS)}.')
    if tokens not in TOKENS:
      raise ValueError(f'Unknown ViT tokens {tokens!r}; expected one of '
                       f'{TOKENS}.')
    if tokens == 'penultimate_block' and params['depth'] < 2:
      raise ValueError('tokens=penultimate_block needs depth >= 2; got '
                       f"{params['depth']}.")
    self.activation = activation
    self.tokens = tokens
    self.keep_class_token = keep_class_token
    self.with_projection = projection
    self.patch_size: int = params['patch_size']
    self.width: int = params['width']  # D.
    self.depth: int = params['depth']  # Number of residual blocks.
    self.num_heads: int = params['num_heads']
    self.mlp_dim: int = params['mlp_dim']  # M.
    self.embed_dim: int = params['embed_dim']  # E.
    if self.width % self.num_heads:
      raise ValueError(f'width {self.width} must be divisible by num_heads '
                       f'{self.num_heads}.')
    if image_size % self.patch_size:
      raise ValueError(f'image_size must be divisible by the patch size '
                       f'{self.patch_size}; got {image_size}.')
    self.image_size = image_size

  def __call__(
      self,
      images: jax.Array,  # [B, H, W, C]
      *,
      is_training: bool,
  ) -> dict[str, jax.Array]:  # tokens: [B, P, D]; pooled: [B, E]
    """Encodes images; any resolution divisible by the patch size works."""
    # Neither dropout nor batch statistics: the flag is only here so all vision
    # encoders share one interface.
    del is_training
    self._check_images(images)
    x = hk.Conv2D(self.width, kernel_shape=self.patch_size,
                  stride=self.patch_size, padding='VALID', with_bias=False,
                  name='patch_embedding')(images)  # [B, h, w, D]
    batch, grid_h, grid_w, _ = x.shape
    x = x.reshape(batch, grid_h * grid_w, self.width)  # [B, P, D]
    x = self._prepend_class_token(x)  # [B, 1 + P, D]
    positions = self._position_embeddings((grid_h, grid_w))  # [1 + P, D]
    x = x + positions.astype(x.dtype)  # [B, 1 + P, D]
    x = layer_norm('ln_pre')(x)  # [B, 1 + P, D]
    x, penultimate = self._transformer(x)  # [B, 1 + P, D] each
    ln_post = layer_norm('ln_post')
    pooled = ln_post(x[:, 0])  # [B, D]
    if self.with_projection:
      projection = hk.Linear(self.embed_dim, with_bias=False,
                             name='projection')
      pooled = projection(pooled)  # [B, E]
    if self.tokens == 'ln_post':
      x = ln_post(x)  # [B, 1 + P, D]
    elif self.tokens == 'penultimate_block':
      x = penultimate  # [B, 1 + P, D]
    tokens = x if self.keep_class_token else x[:, 1:]  # [B, (1 +) P, D]
    return {'tokens': tokens, 'pooled': pooled}

  def _check_images(self, images: jax.Array) -> None:
    check_rank(images, 4, 'images', '[B, H, W, 3]')
    if images.shape[-1] != _NUM_CHANNELS:
      raise ValueError(f'images must have {_NUM_CHANNELS} channels '
                       f'([B, H, W, 3]); got shape {tuple(images.shape)}.')
    height, width = images.shape[1:3]
    if height % self.patch_size or width % self.patch_size:
      raise ValueError(
          f'image height and width must be divisible by the patch size '
          f'{self.patch_size}; got shape {tuple(images.shape)}.')

  @hk.transparent
  def _transformer(
      self, x: jax.Array) -> tuple[jax.Array, jax.Array]:  # [B, 1 + P, D]
    """The residual blocks; one block is traced and scanned over depth.

    Returns the last block's output and, when `tokens` asks for it, the
    second-to-last's (else the last's again).
    """
    keep = self.depth - 2 if self.tokens == 'penultimate_block' else -1

    def block(y, kept, index):  # [B, 1 + P, D], [B, 1 + P, D], []
      y = _residual_block(y, self.num_heads, self.mlp_dim,
                          self.activation)  # [B, 1 + P, D]
      kept = jnp.where(index == keep, y, kept)  # [B, 1 + P, D]
      return y, kept, index + 1

    # Scanning keeps compile time constant in depth; parameters get a leading
    # [depth] axis under `transformer/`.
    stack = hk.layer_stack(self.depth, name='transformer')
    if keep < 0:
      x = stack(lambda y: _residual_block(y, self.num_heads, self.mlp_dim,
                                          self.activation))(x)
      return x, x  # [B, 1 + P, D] each
    x, kept, _ = stack(block)(x, x, jnp.zeros([], jnp.int32))
    return x, kept  # [B, 1 + P, D] each

  @hk.transparent
  def _prepend_class_token(self, x: jax.Array) -> jax.Array:  # [B, 1 + P, D]
    init = hk.initializers.RandomNormal(stddev=self.width ** -0.5)
    token = hk.get_parameter('class_embedding', [self.width], init=init)  # [D]
    token = jnp.broadcast_to(token.astype(x.dtype),
                             (x.shape[0], 1, self.width))  # [B, 1, D]
    return jnp.concatenate([token, x], axis=1)  # [B, 1 + P, D]

  @hk.transparent
  def _position_embeddings(
      self, grid: tuple[int, int]) -> jax.Array:  # [1 + P, D]
    side = self.image_size // self.patch_size
    init = hk.initializers.RandomNormal(stddev=self.width ** -0.5)
    table = hk.get_parameter('position_embeddings',
                             [1 + side * side, self.width],
                             init=init)  # [1 + g*g, D]
    return resize_position_embeddings(table, grid)  # [1 + P, D]
