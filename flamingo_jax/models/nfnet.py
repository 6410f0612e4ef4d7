"""NFNet, the normaliser-free vision encoder of Flamingo (Brock et al., 2021).

"High-Performance Large-Scale Image Recognition Without Normalization",
variants F0-F6. There is no batch norm: scaled weight standardisation keeps
each conv variance-preserving, and every residual block is computed as

  out = shortcut + alpha * skip_gain * f(activation(x) * beta)

where `beta = 1 / sqrt(expected variance of x)` is known analytically, `alpha`
sets how fast the variance grows per block, and `skip_gain` starts at zero so
that each block is the identity on its shortcut path at initialisation.

Flamingo uses the final conv's spatial grid as visual tokens (`tokens`) and
its spatial mean (`pooled`) for the contrastive pretraining head.

Numerics of published weights. The defaults are DeepMind's Haiku release
(deepmind-research `nfnets/`): GELU with its tanh approximation
(`jax.nn.gelu`), and a standardised kernel `(w - mean) / sqrt(max(fan_in *
var, 1e-4)) * gain`. timm's `dm_nfnet_f*` port of those weights computes
exact (erf) GELU and `(w - mean) / sqrt(fan_in * (var + 1e-5)) * gain`
(`F.batch_norm` over the kernel); `gelu_approximate=False,
weight_standardization='timm'` reproduces timm's outputs. Both read the same
parameters (timm's padding, 'SAME' for every conv, and its average-pool
shortcut match ours on the multiple-of-32 inputs this encoder takes).

Data parallelism: the grouped convs run each batch device on its own rows
(`batch_split.split_over_batch`; see batch_split.py for why).

Glossary of shapes:
  B: batch size.
  H, W: input image height and width (multiples of 32).
  h, w: output grid height and width, H / 32 and W / 32.
  Hs, Ws: spatial size inside the network (H/2 ... H/32).
  Cin, C': input and output channels of a layer.
  G: channels of a bottleneck block (out channels x expansion, a multiple of
     the group width).
  C: feature width of the encoder, 2 x the last stage width (3072 for F0-F6).
  N: number of classes of the optional classification head.
"""

import functools
from typing import NamedTuple, Optional

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from flamingo_jax.models import batch_split
from flamingo_jax.models.layers import check_rank

# Variant table. `widths`/`depths`: per stage; `*_imsize`: the paper's train
# and test resolutions; `drop_rate`: dropout before the classifier;
# `stem_widths`: output channels of the four stem convs; `group_width`:
# channels per group of the grouped 3x3 convs.
_F_SERIES = {
    'widths': (256, 512, 1536, 1536),
    'stem_widths': (16, 32, 64, 128),
    'group_width': 128,
}
NFNET_PARAMS: dict[str, dict] = {
    'F0': {**_F_SERIES, 'depths': (1, 2, 6, 3), 'train_imsize': 192,
           'test_imsize': 256, 'drop_rate': 0.2},
    'F1': {**_F_SERIES, 'depths': (2, 4, 12, 6), 'train_imsize': 224,
           'test_imsize': 320, 'drop_rate': 0.3},
    'F2': {**_F_SERIES, 'depths': (3, 6, 18, 9), 'train_imsize': 256,
           'test_imsize': 352, 'drop_rate': 0.4},
    'F3': {**_F_SERIES, 'depths': (4, 8, 24, 12), 'train_imsize': 320,
           'test_imsize': 416, 'drop_rate': 0.4},
    'F4': {**_F_SERIES, 'depths': (5, 10, 30, 15), 'train_imsize': 384,
           'test_imsize': 512, 'drop_rate': 0.5},
    'F5': {**_F_SERIES, 'depths': (6, 12, 36, 18), 'train_imsize': 416,
           'test_imsize': 544, 'drop_rate': 0.5},
    'F6': {**_F_SERIES, 'depths': (7, 14, 42, 21), 'train_imsize': 448,
           'test_imsize': 576, 'drop_rate': 0.5},
    # For CPU tests only: same topology, ~50k parameters; stage 2 has one
    # identity-shortcut block.
    'tiny': {'widths': (16, 32, 64, 64), 'depths': (1, 1, 2, 1),
             'stem_widths': (4, 8, 8, 8), 'group_width': 8,
             'train_imsize': 32, 'test_imsize': 64, 'drop_rate': 0.2},
}

