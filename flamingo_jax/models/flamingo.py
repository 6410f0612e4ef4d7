"""Flamingo (Alayrac et al., 2022): a frozen LM conditioned on visual tokens.

  media ─vision encoder (frozen)─▶ features ─Perceiver Resampler─▶ visual
  tokens [B, N, R, D]; tokens ─LM blocks (frozen), with GATED XATTN-DENSE
  blocks inserted before some of them─▶ logits [B, L, V].

Every medium is encoded once per forward pass, whatever number of text tokens
attend to it. For generation, `prefill` runs the prompts and returns caches
(self-attention keys/values, and each xattn layer's keys/values of the
visual tokens, computed once) and `decode_step` extends them chunk by chunk
(`models/decoding.py`; `inference/generate.py` drives them). A GATED XATTN-DENSE block is inserted before LM block i for each
i with i % xattn_every == 0 (3B: every layer, 9B: every 4th, 80B: every 7th,
starting at the first); `placement='single_in_middle'` inserts one block
before layer num_layers // 2 (Table 3 v); `xattn_type='vanilla_xattn'` puts
a plain cross-attention inside those LM blocks, between their self-attention
and feed-forward layers, and `xattn_type='grafting'` stacks the new layers on
top of the LM instead (Table 3 iv); `placement='openflamingo'` inserts them
as OpenFlamingo does (`variants.py`).

Variants of published checkpoints (OpenFlamingo, IDEFICS), where they differ
from the paper: `variants.py`.

Top-level parameter paths (the API for freezing, sharding and importers):
  vision_encoder/...        frozen NFNet (or ViT)
  perceiver_resampler/...   trained
  lm/...                    frozen, except lm/eoc_embedding, lm/eoc_unembedding
  gated_xattn/block/...     trained, stacked [num_xattn_layers, ...]

Parameter counts per component (`python -m flamingo_jax.summarize`), next to
the paper's Table 5 (LM / vision / xattn / resampler / total):

  | size | this implementation                      | Table 5                  |
  |------|------------------------------------------|--------------------------|
  | 3B   | 1.44B / 435M / 1.16B / 194M / 3.23B      | 1.4B/435M/1.2B/194M/3.2B |
  | 9B   | 8.99B / 435M / 1.57B / 194M / 11.19B     | 7.1B/435M/1.6B/194M/9.3B |
  | 80B  | 70.3B / 435M / 8.36B / 194M / 79.3B      | 70B/435M/10B/194M/80B    |

The xattn layers follow Table 4 (3B: 24 layers, width 2048, 16 heads; 9B:
10 layers, 4096, 32 heads; 80B: 12 layers, 8192, 64 heads), key size 128
(App. A.1.4), with one exception where the paper contradicts itself: 9B's 32
heads give 1.80B of xattn, not Table 5's 1.6B, which 16 heads give (1.57B).
We keep 16, Table 5's count, as the default; the ablation name
`xattn_heads_32` (experiments/flamingo.py) is Table 4's value. Likewise the
resampler's key size (96 in App. A.1.4, 128 for Table 5's 194M; see
resampler.py, `resampler_kv96`).

Glossary of shapes:
  B: batch size.
  L: number of text tokens.
  N: number of media slots per sequence; T: frames per medium (1 for images).
  H, W: image height and width; C: vision feature width; S: feature tokens.
  R: visual tokens per medium; D: visual token width (resampler width).
  V: vocabulary size including <EOC>.
"""

from collections.abc import Mapping
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from flamingo_jax.models import decoding
from flamingo_jax.models import layers
from flamingo_jax.models import lm as lm_lib
from flamingo_jax.models import nfnet
from flamingo_jax.models import resampler as resampler_lib
from flamingo_jax.models import stacking
from flamingo_jax.models import vit
from flamingo_jax.models import xattn as xattn_lib

PLACEMENTS = ('interleaved', 'single_in_middle', 'openflamingo')

