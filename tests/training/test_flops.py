"""The analytic FLOP count equals XLA's on an unscanned tiny model.

XLA's cost analysis counts a scanned layer's body once, whatever the number
of iterations, so the train step is lowered here with every `lax.scan`
unrolled (the compiled HLO then has no while loop). Its `cost_analysis()`
FLOPs also include elementwise work (norms, softmax, activations, Adam),
which the analytic count leaves out; so the check is two-fold:

  * the FLOPs of the compiled program's dot and convolution instructions
    (read from its HLO text, counted as XLA's cost analysis counts them:
    2 per multiply-add, padding taps excluded) equal the analytic count to
    0.5% (measured: 0.01%; the <EOC> logit's matrix-vector product may
    become a multiply and a reduction);
  * `cost_analysis()['flops']` lies between the analytic count and 1.3x it:
    the elementwise remainder is 7-18% of the total at these widths (each
    matmul output element costs 2 x 16..128 FLOPs, the elementwise ops on it
    ~10-20), while a freezing mistake moves the count by 20% or more (the
    frozen LM's weight gradients alone are ~20% of the frozen step).

Both the paper's frozen split and an all-trainable variant (LM and vision
encoder unfrozen, gradient through the vision features) are compiled once
per module; the architecture ablations' forward passes once each. The rest
checks the freezing logic, per-dataset shapes and the MFU arithmetic
without compiling.
"""

import math
import re
import types
from unittest import mock

import jax
import ml_collections
import numpy as np
import pytest

from experiments import flamingo as flamingo_config
from experiments import tiny
from flamingo_jax.data import media_index as media_index_lib
from flamingo_jax.training import flops as flops_lib
from flamingo_jax.training import loop
from flamingo_jax.training import metrics as metrics_lib
from flamingo_jax.training import optim


def _config(trainable: bool = False, ablations: str = '',
            **dataset) -> ml_collections.ConfigDict:
  """tiny:smoke with one small dataset and a 2-layer LM."""
  config = tiny.get_config('smoke' + (f',{ablations}' if ablations else ''))
  spec = config.data.datasets.documents.to_dict()
  spec.update(batch_size=2, seq_len=32, max_media=2, frames=2)
  spec.update(dataset)
  config.data.datasets = {'documents': spec}
  config.model.lm.num_layers = 2
  if trainable:
    config.freeze = [('.*', optim.TRAIN)]
    config.model.stop_vision_gradient = False
    if config.model.vision.encoder == 'nfnet':
      # Stochastic depth draws random bits in a loop; keep the HLO loop-free.
      config.model.vision.stochastic_depth_rate = 0.0
  return config


def _batches(config) -> dict[str, dict[str, np.ndarray]]:
  rng = np.random.default_rng(0)
  batches = {}
  for name, spec in config.data.datasets.items():
    b, length, n = spec.batch_size, spec.seq_len, spec.max_media
    tokens = rng.integers(5, config.model.lm.vocab_size, size=(b, length))
    marks = np.zeros([b, length], bool)
    marks[:, np.linspace(0, length - 1, n, dtype=int)] = True
    size = spec.image_size
    batches[name] = dict(
        tokens=tokens.astype(np.int32), targets=tokens.astype(np.int32),
        loss_mask=np.ones([b, length], np.float32),
        media=rng.integers(0, 255, size=(b, n, spec.frames, size, size, 3),
                           dtype=np.uint8),
        media_mask=np.ones([b, n], bool),
        media_index=media_index_lib.compute_media_index(marks, n))
  return batches


def _unrolled_scan(real_scan):
  def scan(*args, **kwargs):
    kwargs['unroll'] = True
    return real_scan(*args, **kwargs)
  return scan


def _compile_unscanned(function, *args):
  """`jax.jit(function).lower(*args).compile()` with every scan unrolled."""
  with mock.patch.object(jax.lax, 'scan', _unrolled_scan(jax.lax.scan)):
    lowered = jax.jit(function).lower(*args)
  return lowered.compile()


_SHAPE = r'[a-z0-9]+\[([0-9,]*)\]'
_DEFINITION = re.compile(r'^\s*(?:ROOT )?%(\S+) = ' + _SHAPE)
_CONTRACTION = re.compile(r'= ' + _SHAPE + r'\S* (dot|convolution)'
                          r'\(%([^,]+), %([^)]+)\)(.*)$')