# Architecture constants shared by all variants.
ALPHA = 0.2  # Residual branch scale: each block adds alpha^2 to the variance.
EXPANSION = 0.5  # Bottleneck width relative to the block's output width.
SE_RATIO = 0.5  # Squeeze-excite hidden width relative to its input width.
STAGE_STRIDES = (1, 2, 2, 2)  # Stride of each stage's first block.
STEM_STRIDES = (2, 1, 1, 2)
FINAL_CONV_MULT = 2  # final_conv width relative to the last stage width.
TOTAL_STRIDE = 32  # Product of the stem and stage strides.
# 1 / std(gelu(z)) for z ~ N(0, 1): keeps activations variance-preserving.
GELU_GAMMA = 1.7015043497085571


def _variant_params(variant: str) -> dict:
  if variant not in NFNET_PARAMS:
    raise ValueError(
        f'Unknown NFNet variant {variant!r}; expected one of '
        f'{sorted(NFNET_PARAMS)}.')
  return NFNET_PARAMS[variant]


def feature_width(variant: str) -> int:
  """Returns C, the channel width of the tokens of `variant` (3072 for F*)."""
  return FINAL_CONV_MULT * _variant_params(variant)['widths'][-1]


def scaled_gelu(x: jax.Array, approximate: bool = True) -> jax.Array:
  """GELU times gamma, so that N(0, 1) inputs give unit-variance outputs."""
  return jax.nn.gelu(x, approximate=approximate) * GELU_GAMMA


# How the kernel's variance is guarded: DeepMind's floor on fan_in * var, or
# timm's epsilon added to var (see the module docstring).
WEIGHT_STANDARDIZATIONS = ('deepmind', 'timm')
_TIMM_WS_EPS = 1e-5


class WSConv2D(hk.Module):
  """2D conv with scaled weight standardisation, a learned gain and a bias.

  The kernel is standardised over its fan-in to zero mean and variance
  1 / fan_in, so the conv preserves the variance of its inputs without any
  activation normalisation. Parameters: `w`, `gain` and `bias`.
  """

  def __init__(
      self,
      output_channels: int,
      kernel_size: int,
      stride: int = 1,
      feature_group_count: int = 1,
      eps: float = 1e-4,
      weight_standardization: str = 'deepmind',
      name: Optional[str] = None,
  ):
    super().__init__(name=name)
    if weight_standardization not in WEIGHT_STANDARDIZATIONS:
      raise ValueError(
          f'Unknown weight_standardization {weight_standardization!r}; '
          f'expected one of {WEIGHT_STANDARDIZATIONS}.')
    self.output_channels = output_channels
    self.kernel_size = kernel_size
    self.stride = stride
    self.feature_group_count = feature_group_count
    self.eps = eps  # Floor on fan_in * var, guarding against a constant kernel.
    self.weight_standardization = weight_standardization

  def standardized_kernel(self, in_channels: int,
                          dtype: jnp.dtype) -> jax.Array:
    """The kernel after standardisation, [k, k, Cin / groups, C']."""
    k = self.kernel_size
    shape = (k, k, in_channels // self.feature_group_count,
             self.output_channels)
    # WS makes the result insensitive to the init scale; fan-in is customary.
    w_init = hk.initializers.VarianceScaling(1.0, 'fan_in', 'normal')
    w = hk.get_parameter('w', shape, dtype, init=w_init)  # [k, k, Cin/g, C']
    gain = hk.get_parameter('gain', (self.output_channels,), dtype,
                            init=jnp.ones)  # [C']
    # Standardise in float32: the variance of a bf16 kernel is too coarse.
    w = w.astype(jnp.float32)  # [k, k, Cin/g, C']
    mean = jnp.mean(w, axis=(0, 1, 2), keepdims=True)  # [1, 1, 1, C']
    var = jnp.var(w, axis=(0, 1, 2), keepdims=True)  # [1, 1, 1, C']
    fan_in = np.prod(shape[:-1])
    if self.weight_standardization == 'timm':
      scale = jax.lax.rsqrt(
          (var + _TIMM_WS_EPS) * fan_in) * gain  # [1, 1, 1, C']
    else:
      scale = jax.lax.rsqrt(
          jnp.maximum(var * fan_in, self.eps)) * gain  # [1, 1, 1, C']
    return ((w - mean) * scale).astype(dtype)  # [k, k, Cin/g, C']

  def __call__(self, x: jax.Array) -> jax.Array:  # [B, Hs, Ws, Cin]
    kernel = self.standardized_kernel(x.shape[-1], x.dtype)  # [k, k, Cin/g, C']
    conv = functools.partial(
        jax.lax.conv_general_dilated,
        window_strides=(self.stride, self.stride), padding='SAME',
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
        feature_group_count=self.feature_group_count)
    if self.feature_group_count > 1:
      # XLA would run it on the whole batch (see the module docstring).
      out = batch_split.split_over_batch(conv, x, kernel)  # [B, Hs/s, Ws/s, C']
    else:
      out = conv(x, kernel)  # [B, Hs/s, Ws/s, C']
    bias = hk.get_parameter('bias', (self.output_channels,), x.dtype,
                            init=jnp.zeros)  # [C']
    return out + bias  # [B, Hs/s, Ws/s, C']


