"""Model FLOPs of one train step, counted from the config (for MFU).

What counts is the work the step must do for the global batch of every
dataset of the mixture, each with its own B, L, N, T and image size: the
multiply-adds of every matmul and convolution, 2 FLOPs each,

  forward       every layer, frozen or not;
  input grads   the gradient with respect to an operand that depends on a
                trainable parameter upstream, i.e. that carries a gradient:
                the residual stream of the frozen LM (the learned <EOC> row
                enters it at the embedding), never the frozen vision
                encoder's activations (its features are stop_gradient'ed);
  weight grads  the gradient with respect to a trainable parameter, or a
                tensor computed from parameters alone (the relative-position
                keys of the LM's attention).

A gradient of a contraction costs what its forward costs. Hence a frozen
vision encoder counts forward only, the frozen LM forward plus activation
gradients, trainable layers forward plus both gradients.

Not counted: rematerialisation (a remat policy changes the work the hardware
does, not the model's FLOPs), elementwise work (norms, softmax, activations,
the optimizer update: 7-18% of XLA's count at the test's tiny widths, less
at the paper's), and kernel taps that fall on a convolution's zero padding
(XLA's cost analysis does not count those either).

`tests/training/test_flops.py` checks the count against the dot and
convolution FLOPs of the same train step compiled by XLA with its layer
scans unrolled (XLA counts a scanned layer once, whatever the number of
iterations), and against XLA's total cost analysis.

Which parameters train is read from `config.freeze` over the model's real
parameter paths (and `config.model.stop_vision_gradient`), so an ablation
such as `lm_unfrozen` or `vision_unfrozen` changes the count by itself.
Layer widths come from the parameter shapes; token counts from the batch
shapes of `config.data.datasets`.

Glossary of shapes (per dataset):
  B: batch size; L: text tokens; N: media slots; T: frames per medium.
  S: vision feature tokens per frame; R: visual tokens per medium (the
  resampler's latents); M = N * R: visual tokens per sequence.
"""

from collections.abc import Mapping
import dataclasses
from typing import Any, Optional

from absl import logging
import haiku as hk
import jax

from flamingo_jax.models import flamingo
from flamingo_jax.models import nfnet
from flamingo_jax.training import optim

# Components of the count, in the order the step runs them.
COMPONENTS = ('vision_encoder', 'perceiver_resampler', 'gated_xattn',
              'lm_blocks', 'lm_unembed')
TASKS = ('flamingo', 'lm')  # Tasks whose model this module knows.


@dataclasses.dataclass
class Flops:
  """FLOPs of one part of the step, split as the module docstring says."""
  forward: float = 0.0
  input_grads: float = 0.0
  weight_grads: float = 0.0

  @property
  def total(self) -> float:
    return self.forward + self.input_grads + self.weight_grads

  def __add__(self, other: 'Flops') -> 'Flops':
    return Flops(self.forward + other.forward,
                 self.input_grads + other.input_grads,
                 self.weight_grads + other.weight_grads)


# dataset name -> component -> Flops.
StepFlops = dict[str, dict[str, Flops]]


class _Tally:
  """Adds up contractions; answers which parameters train and their shapes."""

  def __init__(self, params: hk.Params, labels: hk.Params,
               stopped: tuple[str, ...] = ()):
    self._params = params
    self._labels = labels
    self._stopped = stopped  # Module prefixes that get no gradient at all.
    self.component = COMPONENTS[0]
    self.parts = {name: Flops() for name in COMPONENTS}

  def has(self, module: str, name: Optional[str] = None) -> bool:
    return module in self._params and (
        name is None or name in self._params[module])

  def shape(self, module: str, name: str = 'w') -> tuple[int, ...]:
    if module not in self._params or name not in self._params[module]:
      raise KeyError(f'The FLOP count expects a parameter {module}/{name}, '
                     'which this model does not have.')
    return tuple(self._params[module][name].shape)

  def trains(self, module: str, name: Optional[str] = None) -> bool:
    """Whether `module` (or its parameter `name`) gets a gradient."""
    if any(module == p or module.startswith(p + '/') for p in self._stopped):
      return False
    labels = self._labels.get(module, {})
    names = [name] if name is not None else list(labels)
    return any(labels.get(n) == optim.TRAIN for n in names)

  def add(self, flops: float, input_grads: int = 0,
          weight_grads: int = 0) -> None:
    """A contraction of `flops` and how many of its operands need grads."""
    part = self.parts[self.component]
    part.forward += flops
    part.input_grads += flops * input_grads
    part.weight_grads += flops * weight_grads