def _dims(text: str) -> list[int]:
  return [int(d) for d in text.split(',') if d]


def _window(attributes: str, num_spatial: int) -> dict[str, list[str]]:
  """`window={size=3x3 stride=2x2 pad=0_1x0_1 ...}` as per-dim strings."""
  found = re.search(r'window=\{([^}]*)\}', attributes)
  fields = dict(f.split('=') for f in found.group(1).split()) if found else {}
  defaults = dict(stride='1', pad='0_0', lhs_dilate='1', rhs_dilate='1')
  return {key: fields.get(key, 'x'.join([value] * num_spatial)).split('x')
          for key, value in defaults.items()}


def _valid_positions(size_in: int, kernel: int, size_out: int, stride: int,
                     pad_low: int, lhs_dilation: int,
                     rhs_dilation: int) -> int:
  """(output, kernel) pairs of one dim that read a real input element."""
  count = 0
  for k in range(kernel):
    for o in range(size_out):
      index = o * stride - pad_low + k * rhs_dilation
      if index % lhs_dilation == 0 and 0 <= index // lhs_dilation < size_in:
        count += 1
  return count


def _conv_flops(out, lhs, rhs, attributes: str) -> float:
  labels = re.search(r'dim_labels=([^_]+)_([^-]+)->([^,\s]+)', attributes)
  lhs_labels, rhs_labels, out_labels = labels.groups()
  spatial = [c for c in lhs_labels if c.isdigit()]
  window = _window(attributes, len(spatial))
  positions = 1
  for i, label in enumerate(spatial):
    positions *= _valid_positions(
        lhs[lhs_labels.index(label)], rhs[rhs_labels.index(label)],
        out[out_labels.index(label)], int(window['stride'][i]),
        int(window['pad'][i].split('_')[0]), int(window['lhs_dilate'][i]),
        int(window['rhs_dilate'][i]))
  groups = re.search(r'feature_group_count=(\d+)', attributes)
  batch_groups = re.search(r'batch_group_count=(\d+)', attributes)
  in_features = lhs[lhs_labels.index('f')] // int(
      groups.group(1) if groups else 1)
  batch = lhs[lhs_labels.index('b')] // int(
      batch_groups.group(1) if batch_groups else 1)
  return 2.0 * in_features * out[out_labels.index('f')] * batch * positions


def contraction_flops(hlo_text: str) -> float:
  """FLOPs of the dot and convolution instructions of an HLO module."""
  shapes = {}
  for line in hlo_text.splitlines():
    definition = _DEFINITION.match(line)
    if definition:
      shapes[definition.group(1)] = _dims(definition.group(2))
  total = 0.0
  for line in hlo_text.splitlines():
    found = _CONTRACTION.search(line)
    if not found:
      continue
    out, op, lhs, rhs, attributes = found.groups()
    out, lhs, rhs = _dims(out), shapes[lhs], shapes[rhs]
    if op == 'dot':
      contracting = re.search(r'lhs_contracting_dims=\{([0-9,]*)\}',
                              attributes)
      width = math.prod(lhs[d] for d in _dims(contracting.group(1)))
      total += 2.0 * math.prod(out) * width
    else:
      total += _conv_flops(out, lhs, rhs, attributes)
  return total


def _train_step_figures(config):
  """(analytic Flops, XLA cost-analysis FLOPs, dot+conv FLOPs, HLO)."""
  model = loop.task_of(config).transform(config.model)
  optimizer = loop.make_optimizer(config)
  state = loop.abstract_train_state(config, model, optimizer)
  compiled = _compile_unscanned(loop.make_step_fn(config, model, optimizer),
                                state, _batches(config))
  hlo = compiled.as_text()
  params = optim.merge(state.trainable, state.frozen)
  analytic = flops_lib.total(flops_lib.step_flops(config, params))
  return (analytic, metrics_lib.compiled_flops(compiled),
          contraction_flops(hlo), hlo)


@pytest.fixture(scope='module')
def frozen_step():
  return _train_step_figures(_config())


@pytest.fixture(scope='module')
def trainable_step():
  return _train_step_figures(_config(trainable=True))


@pytest.mark.parametrize('which', [
    'frozen_step', pytest.param('trainable_step', marks=pytest.mark.slow)])
