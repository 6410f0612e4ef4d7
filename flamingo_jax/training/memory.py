"""Bytes per device of a train step (`mesh_choice.py` picks a mesh with it).

`plan(config, slice_, mesh)` adds up what one device holds while it runs
the train step on `mesh` (sizes of 'data', 'fsdp', 'model'):

  state (exact: `jax.eval_shape` of the train state and its shardings)
    trainable params   fp32, split as `config.param_rules` say
    frozen params      bf16 (vision encoder and LM)
    optimizer state    Adam's moments, fp32, also split over `zero_axis`
    batch              the step's inputs, split over ('data', 'fsdp')
  temporaries (estimated from the config, below)
    gradients          fp32 like the trainable params; a second copy while
                       several datasets' gradients are accumulated, a third
                       for micro-batch accumulation (the data-parallel
                       all-reduce reuses the buffer)
    weight copies      parameters the backward pass reads (all but the
                       frozen vision encoder's) cast to the compute dtype;
                       with FSDP, one layer group's weights gathered (twice:
                       prefetch)
    activations        what autodiff saves for the backward pass, of every
                       dataset (XLA keeps them all until the update), plus
                       the largest working set on top (`working`)

Saved activations per example follow from the layer shapes and each stack's
rematerialisation policy ('none' / 'dots' / 'full'): the LM blocks follow
`model.lm.remat_policy`, the cross-attention layers (GATED XATTN-DENSE or
grafted) `model.xattn.remat_policy` (`stacking.REMAT_POLICIES`; a config
without it shares the LM's, as `models/flamingo.py` does). The counts (e.g.
a frozen LM block without remat keeps five [L, 4D] arrays of its GELU, ten
[L, D] fp32 arrays of its two RMSNorms, q, k, v and the fp32 and
compute-dtype attention weights) are those JAX's autodiff saves for this
code; tests/test_plan.py checks them against the residuals of the traced
backward pass for each pair of policies.
Under model parallelism the head, feed-forward and vocabulary dimensions
split over 'model'; widths D do not.

The working set is the largest of: one layer recomputed and
differentiated (remat; its matmul outputs, the rest fused), the loss over the vocabulary, and the frozen vision
encoder's forward pass (nothing of it is saved; its activations live one
block at a time; each device encodes only its own rows of the batch). It is the least certain term: XLA's buffer assignment and
fusion decide it, and they differ between backends (see tests/test_plan.py
for how close the whole estimate comes to `compiled.memory_analysis()`).
"""

from collections.abc import Mapping, Sequence
import dataclasses
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections

from flamingo_jax.models import flamingo
from flamingo_jax.models import nfnet
from flamingo_jax.models import vit
from flamingo_jax.training import loop

AXES = ('data', 'fsdp', 'model')
F32 = 4


def _itemsize(dtype: Any) -> int:
  return jnp.dtype(dtype).itemsize


def shard_bytes(abstract: Any, shardings: Any) -> int:
  """Bytes one device holds of `abstract` (ShapeDtypeStructs) so sharded."""
  total = 0
  for leaf, spec in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)):
    total += math.prod(spec.shard_shape(leaf.shape)) * _itemsize(leaf.dtype)
  return total


def abstract_mesh(sizes: Sequence[int]) -> jax.sharding.AbstractMesh:
  """A (data, fsdp, model) mesh of `sizes` that needs no devices."""
  return jax.sharding.AbstractMesh(
      tuple(sizes), AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)


# ---------------------------------------------------------------- shapes --


@dataclasses.dataclass(frozen=True)
class ModelDims:
  """The sizes the activation counts need, read from `config.model`."""
  lm_layers: int
  width: int  # D.
  heads: int  # H.
  head_size: int  # K.
  ffw: int  # F, the LM's feed-forward width.
  vocab: int  # V, including <EOC>.
  xattn_layers: int
  xattn_heads: int
  xattn_head_size: int
  xattn_ffw: int
  grafting: bool  # Grafted layers follow the LM's remat policy.
  resampler_layers: int
  resampler_width: int  # Dr.
  resampler_heads: int
  resampler_head_size: int
  resampler_ffw: int
  latents: int  # R (all input tokens for the latent-free ablations).
  perceiver: bool
  feature_width: int  # Din, the vision encoder's output width.
  vision_tokens: int  # Spatial tokens per frame.
  vision_peak: int  # Largest activation of one image (elements).

  @classmethod
  def from_config(cls, model: Mapping[str, Any]) -> 'ModelDims':
    model = model.to_dict() if hasattr(model, 'to_dict') else dict(model)
    lm, xattn, resampler = model['lm'], model['xattn'], model['resampler']
    vision, image = model['vision'], model['image_size']
    positions = flamingo.xattn_positions(
        lm['num_layers'], xattn['every'], xattn['placement'],
        xattn['xattn_type'])
    tokens, peak, din = _vision_shape(vision, image)
    perceiver = resampler.get('resampler_type', 'perceiver') == 'perceiver'
    grafting = xattn['xattn_type'] == 'grafting'
    return cls(
        lm_layers=lm['num_layers'], width=lm['width'], heads=lm['num_heads'],
        head_size=lm.get('head_size', 128),
        ffw=lm.get('ffw_hidden') or lm.get('ffw_multiplier', 4) * lm['width'],
        vocab=lm.get('vocab_size', 32000) + 1,
        xattn_layers=len(positions), xattn_heads=xattn['num_heads'],
        xattn_head_size=xattn['head_size'],
        xattn_ffw=xattn['ffw_multiplier'] * lm['width'],
        grafting=grafting,
        resampler_layers=resampler['num_layers'],
        resampler_width=resampler['width'],
        resampler_heads=resampler['num_heads'],
        resampler_head_size=resampler['head_size'],
        resampler_ffw=resampler.get('ffw_multiplier', 4) * resampler['width'],
        latents=resampler['num_latents'], perceiver=perceiver,
        feature_width=din, vision_tokens=tokens, vision_peak=peak)