class SqueezeExcite(hk.Module):
  """Channel gates in (0, 1) from the spatial mean: `fc0`, ReLU, `fc1`."""

  def __init__(self, hidden_channels: int, name: str = 'squeeze_excite'):
    super().__init__(name=name)
    self.hidden_channels = hidden_channels

  def __call__(self, x: jax.Array) -> jax.Array:  # [B, Hs, Ws, C']
    h = jnp.mean(x, axis=(1, 2))  # [B, C']
    h = jax.nn.relu(hk.Linear(self.hidden_channels, name='fc0')(h))  # [B, C'/2]
    h = hk.Linear(x.shape[-1], name='fc1')(h)  # [B, C']
    return jax.nn.sigmoid(h)[:, None, None, :]  # [B, 1, 1, C']


def drop_path(x: jax.Array, rate: float, rng: jax.Array) -> jax.Array:
  """Zeroes whole examples of a residual branch with probability `rate`.

  As in the NFNet release, kept examples are not rescaled by 1 / (1 - rate).
  """
  keep = jax.random.bernoulli(
      rng, 1.0 - rate, (x.shape[0], 1, 1, 1))  # [B, 1, 1, 1]
  return x * keep.astype(x.dtype)  # [B, Hs, Ws, C']


class NFBlock(hk.Module):
  """NF bottleneck block: 1x1, grouped 3x3, grouped 3x3, 1x1, squeeze-excite.

  Submodules: `conv0`, `conv1` (strided), `conv1b`, `conv2`, `squeeze_excite`,
  and `conv_shortcut` when the block changes width or resolution; plus the
  scalar parameter `skip_gain`, zero at init.
  """

  def __init__(
      self,
      output_channels: int,
      *,
      stride: int = 1,
      beta: float = 1.0,
      alpha: float = ALPHA,
      group_width: int = 128,
      stochastic_depth_rate: float = 0.0,
      gelu_approximate: bool = True,
      weight_standardization: str = 'deepmind',
      name: Optional[str] = None,
  ):
    super().__init__(name=name)
    self.act = functools.partial(scaled_gelu, approximate=gelu_approximate)
    self.conv = functools.partial(
        WSConv2D, weight_standardization=weight_standardization)
    self.output_channels = output_channels
    self.stride = stride
    self.beta = beta  # 1 / std of the block input expected at init.
    self.alpha = alpha
    groups = int(output_channels * EXPANSION) // group_width
    if groups < 1:
      raise ValueError(
          f'Bottleneck width {int(output_channels * EXPANSION)} is smaller '
          f'than the group width {group_width}.')
    self.groups = groups
    self.width = groups * group_width  # G, rounded to whole groups.
    self.stochastic_depth_rate = stochastic_depth_rate

  # hk.transparent keeps method names (`~shortcut`) out of parameter paths.
  @hk.transparent
  def shortcut(self, x: jax.Array, normed: jax.Array) -> jax.Array:
    """The block's output at init: identity, or pool and 1x1 projection."""
    # [B, Hs, Ws, Cin] -> [B, Hs/s, Ws/s, C']
    if self.stride == 1 and x.shape[-1] == self.output_channels:
      return x  # [B, Hs, Ws, C']
    if self.stride > 1:
      s = self.stride
      normed = hk.avg_pool(normed, (1, s, s, 1), (1, s, s, 1),
                           padding='SAME')  # [B, Hs/s, Ws/s, Cin]
    return self.conv(self.output_channels, 1,
                     name='conv_shortcut')(normed)  # [B, Hs/s, Ws/s, C']

  @hk.transparent
  def residual(self, normed: jax.Array) -> jax.Array:  # [B, Hs, Ws, Cin]
    """The residual branch, before stochastic depth and `skip_gain`."""
    out = self.conv(self.width, 1, name='conv0')(normed)  # [B, Hs, Ws, G]
    out = self.conv(self.width, 3, stride=self.stride,
                    feature_group_count=self.groups,
                    name='conv1')(self.act(out))  # [B, Hs/s, Ws/s, G]
    out = self.conv(self.width, 3, feature_group_count=self.groups,
                    name='conv1b')(self.act(out))  # [B, Hs/s, Ws/s, G]
    out = self.conv(self.output_channels, 1,
                    name='conv2')(self.act(out))  # [B, Hs/s, Ws/s, C']
    hidden = int(self.output_channels * SE_RATIO)
    gates = SqueezeExcite(hidden)(out)  # [B, 1, 1, C']
    # Times 2 since the sigmoid gates start near 0.5, halving the variance.
    return 2.0 * gates * out  # [B, Hs/s, Ws/s, C']

  def __call__(self, x: jax.Array, *, is_training: bool) -> jax.Array:
    # [B, Hs, Ws, Cin] -> [B, Hs/s, Ws/s, C']
    normed = self.act(x) * self.beta  # [B, Hs, Ws, Cin]
    shortcut = self.shortcut(x, normed)  # [B, Hs/s, Ws/s, C']
    out = self.residual(normed)  # [B, Hs/s, Ws/s, C']
    if is_training and self.stochastic_depth_rate > 0.0:
      out = drop_path(out, self.stochastic_depth_rate,
                      hk.next_rng_key())  # [B, Hs/s, Ws/s, C']
    skip_gain = hk.get_parameter('skip_gain', (), out.dtype, init=jnp.zeros)
    return shortcut + self.alpha * skip_gain * out  # [B, Hs/s, Ws/s, C']