def test_count_equals_xla_on_the_unscanned_train_step(which, request):
  analytic, xla_total, xla_contractions, hlo = request.getfixturevalue(which)
  assert ' while(' not in hlo  # Unscanned: XLA counts every layer.
  np.testing.assert_allclose(analytic.total, xla_contractions, rtol=5e-3)
  assert analytic.total <= xla_total <= 1.3 * analytic.total, (
      analytic.total, xla_total)


def _assert_forward_count_equals_xla(config) -> str:
  """The analytic forward FLOPs equal XLA's contractions; returns the HLO."""
  model = loop.task_of(config).transform(config.model)
  params = flops_lib.abstract_params(config)
  batch = _batches(config)['documents']

  def forward(params, batch):
    return model.apply(params, None, batch['tokens'], batch['media'],
                       batch['media_mask'], batch['media_index'])

  hlo = _compile_unscanned(forward, params, batch).as_text()
  analytic = flops_lib.total(flops_lib.step_flops(config, params))
  np.testing.assert_allclose(analytic.forward, contraction_flops(hlo),
                             rtol=5e-3)
  return hlo


@pytest.mark.parametrize('ablations', [
    'vision_clip_vit_l14,grafting,resampler_transformer',
    'vanilla_xattn,resampler_mlp,xattn_single_in_middle'])
def test_forward_count_equals_xla_for_the_architecture_ablations(ablations):
  hlo = _assert_forward_count_equals_xla(_config(ablations=ablations))
  assert ' while(' not in hlo


def test_frozen_split_counts_fewer_gradients(frozen_step, trainable_step):
  frozen, trainable = frozen_step[0], trainable_step[0]
  assert frozen.forward == pytest.approx(trainable.forward)
  # Trainable: every contraction with a weight has a weight gradient.
  assert trainable.weight_grads > 2 * frozen.weight_grads
  assert frozen.total < 0.75 * trainable.total


def test_frozen_vision_and_lm_get_no_weight_gradients():
  counts = flops_lib.step_flops(_config())['documents']
  vision = counts['vision_encoder']
  assert vision.forward > 0
  assert vision.input_grads == vision.weight_grads == 0  # stop_gradient.
  lm = counts['lm_blocks']
  # Forward and activation gradients only: about one backward per forward
  # (q.k and its product with v have two operands that carry gradients; the
  # relative-position keys come from constants and carry none).
  assert lm.weight_grads == 0
  assert 0.9 * lm.forward < lm.input_grads < 1.5 * lm.forward
  for trained in ('perceiver_resampler', 'gated_xattn'):
    assert counts[trained].weight_grads > 0


@pytest.mark.parametrize('ablation,components', [
    ('lm_unfrozen', ('lm_blocks', 'lm_unembed')),
    ('vision_unfrozen', ('vision_encoder',))])
def test_unfreezing_ablations_add_those_weight_gradients(ablation,
                                                         components):
  frozen = flops_lib.step_flops(_config())['documents']
  unfrozen = flops_lib.step_flops(_config(ablations=ablation))['documents']
  for component in flops_lib.COMPONENTS:
    assert unfrozen[component].forward == frozen[component].forward
    if component not in components:
      # Only activation gradients may be added (e.g. the resampler's input
      # projection's, once the vision features carry a gradient).
      assert (unfrozen[component].weight_grads
              == frozen[component].weight_grads), component
      assert (unfrozen[component].input_grads
              >= frozen[component].input_grads), component
      continue
    assert frozen[component].weight_grads < 0.01 * frozen[component].forward
    # A weight gradient per contraction with a weight (not q.k, weights.v).
    assert (0.8 * unfrozen[component].forward
            < unfrozen[component].weight_grads
            <= unfrozen[component].forward), component


def test_vision_trained_but_stop_gradient_counts_forward_only():
  config = _config()
  config.freeze = [('vision_encoder/.*', optim.TRAIN)] + list(config.freeze)
  vision = flops_lib.step_flops(config)['documents']['vision_encoder']
  assert vision.input_grads == vision.weight_grads == 0


def test_each_dataset_is_counted_with_its_own_shapes():
  config = _config()
  pairs = dict(config.data.datasets.documents.to_dict(), batch_size=6,
               seq_len=8, max_media=1, frames=1)
  config.data.datasets['pairs'] = pairs
  counts = flops_lib.step_flops(config)
  alone = flops_lib.step_flops(_config(**pairs))['documents']
  assert counts['pairs'] == alone
  assert counts['documents'] == flops_lib.step_flops(_config())['documents']
  assert flops_lib.total(counts).total == pytest.approx(
      flops_lib.total({'a': counts['pairs']}).total
      + flops_lib.total({'b': counts['documents']}).total)