# Each function below counts one layer and returns whether its output
# carries a gradient ("live"), given whether its input does. Counting calls
# come before `or` (`_linear(...) or live`): a short-circuit would skip them.


def _linear(t: _Tally, module: str, tokens: int, live: bool) -> bool:
  """x @ w (+ b) over `tokens` rows; stacked weights have a leading axis."""
  d_in, d_out = t.shape(module)[-2:]
  trains = t.trains(module)
  t.add(2.0 * tokens * d_in * d_out, input_grads=live, weight_grads=trains)
  return live or trains


def _norm(t: _Tally, module: str, live: bool) -> bool:
  return live or t.trains(module)


def _valid_taps(size_in: int, size_out: int, kernel: int, stride: int) -> int:
  """Kernel taps on real input along one dimension, summed over outputs."""
  pad = max((size_out - 1) * stride + kernel - size_in, 0) // 2  # 'SAME'.
  return sum(0 <= o * stride + k - pad < size_in
             for o in range(size_out) for k in range(kernel))


def _conv(t: _Tally, module: str, images: int, size: int, stride: int,
          live: bool) -> tuple[int, bool]:
  """A square 'SAME' conv (grouped or not): (output size, live)."""
  kernel, _, in_per_group, out = t.shape(module)
  size_out = -(-size // stride)
  taps = _valid_taps(size, size_out, kernel, stride)
  trains = t.trains(module)
  t.add(2.0 * images * taps * taps * in_per_group * out, input_grads=live,
        weight_grads=trains)
  return size_out, live or trains


def _nfnet(t: _Tally, variant: str, images: int,
           size: int) -> tuple[int, int, bool]:
  """NFNet on [images, size, size, 3]: (tokens S, width C, live)."""
  live = False  # Pixels.
  for i, stride in enumerate(nfnet.STEM_STRIDES):
    size, live = _conv(t, f'vision_encoder/stem_conv{i}', images, size,
                       stride, live)
  for spec in nfnet.block_schedule(variant, 0.0):
    block = f'vision_encoder/{spec.name}'
    size_out = -(-size // spec.stride)
    shortcut = live
    if t.has(f'{block}/conv_shortcut'):  # After an average pool.
      _, shortcut = _conv(t, f'{block}/conv_shortcut', images, size_out, 1,
                          live)
    _, branch = _conv(t, f'{block}/conv0', images, size, 1, live)
    _, branch = _conv(t, f'{block}/conv1', images, size, spec.stride, branch)
    _, branch = _conv(t, f'{block}/conv1b', images, size_out, 1, branch)
    _, branch = _conv(t, f'{block}/conv2', images, size_out, 1, branch)
    gates = _linear(t, f'{block}/squeeze_excite/fc0', images, branch)
    gates = _linear(t, f'{block}/squeeze_excite/fc1', images, gates)
    live = shortcut or branch or gates or t.trains(block, 'skip_gain')
    size = size_out
  size, live = _conv(t, 'vision_encoder/final_conv', images, size, 1, live)
  return size * size, t.shape('vision_encoder/final_conv')[-1], live


def _attention(t: _Tally, module: str, batch: int, queries: int, keys: int,
               q_live: bool, kv_live: bool) -> bool:
  """Multi-head attention of `queries` over `keys` tokens (per example)."""
  q = _linear(t, f'{module}/query', batch * queries, q_live)
  k = _linear(t, f'{module}/key', batch * keys, kv_live)
  v = _linear(t, f'{module}/value', batch * keys, kv_live)
  heads_by_size = t.shape(f'{module}/query')[-1]
  scores = 2.0 * batch * queries * keys * heads_by_size
  t.add(scores, input_grads=q + k)  # q . k
  weights = q or k
  t.add(scores, input_grads=weights + v)  # softmax(q . k) @ v
  return _linear(t, f'{module}/output', batch * queries, weights or v)


def _vit(t: _Tally, images: int, size: int) -> tuple[int, int, bool]:
  """The CLIP ViT on [images, size, size, 3]: (tokens P, width D, live)."""
  patch, _, channels, width = t.shape('vision_encoder/patch_embedding')
  patches = (size // patch) ** 2
  trains = t.trains('vision_encoder/patch_embedding')
  t.add(2.0 * images * patches * patch * patch * channels * width,
        weight_grads=trains)
  live = trains or t.trains('vision_encoder')  # Class and position rows.
  live = _norm(t, 'vision_encoder/ln_pre', live)
  tokens = patches + 1  # And the class token.
  stack = 'vision_encoder/transformer'
  for _ in range(t.shape(f'{stack}/attention/query')[0]):
    h = _norm(t, f'{stack}/ln_1', live)
    attended = _attention(t, f'{stack}/attention', images, tokens, tokens, h,
                          h)
    live = live or attended
    h = _norm(t, f'{stack}/ln_2', live)
    h = _linear(t, f'{stack}/mlp/hidden', images * tokens, h)
    live = _linear(t, f'{stack}/mlp/output', images * tokens, h) or live
  live = _norm(t, 'vision_encoder/ln_post', live)
  # The class token's projection feeds contrastive training only.
  return patches, width, live


def _resampler(t: _Tally, items: int, frames: int, spatial: int,
               live: bool) -> tuple[int, bool]:
  """Perceiver Resampler (or an ablation) of [items, T, S, Din] features:
  (visual tokens per medium, live)."""
  root = 'perceiver_resampler'
  tokens = frames * spatial
  if t.has(f'{root}/input_projection'):
    live = _linear(t, f'{root}/input_projection', items * tokens, live)
  live = live or t.trains(root, 'time_embeddings')
  perceiver = t.has(root, 'latents')
  layers = 0
  while t.has(f'{root}/layer_{layers}/ffw/hidden'):
    layers += 1
  latents = t.shape(root, 'latents')[0] if perceiver else tokens
  x = t.trains(root, 'latents') if perceiver else live
  for i in range(layers):
    layer = f'{root}/layer_{i}'
    if perceiver:  # Latents attend to [features; latents].
      queries = _norm(t, f'{layer}/latents_norm', x)
      keys = queries or _norm(t, f'{layer}/features_norm', live)
      attended = _attention(t, f'{layer}/attention', items, latents,
                            tokens + latents, queries, keys)
      x = x or attended
    elif t.has(f'{layer}/attention/query'):  # 'transformer'.
      h = _norm(t, f'{layer}/attention_norm', x)
      attended = _attention(t, f'{layer}/attention', items, tokens, tokens,
                            h, h)
      x = x or attended
    h = _norm(t, f'{layer}/ffw_norm', x)
    h = _linear(t, f'{layer}/ffw/hidden', items * latents, h)
    x = _linear(t, f'{layer}/ffw/output', items * latents, h) or x
  return latents, _norm(t, f'{root}/output_norm', x)


def _relative_attention(t: _Tally, module: str, batch: int, length: int,
                        live: bool) -> bool:
  """The LM's causal self-attention with Transformer-XL positions."""
  q = _linear(t, f'{module}/query', batch * length, live)
  k = _linear(t, f'{module}/key', batch * length, live)
  v = _linear(t, f'{module}/value', batch * length, live)
  # Keys of the L relative offsets, from sinusoids (constants): no batch.
  rel = _linear(t, f'{module}/relative_key', length, False)
  scores = 2.0 * batch * length * length * t.shape(f'{module}/query')[-1]
  q_pos = q or t.trains(module, 'position_bias')
  t.add(scores, input_grads=q_pos, weight_grads=rel)  # (q + v) . W_r r
  q_content = q or t.trains(module, 'content_bias')
  t.add(scores, input_grads=q_content + k)  # (q + u) . k
  weights = q_pos or rel or q_content or k
  t.add(scores, input_grads=weights + v)  # softmax(...) @ v
  return _linear(t, f'{module}/output', batch * length, weights or v)


def _lm_block(t: _Tally, batch: int, length: int, live: bool) -> bool:
  """One LM block, Chinchilla's or a published family's (models/lm_layout.py:
  plain self-attention, grouped-query through the key shapes, SwiGLU's
  gate; the parallel residual counts the same)."""
  block = 'lm/blocks/block'
  h = _norm(t, f'{block}/attention_norm', live)
  if t.has(f'{block}/self_attention/relative_key'):
    attended = _relative_attention(t, f'{block}/self_attention', batch,
                                   length, h)
  else:
    attended = _attention(t, f'{block}/self_attention', batch, length, length,
                          h, h)
  live = live or attended
  h = _norm(t, f'{block}/ffw_norm', live)
  hidden = _linear(t, f'{block}/ffw/hidden', batch * length, h)
  if t.has(f'{block}/ffw/gate'):
    hidden = _linear(t, f'{block}/ffw/gate', batch * length, h) or hidden
  return _linear(t, f'{block}/ffw/output', batch * length, hidden) or live


def _xattn_block(t: _Tally, batch: int, length: int, visual_tokens: int,
                 visual_live: bool, live: bool) -> bool:
  """One GATED XATTN-DENSE block (or its vanilla / grafting ablation)."""
  block = 'gated_xattn/block'
  if t.has(f'{block}/self_attention/query'):  # Grafting.
    h = _norm(t, f'{block}/self_attention_norm', live)
    attended = _relative_attention(t, f'{block}/self_attention', batch,
                                   length, h)
    live = live or attended
  queries = _norm(t, f'{block}/query_norm', live)
  keys = _norm(t, f'{block}/visual_norm', visual_live)
  attended = _attention(t, f'{block}/cross_attention', batch, length,
                        visual_tokens, queries, keys)
  live = live or attended or t.trains(block, 'attn_gate')
  if t.has(f'{block}/ffw/hidden'):  # Not the vanilla ablation.
    h = _norm(t, f'{block}/ffw_norm', live)
    hidden = _linear(t, f'{block}/ffw/hidden', batch * length, h)
    if t.has(f'{block}/ffw/gate'):  # IDEFICS's SwiGLU.
      hidden = _linear(t, f'{block}/ffw/gate', batch * length, h) or hidden
    dense = _linear(t, f'{block}/ffw/output', batch * length, hidden)
    live = live or dense or t.trains(block, 'ffw_gate')
  return live


def _unembed(t: _Tally, batch: int, length: int, live: bool) -> None:
  h = _norm(t, 'lm/final_norm', live)
  if t.has('lm/unembed'):
    _linear(t, 'lm/unembed', batch * length, h)
  else:  # Tied: the embedding table, [V, D].
    vocab, width = t.shape('lm/embed', 'embeddings')
    t.add(2.0 * batch * length * vocab * width, input_grads=h,
          weight_grads=t.trains('lm/embed'))
  width, = t.shape('lm', 'eoc_unembedding')
  t.add(2.0 * batch * length * width, input_grads=h,
        weight_grads=t.trains('lm', 'eoc_unembedding'))


def _visual_tokens(t: _Tally, model: Mapping[str, Any], spec: Mapping[str, Any],
                   image_size: int) -> tuple[int, bool]:
  """Vision encoder and resampler: (visual tokens per sequence M, live)."""
  batch, media, frames = spec['batch_size'], spec['max_media'], spec['frames']
  t.component = 'vision_encoder'
  if model['vision']['encoder'] == 'nfnet':
    spatial, _, live = _nfnet(t, model['vision']['variant'],
                              batch * media * frames, image_size)
  else:
    spatial, _, live = _vit(t, batch * media * frames, image_size)
  if model['stop_vision_gradient']:
    live = False
  t.component = 'perceiver_resampler'
  per_medium, live = _resampler(t, batch * media, frames, spatial, live)
  return media * per_medium, live


def _language_model(t: _Tally, model: Mapping[str, Any], batch: int,
                    length: int, visual: Optional[tuple[int, bool]]) -> None:
  """Embedding, LM blocks with the xattn blocks (if `visual`), unembedding."""
  live = t.trains('lm/embed') or t.trains('lm', 'eoc_embedding')
  num_layers = t.shape('lm/blocks/block/ffw/hidden')[0]
  positions, grafting = (), False
  if visual is not None:
    xattn = model['xattn']
    grafting = xattn['xattn_type'] == 'grafting'
    positions = flamingo.xattn_positions(
        num_layers, xattn['every'], xattn['placement'], xattn['xattn_type'])

  def xattn_block(live):
    t.component = 'gated_xattn'
    return _xattn_block(t, batch, length, visual[0], visual[1], live)

  for layer in range(num_layers):
    if not grafting:
      for _ in range(positions.count(layer)):
        live = xattn_block(live)
    t.component = 'lm_blocks'
    live = _lm_block(t, batch, length, live)
  if grafting:
    for _ in positions:
      live = xattn_block(live)
  t.component = 'lm_unembed'
  _unembed(t, batch, length, live)


def abstract_params(config) -> hk.Params:
  """The parameter shapes of `config.task`'s model (`jax.eval_shape`)."""
  model = config.model.to_dict() if hasattr(config.model, 'to_dict') else (
      dict(config.model))
  transform = (flamingo.transform_lm if config.get('task', 'flamingo') == 'lm'
               else flamingo.transform)
  return jax.eval_shape(transform(model).init, jax.random.PRNGKey(0),
                        *flamingo.example_inputs(model))


def step_flops(config, params: Optional[hk.Params] = None
               ) -> Optional[StepFlops]:
  """FLOPs of one train step of `config`, per dataset and component.

  Args:
    config: a training config (`config.task` 'flamingo' or 'lm').
    params: the model's parameters, or anything shaped like them
      (ShapeDtypeStructs, e.g. from `abstract_params`); built with
      `jax.eval_shape` when not given.

  Returns:
    {dataset: {component: Flops}}, or None for a task this module does not
    know (e.g. 'contrastive').
  """
  task = config.get('task', 'flamingo')
  if task not in TASKS:
    return None
  if params is None:
    params = abstract_params(config)
  labels = optim.freeze_labels(params, config.freeze)
  model = config.model.to_dict() if hasattr(config.model, 'to_dict') else (
      dict(config.model))
  counts = {}
  for name, spec in config.data.datasets.items():
    stopped = ('vision_encoder',) if model['stop_vision_gradient'] else ()
    t = _Tally(params, labels, stopped)
    visual = None
    if task == 'flamingo':
      image_size = spec.get('image_size', None) or model['image_size']
      visual = _visual_tokens(t, model, spec, image_size)
    _language_model(t, model, spec['batch_size'], spec['seq_len'], visual)
    counts[name] = t.parts
  return counts


def total(counts: StepFlops) -> Flops:
  """The sum over datasets and components."""
  out = Flops()
  for parts in counts.values():
    for part in parts.values():
      out = out + part
  return out


def train_step_flops(config, params: Optional[hk.Params] = None, *,
                     strict: bool = True) -> Optional[float]:
  """Model FLOPs of one train step of `config` (global batch), or None.

  With `strict=False` (the training loop: a metric must not stop a run), a
  model this count does not know (a KeyError naming the parameter it
  expected) gives None and a warning instead of raising.
  """
  try:
    counts = step_flops(config, params)
  except KeyError as e:
    if strict:
      raise
    logging.warning('No model FLOP count (so no MFU): %s', e)
    return None
  return None if counts is None else total(counts).total