def _vision_shape(vision: Mapping[str, Any], image: int):
  """(tokens per frame, largest activation per image, feature width)."""
  if vision['encoder'] == 'vit':
    params = vit.VIT_PARAMS[vision['variant']]
    tokens = (image // params['patch_size'])**2
    return tokens, (tokens + 1) * params['mlp_dim'], params['width']
  params = nfnet.NFNET_PARAMS[vision['variant']]
  # Stem convs at H/2 (three) and H/4; stages at H/4 .. H/32.
  sizes = [(image // 2)**2 * w for w in params['stem_widths'][:3]]
  sizes.append((image // 4)**2 * params['stem_widths'][3])
  side = image // 4
  for stage, width in enumerate(params['widths']):
    side //= nfnet.STAGE_STRIDES[stage]
    sizes.append(side * side * width)
  tokens = (image // nfnet.TOTAL_STRIDE)**2
  return tokens, max(sizes), nfnet.feature_width(vision['variant'])


# ------------------------------------------------------ activation counts --


def lm_block_saved(d: ModelDims, length: int, policy: str, c: int,
                   m: int) -> float:
  """Bytes one frozen LM block saves per example for the backward pass."""
  hk = d.heads * d.head_size
  if policy == 'full':
    return c * length * d.width  # Its input; the rest is recomputed.
  if policy == 'dots':  # q, k, v, output, feed-forward in and out.
    return c * length * (3 * hk / m + d.ffw / m + 2 * d.width)
  return (length * (10 * F32 * d.width + 5 * c * d.ffw / m + 3 * c * hk / m)
          + (F32 + c) * d.heads * length * length / m)


def xattn_block_saved(d: ModelDims, length: int, visual: int, policy: str,
                      c: int, m: int) -> float:
  """Bytes one GATED XATTN-DENSE block saves per example (`visual`: M)."""
  hk = d.xattn_heads * d.xattn_head_size
  dv = d.resampler_width
  if policy == 'full':  # Its input; the rest is recomputed.
    return c * length * d.width
  if policy == 'dots':  # q, attention output, feed-forward in and out; the
    # images' keys and values.
    saved = c * (length * (hk / m + d.xattn_ffw / m + 2 * d.width)
                 + visual * 2 * hk / m)
    if d.grafting:  # Plus a self-attention's q, k, v and output.
      saved += c * length * (3 * d.heads * d.head_size / m + d.width)
    return saved
  saved = (length * (6 * F32 * d.width + 5 * c * d.width
                     + (2 * c + 1) * d.xattn_ffw / m + c * hk / m
                     + 2 * F32 * d.xattn_heads / m)
           + visual * (2 * c * hk / m + (F32 + c) * dv)
           + (F32 + c) * d.xattn_heads * length * visual / m)
  if d.grafting:  # Plus a self-attention, as in an LM block.
    saved += (length * (5 * F32 * d.width + 3 * c * hk / m)
              + (F32 + c) * d.xattn_heads * length * length / m)
  return saved


def resampler_saved(d: ModelDims, frames: int, c: int, m: int) -> float:
  """Bytes the (trained, unscanned) resampler saves per medium."""
  tokens = frames * d.vision_tokens  # S.
  latents = d.latents if d.perceiver else tokens  # R.
  keys = tokens + latents if d.perceiver else tokens
  dr, hk = d.resampler_width, d.resampler_heads * d.resampler_head_size
  ffw = d.resampler_ffw
  per_layer = (latents * ((2 * c + 1) * ffw / m + (7 * F32 + 2.5 * c) * dr)
               + keys * (2 * c * hk / m + c * dr)
               + 3 * F32 * tokens * dr
               + d.resampler_heads * latents * ((F32 + c) * keys + 2 * F32) / m)
  return c * tokens * d.feature_width + d.resampler_layers * per_layer


def head_saved(d: ModelDims, length: int, visual: int, c: int,
               m: int) -> float:
  """Loss, final norm and cross-attention masks, per example."""
  return (c * length * d.vocab / m + (5 * F32 + c) * length * d.width
          + (2 + 2 * F32) * d.xattn_heads * length * visual / m)


def working_set(d: ModelDims, spec: Mapping[str, Any], policy: str, c: int,
                m: int, xattn_policy: Optional[str] = None,
                visual: int = 0) -> float:
  """Peak bytes per example on top of the saved activations."""
  length, images = spec['seq_len'], spec['max_media'] * spec['frames']
  xattn_policy = policy if xattn_policy is None else xattn_policy
  # One layer recomputed for its backward pass: its matmul outputs (what
  # 'dots' saves); the elementwise intermediates that 'none' would save
  # (GELU, norms) XLA fuses into the backward pass that consumes them
  # (counting them overshot XLA on CPU by 8% with 'dots', 15% with 'full').
  layer = max(
      lm_block_saved(d, length, 'dots', c, m) if policy != 'none' else 0.0,
      (xattn_block_saved(d, length, visual, 'dots', c, m)
       if xattn_policy != 'none' and d.xattn_layers else 0.0))
  gradients = 3 * F32 * length * d.width  # The residual stream's.
  loss = (c + 2 * F32) * length * d.vocab / m
  vision = images * (3 * c * d.vision_peak + F32 * 3 * spec['image_size']**2)
  return max(layer + gradients, loss, vision)


def activation_bytes(config: ml_collections.ConfigDict, spec: Mapping[str, Any],
                     batch: int, m: int) -> tuple[float, float]:
  """(saved, working) activation bytes of one dataset's `batch` examples."""
  d = ModelDims.from_config(config.model)
  c = _itemsize(config.get('compute_dtype', 'bfloat16'))
  policy, xattn_policy = remat_policies(config)
  length = spec['seq_len']
  visual = spec['max_media'] * (d.latents if d.perceiver else
                                spec['frames'] * d.vision_tokens)
  per_example = (
      d.lm_layers * lm_block_saved(d, length, policy, c, m)
      + d.xattn_layers * xattn_block_saved(d, length, visual, xattn_policy,
                                           c, m)
      + spec['max_media'] * resampler_saved(d, spec['frames'], c, m)
      + head_saved(d, length, visual, c, m))
  return batch * per_example, batch * working_set(
      d, spec, policy, c, m, xattn_policy, visual)


def remat_policies(config: ml_collections.ConfigDict) -> tuple[str, str]:
  """(LM's, cross-attention's) remat policy names; a config without the
  xattn stack's own shares the LM's (as models/flamingo.py does)."""
  lm = config.model.lm.get('remat_policy', None) or 'none'
  xattn = config.model.get('xattn', {})
  return lm, (xattn.get('remat_policy', lm) or 'none')


def batch_bytes(spec: Mapping[str, Any], batch: int) -> int:
  """Bytes of one dataset's inputs (see DESIGN.md's Batch)."""
  length, media = spec['seq_len'], spec['max_media']
  pixels = media * spec['frames'] * spec['image_size']**2 * 3
  return batch * (4 * 4 * length + pixels + media)


# -------------------------------------------------------------- the plan --


@dataclasses.dataclass
class Plan:
  """Bytes per device of the train step of a config on one mesh."""
  mesh: tuple[int, int, int]  # (data, fsdp, model).
  hbm: int  # Bytes per device.
  usable: int  # Bytes the step may use.
  trainable: int
  frozen: int
  optimizer: int
  batch: int
  gradients: int
  weight_copies: int
  activations_saved: int
  activations_working: int
  largest_dataset: str  # The one whose saved activations are largest.
  per_device_batch: dict[str, int]

  @property
  def state(self) -> int:
    return self.trainable + self.frozen + self.optimizer

  @property
  def temporaries(self) -> int:
    return (self.gradients + self.weight_copies + self.activations_saved
            + self.activations_working)

  @property
  def total(self) -> int:
    return self.state + self.batch + self.temporaries

  @property
  def fits(self) -> bool:
    return self.total <= self.usable

  def rows(self) -> list[tuple[str, int]]:
    return [
        ('trainable params (fp32)', self.trainable),
        ('frozen params', self.frozen),
        ('optimizer state', self.optimizer),
        ('batch', self.batch),
        ('gradients', self.gradients),
        ('weight copies / gathers', self.weight_copies),
        ('activations saved, all datasets', self.activations_saved),
        ('activations working set', self.activations_working),
    ]


class StateModel:
  """The train state of a config, abstract (`jax.eval_shape`), for planning
  any mesh: a few seconds even at 80B, and no memory."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    model = loop.task_of(config).transform(config.model)
    self.abstract = loop.abstract_train_state(config, model,
                                              loop.make_optimizer(config))

  def shardings(self, mesh_sizes: Sequence[int]):
    """The train state's shardings on a (data, fsdp, model) mesh."""
    return loop.state_shardings(self.abstract, self.config,
                                abstract_mesh(mesh_sizes))


def _gathered_layer_bytes(state: StateModel, c: int, m: int) -> int:
  """Compute-dtype bytes of one layer group's weights, split over 'model'."""
  per_layer = 0
  for params in (state.abstract.trainable, state.abstract.frozen):
    for module, leaves in params.items():
      if module.startswith(('lm/blocks/', 'gated_xattn/')):
        for leaf in leaves.values():
          per_layer += math.prod(leaf.shape[1:])
  return int(per_layer * c / m)


def _cast_bytes(abstract, shardings, c: int) -> int:
  """Bytes of the parameters cast to the compute dtype (split as stored)
  that the backward pass reads: not the frozen vision encoder's, which runs
  forward only, so its copies die before the peak (measured on CPU)."""
  total = 0
  for part in ('trainable', 'frozen'):
    for module, leaves in getattr(abstract, part).items():
      if module.startswith('vision_encoder/'):
        continue
      specs = getattr(shardings, part)[module]
      for name, leaf in leaves.items():
        if jnp.issubdtype(leaf.dtype, jnp.floating) and (
            _itemsize(leaf.dtype) != c):
          total += math.prod(specs[name].shard_shape(leaf.shape)) * c
  return total


def plan(state: StateModel, mesh_sizes: Sequence[int], hbm: int,
         usable_fraction: float, platform: str = 'tpu') -> Plan:
  """The Plan of `state`'s config on a (data, fsdp, model) mesh.

  Args:
    state: the config's abstract train state.
    mesh_sizes: (data, fsdp, model).
    hbm: bytes of memory per device.
    usable_fraction: the share of `hbm` the step may use.
    platform: 'tpu' or 'gpu' (collectives run ahead: FSDP gathers the next
      layer group while the current one computes, two buffers) or 'cpu'
      (one).

  Raises:
    ValueError: if the mesh's batch-parallel devices do not divide a
      dataset's batch.
  """
  config = state.config
  data, fsdp, model = mesh_sizes
  shardings = state.shardings(mesh_sizes)
  abstract = state.abstract
  trainable = shard_bytes(abstract.trainable, shardings.trainable)
  frozen = shard_bytes(abstract.frozen, shardings.frozen)
  optimizer = shard_bytes(abstract.opt_state, shardings.opt_state)
  c = _itemsize(config.get('compute_dtype', 'bfloat16'))

  datasets = config.data.datasets
  microbatches = config.optim.get('microbatches', 1)
  accumulate = config.optim.get('dataset_updates', 'accumulate') == (
      'accumulate')
  # The gradient and the running sums over datasets and over micro-batches.
  # The data-parallel all-reduce takes no second copy: XLA reuses the
  # gradient's buffer (measured on CPU: counting one overshot by 20-30%).
  copies = (1 + (accumulate and len(datasets) > 1) + (microbatches > 1))
  gathers = 0
  if fsdp > 1:
    gathers = (1 if platform == 'cpu' else 2) * _gathered_layer_bytes(
        state, c, model)

  per_device, batch, saved, working, largest = {}, 0, 0.0, 0.0, (0.0, '')
  for name, spec in sorted(datasets.items()):
    if spec.batch_size % (data * fsdp * microbatches):
      raise ValueError(
          f'config.data.datasets.{name}.batch_size={spec.batch_size} is not '
          f'divisible by optim.microbatches={microbatches} times the '
          f'{data * fsdp} batch-parallel devices of mesh {tuple(mesh_sizes)}.')
    rows = spec.batch_size // (data * fsdp)
    per_device[name] = rows
    batch += batch_bytes(spec, rows)
    dataset_saved, dataset_working = activation_bytes(
        config, spec, rows // microbatches, model)
    # XLA keeps every dataset's saved activations until the update (so
    # measured on CPU, even with the datasets ordered); the working sets
    # come one at a time.
    saved += dataset_saved
    working = max(working, dataset_working)
    largest = max(largest, (dataset_saved, name))
  return Plan(
      mesh=tuple(mesh_sizes), hbm=hbm, usable=int(hbm * usable_fraction),
      trainable=trainable, frozen=frozen, optimizer=optimizer, batch=batch,
      gradients=copies * trainable,
      weight_copies=_cast_bytes(abstract, shardings, c) + gathers,
      activations_saved=int(saved), activations_working=int(working),
      largest_dataset=largest[1], per_device_batch=per_device)