def test_the_lm_task_counts_the_lm_alone():
  config = _config()
  config.task = 'lm'
  config.freeze = [('lm/.*', optim.TRAIN), ('.*', optim.FROZEN)]
  counts = flops_lib.step_flops(config)['documents']
  assert counts['vision_encoder'].total == counts['gated_xattn'].total == 0
  assert counts['lm_blocks'].weight_grads > 0


def test_unknown_task_has_no_count():
  config = _config()
  config.task = 'contrastive'
  assert flops_lib.train_step_flops(config) is None


def test_flamingo_3b_count_matches_its_parameter_count():
  """3B, one M3W batch: the frozen LM's forward is 2 FLOPs per weight per
  token plus attention (a closed form from the parameter count)."""
  config = flamingo_config.get_config('3B')
  config.data.datasets = {'m3w': dict(config.data.datasets.m3w.to_dict(),
                                      batch_size=8)}
  params = flops_lib.abstract_params(config)
  counts = flops_lib.step_flops(config, params)['m3w']
  blocks = params['lm/blocks/block/ffw/hidden']['w'].shape[0]
  tokens, length = 8 * 256, 256
  width = params['lm/blocks/block/self_attention/query']['w'].shape[-1]
  matmul_weights = sum(
      leaf.size for module, leaves in params.items()
      if module.startswith('lm/blocks/') and 'relative_key' not in module
      for name, leaf in leaves.items() if name == 'w')
  relative = params['lm/blocks/block/self_attention/relative_key']['w'].size
  expected = (2 * tokens * matmul_weights + 2 * length * relative
              + blocks * 3 * 2 * tokens * length * width)
  assert counts['lm_blocks'].forward == pytest.approx(expected)
  # 39 TFLOP in all: NFNet-F6 forward 9.1 (227 GFLOP per 320 px image), LM
  # 10.4, xattn 15.1, resampler 3.9, unembedding 0.5.
  assert 35e12 < flops_lib.total({'m3w': counts}).total < 45e12
  assert counts['vision_encoder'].forward == pytest.approx(40 * 227e9,
                                                           rel=0.01)


@pytest.mark.parametrize('kind,tflops', [
    ('NVIDIA H200', 989), ('NVIDIA H100 80GB HBM3', 989),
    ('NVIDIA H100 PCIe', 756), ('NVIDIA A100-SXM4-80GB', 312),
    ('TPU v4', 275), ('TPU v5 lite', 197), ('TPU v5', 459),
    ('TPU v6 lite', 918), ('cpu', None)])
def test_peak_is_read_from_the_device_kind(kind, tflops):
  peak = metrics_lib.peak_flops_per_device(types.SimpleNamespace(
      device_kind=kind))
  assert peak == (tflops * 1e12 if tflops else None)


def test_mfu_divides_the_global_count_by_the_peak_of_every_device():
  # 8 devices at 100 TFLOP/s each, 400 TFLOP per step, 1 step/s: 50%.
  assert metrics_lib.mfu(400e12, 1.0, 100e12, 8) == pytest.approx(0.5)
  assert metrics_lib.mfu(None, 1.0, 100e12, 8) is None
  assert metrics_lib.mfu(400e12, 1.0, None, 8) is None


def test_forward_count_equals_xla_for_a_published_lm_layout():
  """LLaMA's layout (grouped-query attention, SwiGLU), with tied
  embeddings: the count follows the parameters that are there."""
  from flamingo_jax.models import lm_layout  # pylint: disable=g-import-not-at-top
  config = _config()
  lm = config.model.lm
  config.model.lm = lm_layout.family_config(
      'llama', num_layers=2, width=lm.width, num_heads=lm.num_heads,
      head_size=lm.head_size, vocab_size=lm.vocab_size, num_kv_heads=2,
      ffw_hidden=3 * lm.width, tied_embeddings=True, remat_policy='none')
  params = flops_lib.abstract_params(config)
  assert 'lm/unembed' not in params and 'lm/blocks/block/ffw/gate' in params
  _assert_forward_count_equals_xla(config)