class BlockSpec(NamedTuple):
  """Hyperparameters of one NFBlock in the network."""
  name: str
  output_channels: int
  stride: int
  beta: float
  stochastic_depth_rate: float


def block_schedule(variant: str,
                   stochastic_depth_rate: float) -> list[BlockSpec]:
  """Per-block widths, strides, betas and drop rates of `variant`.

  Each block's `beta` is 1 / std of its input expected at init: the variance
  grows by alpha^2 per block and is reset to 1 + alpha^2 after each stage's
  first block, whose projection shortcut sees a unit-variance input. Drop
  rates grow linearly with the overall block index, from 0.
  """
  params = _variant_params(variant)
  num_blocks = sum(params['depths'])
  specs = []
  expected_std = 1.0
  for stage, (width, depth, stride) in enumerate(
      zip(params['widths'], params['depths'], STAGE_STRIDES)):
    for block in range(depth):
      specs.append(BlockSpec(
          name=f'stage{stage}_block{block}',
          output_channels=width,
          stride=stride if block == 0 else 1,
          beta=1.0 / expected_std,
          stochastic_depth_rate=(
              stochastic_depth_rate * len(specs) / num_blocks)))
      if block == 0:
        expected_std = 1.0
      expected_std = (expected_std ** 2 + ALPHA ** 2) ** 0.5
  return specs


def check_images(images: jax.Array) -> None:
  """Raises a ValueError unless images are [B, H, W, 3], H and W % 32 == 0."""
  layout = f'[B, H, W, 3] with H and W positive multiples of {TOTAL_STRIDE}'
  check_rank(images, 4, 'NFNet images', layout)
  _, height, width, channels = images.shape
  if (channels != 3 or height < TOTAL_STRIDE or width < TOTAL_STRIDE
      or height % TOTAL_STRIDE or width % TOTAL_STRIDE):
    raise ValueError(
        f'NFNet images must be {layout}; got shape {tuple(images.shape)}.')