# Per-channel statistics the vision encoders were pretrained with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def normalise_pixels(pixels: jax.Array,  # [..., H, W, 3] uint8
                     encoder: str) -> jax.Array:  # [..., H, W, 3] float32
  """Pixels as `encoder` ('nfnet': ImageNet's statistics; 'vit': CLIP's)
  was pretrained to read them."""
  mean, std = ((IMAGENET_MEAN, IMAGENET_STD) if encoder == 'nfnet'
               else (CLIP_MEAN, CLIP_STD))
  x = pixels.astype(jnp.float32) / 255.0  # [..., H, W, 3]
  return (x - jnp.asarray(mean)) / jnp.asarray(std)  # [..., H, W, 3]


def xattn_positions(num_layers: int, every: int, placement: str,
                    xattn_type: str) -> tuple[int, ...]:
  """LM block indices before which a cross-attention block is inserted.

  For grafting, the number of grafted layers the same `every` gives.
  """
  if placement not in PLACEMENTS:
    raise ValueError(f'Unknown xattn placement {placement!r}; expected one of '
                     f'{PLACEMENTS}.')
  if every < 1:
    raise ValueError(f'xattn every must be >= 1; got {every}.')
  if placement == 'single_in_middle':
    positions = (num_layers // 2,)
  elif placement == 'openflamingo':
    positions = tuple(range(every - 1, num_layers, every))
  else:
    positions = tuple(range(0, num_layers, every))
  if xattn_type == 'grafting':
    return tuple(range(len(positions)))
  return positions


def vision_encoder(config: Mapping[str, Any]) -> hk.Module:
  """The vision encoder of `config['vision']`, named 'vision_encoder' (the
  contrastive pretraining model builds the same one)."""
  kwargs = dict(config)
  encoder = kwargs.pop('encoder')
  if encoder == 'nfnet':
    return nfnet.NFNet(**kwargs, name='vision_encoder')
  if encoder == 'vit':
    return vit.VisionTransformer(**kwargs, name='vision_encoder')
  raise ValueError(f"Unknown vision encoder {encoder!r}; expected 'nfnet' or "
                   "'vit'.")


def _check_one_dtype(x: jax.Array, *params: stacking.Params) -> None:
  """The LM's and the cross-attention's weights must share the embeddings'
  dtype: the interleaved stack carries one residual stream."""
  dtypes = {str(leaf.dtype) for leaf in jax.tree.leaves(params)
            if jnp.issubdtype(leaf.dtype, jnp.floating)} | {str(x.dtype)}
  if len(dtypes) > 1:
    raise TypeError(
        f'The parameters mix dtypes {sorted(dtypes)} (the embeddings give '
        f'{x.dtype}). A training checkpoint keeps its frozen weights in '
        'bfloat16: apply through precision.with_compute_dtype(transform, '
        'dtype), as flamingo_jax.load\'s Model does, or cast the parameters '
        'to one dtype first.')


def _as_dict(config: Mapping[str, Any]) -> dict[str, Any]:
  """A plain nested dict from a dict or an ml_collections.ConfigDict."""
  return config.to_dict() if hasattr(config, 'to_dict') else dict(config)


def _check_inputs(tokens, media, media_mask, media_index) -> None:
  layers.check_rank(tokens, 2, 'tokens', '[B, L]')
  layers.check_rank(media, 6, 'media', '[B, N, T, H, W, 3]')
  layers.check_rank(media_mask, 2, 'media_mask', '[B, N]')
  if media.shape[-1] != 3 or media.shape[2] < 1 or media.shape[1] < 1:
    raise ValueError('media must have shape [B, N>=1, T>=1, H, W, 3]; got '
                     f'shape {tuple(media.shape)}.')
  if media_mask.shape != media.shape[:2]:
    raise ValueError(f'media_mask must have shape [B, N] = {media.shape[:2]} '
                     f'to match media; got shape {tuple(media_mask.shape)}.')
  if media_index.shape != tokens.shape:
    raise ValueError(f'media_index must have the shape of tokens [B, L] = '
                     f'{tuple(tokens.shape)}; got shape '
                     f'{tuple(media_index.shape)}.')
  if media.shape[0] != tokens.shape[0]:
    raise ValueError(f'tokens and media must have the same batch size; got '
                     f'tokens {tuple(tokens.shape)} and media '
                     f'{tuple(media.shape)}.')
  if not isinstance(media_index, jax.core.Tracer):
    most = int(np.max(np.asarray(media_index), initial=0))
    if most > media.shape[1]:
      raise ValueError(
          f'media_index refers to slot {most} but media has shape '
          f'{tuple(media.shape)}, i.e. N={media.shape[1]} slots: more '
          '<image> markers than media.')


class Flamingo:
  """The Flamingo model. Build it inside a Haiku transform.

  Not an `hk.Module` itself, so that its components keep top-level parameter
  paths; the components are built once, in the constructor, so every method
  shares their parameters.
  """

  def __init__(self, config: Mapping[str, Any]):
    config = _as_dict(config)
    self.config = config
    self.vision_encoder = vision_encoder(config['vision'])
    self.resampler = resampler_lib.PerceiverResampler(
        **config['resampler'], name='perceiver_resampler')
    self.lm = lm_lib.DecoderLM(**config['lm'], name='lm')
    xattn = dict(config['xattn'])
    self.attend = xattn.pop('attend')
    every, placement = xattn.pop('every'), xattn.pop('placement')
    # Configs written before the xattn stack had its own policy shared the
    # LM's.
    self.xattn_remat = xattn.pop('remat_policy', self.lm.remat_policy)
    self.xattn_kwargs = xattn
    self.positions = xattn_positions(self.lm.num_layers, every, placement,
                                     xattn['xattn_type'])
    self.stop_vision_gradient = config['stop_vision_gradient']
    self._xattn_memo = None

  def _normalise(self, media: jax.Array) -> jax.Array:
    return normalise_pixels(media, self.config['vision']['encoder'])

  def encode_media(
      self,
      media: jax.Array,  # [B, N, T, H, W, 3] uint8
      media_mask: jax.Array,  # [B, N] bool
      *,
      is_training: bool = False,
  ) -> jax.Array:  # [B, N, R, D]
    """Vision encoder then resampler, once per medium."""
    del media_mask  # Empty slots are encoded too (fixed shapes), never read.
    batch, num_media, frames = media.shape[:3]
    frames_flat = media.reshape(-1, *media.shape[3:])  # [B*N*T, H, W, 3]
    vision_training = is_training and not self.stop_vision_gradient
    features = self.vision_encoder(
        self._normalise(frames_flat), is_training=vision_training)['tokens']  # [B*N*T, S, C]
    if self.stop_vision_gradient:
      features = jax.lax.stop_gradient(features)  # [B*N*T, S, C]
    features = features.reshape(batch * num_media, frames,
                                *features.shape[1:])  # [B*N, T, S, C]
    max_media = self.resampler.max_media
    if max_media is not None and num_media > max_media:
      raise ValueError(f'{num_media} media slots per sample, but the '
                       f'resampler embeds at most max_media={max_media}.')
    slots = jnp.tile(jnp.arange(num_media), batch)  # [B*N]
    visual = self.resampler(features, slots)  # [B*N, R, D]
    return visual.reshape(batch, num_media, *visual.shape[1:])  # [B, N, R, D]

  def __call__(
      self,
      tokens: jax.Array,  # [B, L] int
      media: jax.Array,  # [B, N, T, H, W, 3] uint8
      media_mask: jax.Array,  # [B, N] bool
      media_index: jax.Array,  # [B, L] int, phi (1-based slot, 0 = none)
      *,
      is_training: bool = False,
  ) -> jax.Array:  # [B, L, V]
    _check_inputs(tokens, media, media_mask, media_index)
    visual = self.encode_media(media, media_mask,
                               is_training=is_training)  # [B, N, R, D]
    return self.decode(tokens, visual, media_mask, media_index)  # [B, L, V]

  def decode(
      self,
      tokens: jax.Array,  # [B, L] int
      visual: jax.Array,  # [B, N, R, D]
      media_mask: jax.Array,  # [B, N] bool
      media_index: jax.Array,  # [B, L] int
  ) -> jax.Array:  # [B, L, V]
    """The LM with cross-attention to already encoded media."""
    batch, num_media, num_tokens, width = visual.shape
    routing = xattn_lib.attention_plan(
        media_index, media_mask, num_tokens, self.attend)
    visual = visual.reshape(batch, num_media * num_tokens, width)  # [B, N*R, D]
    positions = lm_lib.default_positions(tokens)  # [B, L]
    xattn_args = (visual, routing, positions)
    # Created here, outside the LM's name scope; init only needs the shape.
    stream = jnp.zeros(tokens.shape + (self.lm.width,), visual.dtype)  # [B, L, D]
    xattn_stack, xattn_params = self._xattn(stream, *xattn_args)

    def trunk(x, lm_blocks, lm_params, positions):
      _check_one_dtype(x, lm_params, xattn_params)
      if self.xattn_kwargs['xattn_type'] == 'grafting':
        x = lm_blocks.scan(lm_params, x, positions)  # [B, L, D]
        return xattn_stack.scan(xattn_params, x, *xattn_args)  # [B, L, D]
      return stacking.interleave(
          x, main=lm_blocks, main_params=lm_params, main_args=(positions,),
          inserted=xattn_stack, inserted_params=xattn_params,
          inserted_args=xattn_args, positions=self.positions,
          inside=self._inside)  # [B, L, D]

    return self.lm(tokens, trunk=trunk)  # [B, L, V]

  def _xattn(self, *example_args) -> tuple[stacking.Stack, stacking.Params]:
    """The xattn stack and its parameters, fetched once per instance.

    `example_args` (a block's inputs) are only read at init.
    """
    if self._xattn_memo is None:
      stack = stacking.Stack(
          lambda: xattn_lib.GatedXAttnDense(**self.xattn_kwargs, name='block'),
          len(self.positions), name='gated_xattn',
          remat_policy=stacking.remat_policy(self.xattn_remat))
      self._xattn_memo = stack, stack.params(*example_args)
    return self._xattn_memo

  @property
  def _grafting(self) -> bool:
    return self.xattn_kwargs['xattn_type'] == 'grafting'

  @property
  def _inside(self) -> bool:
    """The xattn layer runs inside its LM block (vanilla_xattn)."""
    return self.xattn_kwargs['xattn_type'] == 'vanilla_xattn'

  def prefill(
      self,
      tokens: jax.Array,  # [B, P] int: the prompts, left-padded
      valid: jax.Array,  # [B, P] bool: False on padding
      media_index: jax.Array,  # [B, P] int: phi
      visual: jax.Array,  # [B, N, R, D] from `encode_media`
      media_mask: jax.Array,  # [B, N] bool
      capacity: int,  # S >= P: the prompt plus every token to come
  ) -> tuple[jax.Array, decoding.DecodeState]:  # [B, P, V], state
    """Runs the prompts and returns their caches (see `models/decoding.py`).

    Each xattn layer computes its keys/values of the visual tokens here,
    once; `decode_step` reuses them. Apply only: parameters come from
    `transform(config).init`.
    """
    if hk.running_init():
      raise ValueError('Initialise Flamingo with transform(config).init; '
                       'generation reuses those parameters.')
    layers.check_rank(visual, 4, 'visual tokens', '[B, N, R, D]')
    if tokens.shape[1] > capacity:
      raise ValueError(f'The prompt ({tokens.shape[1]} tokens) is longer '
                       f'than the cache capacity ({capacity}).')
    batch, num_media, num_tokens, width = visual.shape
    lm = self.lm
    grafted = None
    if self._grafting:
      grafted = decoding.empty_kv(
          len(self.positions), batch, capacity, self.xattn_kwargs['num_heads'],
          self.xattn_kwargs['head_size'], visual.dtype)
    state = decoding.DecodeState(
        lm=decoding.empty_kv(lm.num_layers, batch, capacity, lm.kv_heads,
                             lm.head_size, visual.dtype),
        grafted=grafted,
        cross_kv=None,  # Computed by the prompt's chunk.
        media_mask=media_mask.astype(bool),
        key_positions=jnp.zeros([batch, capacity], jnp.int32),
        key_mask=jnp.zeros([batch, capacity], bool),
        next_position=jnp.zeros([batch], jnp.int32),
        index=jnp.zeros([], jnp.int32))
    flat = visual.reshape(batch, num_media * num_tokens, width)  # [B, M, D]
    return self._run_chunk(tokens, valid, media_index, state, num_tokens,
                           visual=flat)

  def decode_step(
      self,
      tokens: jax.Array,  # [B, L] int: the next chunk (often one token)
      valid: jax.Array,  # [B, L] bool: False on padding
      media_index: jax.Array,  # [B, L] int: phi of each token
      state: decoding.DecodeState,
  ) -> tuple[jax.Array, decoding.DecodeState]:  # [B, L, V], next state
    """The model on the next chunk, reading and extending the caches.

    The logits of every valid token equal those `__call__` gives it in the
    whole unpadded sequence (tests check this).
    """
    if state.cross_kv is None:
      raise ValueError('decode_step needs the state returned by prefill.')
    num_media = state.media_mask.shape[1]
    tokens_per_medium = state.cross_kv.key.shape[2] // num_media
    return self._run_chunk(tokens, valid, media_index, state,
                           tokens_per_medium)

  def _run_chunk(self, tokens, valid, media_index, state, tokens_per_medium,
                 visual=None):
    layers.check_rank(tokens, 2, 'tokens', '[B, L]')
    if valid.shape != tokens.shape or media_index.shape != tokens.shape:
      raise ValueError(
          f'valid and media_index must have the shape of tokens '
          f'{tuple(tokens.shape)}; got {tuple(valid.shape)} and '
          f'{tuple(media_index.shape)}.')
    if state.capacity < tokens.shape[1]:
      raise ValueError(f'A chunk of {tokens.shape[1]} tokens does not fit '
                       f'a cache of capacity {state.capacity}.')
    valid = valid.astype(bool)
    positions, view = decoding.begin_chunk(state, valid)  # [B, L]
    routing = xattn_lib.attention_plan(
        media_index, state.media_mask, tokens_per_medium, self.attend)
    xattn_stack, xattn_params = self._xattn()  # Apply only: fetched.
    xattn_args = (visual, routing, positions, view)
    xattn_per_layer = {}
    if visual is None:
      xattn_per_layer['cross_kv'] = state.cross_kv
    if self._grafting:
      xattn_per_layer['cache'] = state.grafted

    def trunk(x, lm_blocks, lm_params, positions):
      _check_one_dtype(x, lm_params, xattn_params)
      main_per_layer = {'cache': state.lm}
      if self._grafting:
        x, lm_chunk = lm_blocks.scan(lm_params, x, positions, view,
                                     per_layer=main_per_layer)  # [B, L, D]
        x, updates = xattn_stack.scan(xattn_params, x, *xattn_args,
                                      per_layer=xattn_per_layer)  # [B, L, D]
        return x, (lm_chunk, updates)
      x, lm_chunk, updates = stacking.interleave(
          x, main=lm_blocks, main_params=lm_params,
          main_args=(positions, view), main_per_layer=main_per_layer,
          inserted=xattn_stack, inserted_params=xattn_params,
          inserted_args=xattn_args, inserted_per_layer=xattn_per_layer,
          positions=self.positions, inside=self._inside)  # [B, L, D]
      return x, (lm_chunk, updates)

    logits, (lm_chunk, updates) = self.lm(tokens, trunk=trunk,
                                          positions=positions)  # [B, L, V]
    state = decoding.end_chunk(state, view, valid, lm_chunk,
                               updates.get('cache'))
    if 'cross_kv' in updates:
      state = state._replace(cross_kv=updates['cross_kv'])
    return logits, state


# The paper's sizes (Table 4). Components are named by their own tables.
FLAMINGO_SIZES = {
    '3B': dict(lm='3B', xattn_every=1, xattn_heads=16),
    # Table 4 says 32 heads; 16 give Table 5's count (module docstring).
    '9B': dict(lm='9B', xattn_every=4, xattn_heads=16),
    '80B': dict(lm='80B', xattn_every=7, xattn_heads=64),
    'tiny': dict(lm='tiny', xattn_every=1, xattn_heads=4, xattn_head_size=16,
                 vision='tiny', image_size=64, resampler='tiny'),
}


def model_config(size: str = '3B') -> dict[str, Any]:
  """The model section of a config (plain dict) for one of FLAMINGO_SIZES."""
  if size not in FLAMINGO_SIZES:
    raise ValueError(f'Unknown Flamingo size {size!r}; expected one of '
                     f'{sorted(FLAMINGO_SIZES)}.')
  spec = FLAMINGO_SIZES[size]
  resampler = dict(resampler_lib.RESAMPLER_PARAMS[spec.get('resampler',
                                                           'medium')])
  resampler.setdefault('num_latents', 64)
  resampler.update(max_frames=8, resampler_type='perceiver')
  return dict(
      vision=dict(encoder='nfnet', variant=spec.get('vision', 'F6')),
      image_size=spec.get('image_size', 320),
      resampler=resampler,
      lm=dict(lm_lib.LM_PARAMS[spec['lm']], remat_policy='none',
              tied_embeddings=False),
      xattn=dict(
          every=spec['xattn_every'],
          placement='interleaved',
          xattn_type='gated_xattn_dense',
          gating='tanh',
          attend='last_image',
          num_heads=spec['xattn_heads'],
          head_size=spec.get('xattn_head_size', 128),
          ffw_multiplier=4,
          remat_policy='none',  # The xattn stack's own; see stacking.py.
      ),
      stop_vision_gradient=True,
  )


def transform(config: Mapping[str, Any]) -> hk.Transformed:
  """`init(rng, tokens, media, media_mask, media_index, is_training=...)`."""

  def forward(tokens, media, media_mask, media_index, is_training=False):
    return Flamingo(config)(tokens, media, media_mask, media_index,
                            is_training=is_training)

  return hk.transform(forward)


def transform_lm(config: Mapping[str, Any]) -> hk.Transformed:
  """The LM of Flamingo `config` alone, with Flamingo's inputs (the media
  are ignored): the model of an LM pretraining stage (`config.task = 'lm'`).
  Its parameters are Flamingo's `lm/...`, so they initialise Flamingo's LM;
  with the gates closed, Flamingo computes exactly this function.
  """

  def forward(tokens, media, media_mask, media_index, is_training=False):
    del media, media_mask, media_index, is_training  # Text alone.
    return lm_lib.DecoderLM(**_as_dict(config)['lm'], name='lm')(tokens)

  return hk.transform(forward)


def example_inputs(config: Mapping[str, Any], batch: int = 1,
                   seq_len: int = 8, num_media: int = 1,
                   frames: int = 1) -> tuple[jax.Array, ...]:
  """Zero inputs of the right shapes (for init and `jax.eval_shape`)."""
  size = config['image_size']
  tokens = jnp.zeros([batch, seq_len], jnp.int32)
  media = jnp.zeros([batch, num_media, frames, size, size, 3], jnp.uint8)
  media_mask = jnp.ones([batch, num_media], bool)
  media_index = jnp.ones([batch, seq_len], jnp.int32)
  return tokens, media, media_mask, media_index


def abstract_params(config: Mapping[str, Any]) -> hk.Params:
  """Parameter shapes and dtypes without allocating them (`jax.eval_shape`)."""
  model = transform(config)
  return jax.eval_shape(model.init, jax.random.PRNGKey(0),
                        *example_inputs(config))