class NFNet(hk.Module):
  """NFNet-F* image encoder, with an optional classification head.

  Submodules: `stem_conv0`..`stem_conv3`, `stage{i}_block{j}` (NFBlock),
  `final_conv`, and `classifier` when `num_classes` is set.
  """

  def __init__(
      self,
      variant: str = 'F6',
      *,
      num_classes: Optional[int] = None,
      stochastic_depth_rate: float = 0.1,
      gelu_approximate: bool = True,
      weight_standardization: str = 'deepmind',
      name: str = 'nfnet',
  ):
    """Builds the encoder.

    Args:
      variant: a key of NFNET_PARAMS ('F0'..'F6', or 'tiny' for tests).
      num_classes: if set, adds dropout and a zero-initialised linear head
        producing `logits`.
      stochastic_depth_rate: block i of n drops its residual branch with
        probability rate * i / n (per example), only when training.
      gelu_approximate: tanh-approximated GELU (DeepMind's release) or the
        exact one (timm's port); see the module docstring.
      weight_standardization: 'deepmind' or 'timm' (module docstring).
      name: module name, the root of every parameter path.
    """
    super().__init__(name=name)
    self.params = _variant_params(variant)
    if not 0.0 <= stochastic_depth_rate < 1.0:
      raise ValueError(
          f'stochastic_depth_rate must be in [0, 1); got '
          f'{stochastic_depth_rate}.')
    if weight_standardization not in WEIGHT_STANDARDIZATIONS:
      raise ValueError(
          f'Unknown weight_standardization {weight_standardization!r}; '
          f'expected one of {WEIGHT_STANDARDIZATIONS}.')
    self.variant = variant
    self.num_classes = num_classes
    self.stochastic_depth_rate = stochastic_depth_rate
    self.numerics = dict(gelu_approximate=gelu_approximate,
                         weight_standardization=weight_standardization)
    self.act = functools.partial(scaled_gelu, approximate=gelu_approximate)

  @hk.transparent
  def _stem(self, images: jax.Array) -> jax.Array:  # [B, H, W, 3]
    out = images
    for i, (width, stride) in enumerate(
        zip(self.params['stem_widths'], STEM_STRIDES)):
      if i > 0:
        out = self.act(out)  # [B, Hs, Ws, Cin]
      out = WSConv2D(width, 3, stride=stride,
                     weight_standardization=self.numerics[
                         'weight_standardization'],
                     name=f'stem_conv{i}')(out)  # [B, Hs, Ws, C']
    # No final activation: every block starts with one.
    return out  # [B, H/4, W/4, C']

  @hk.transparent
  def _classify(self, pooled: jax.Array, is_training: bool) -> jax.Array:
    drop_rate = self.params['drop_rate']  # [B, C] -> [B, N]
    if is_training and drop_rate > 0.0:
      pooled = hk.dropout(hk.next_rng_key(), drop_rate, pooled)  # [B, C]
    return hk.Linear(self.num_classes, w_init=jnp.zeros,
                     name='classifier')(pooled)  # [B, N]

  def __call__(self, images: jax.Array, *,
               is_training: bool) -> dict[str, jax.Array]:
    """Encodes images into a grid of visual tokens.

    Args:
      images: [B, H, W, 3] float images, already normalised; H and W
        multiples of 32.
      is_training: enables stochastic depth and head dropout (both need an
        rng).

    Returns:
      'tokens': [B, h*w, C], the final conv's activations, row-major.
      'pooled': [B, C], their spatial mean.
      'logits': [B, N], only when `num_classes` is set.
    """
    check_images(images)
    batch_split.log_unsplit_batch(images.shape[0], 'NFNet')
    out = self._stem(images)  # [B, H/4, W/4, C']
    for spec in block_schedule(self.variant, self.stochastic_depth_rate):
      out = NFBlock(
          spec.output_channels, stride=spec.stride, beta=spec.beta,
          group_width=self.params['group_width'],
          stochastic_depth_rate=spec.stochastic_depth_rate,
          **self.numerics, name=spec.name)(
              out, is_training=is_training)  # [B, Hs, Ws, C']
    width = FINAL_CONV_MULT * out.shape[-1]
    out = self.act(WSConv2D(
        width, 1,
        weight_standardization=self.numerics['weight_standardization'],
        name='final_conv')(out))  # [B, h, w, C]
    outputs = {
        'tokens': out.reshape(out.shape[0], -1, width),  # [B, h*w, C]
        'pooled': jnp.mean(out, axis=(1, 2)),  # [B, C]
    }
    if self.num_classes is not None:
      outputs['logits'] = self._classify(outputs['pooled'],
                                         is_training)  # [B, N]
    return outputs
