"""timm's `dm_nfnet_f0..f6` (DeepMind's NFNet weights ported to PyTorch):
`pytorch_model.bin`, `model.safetensors` or the release `.pth`.

Tensor layout (timm `models/nfnet.py`, `NormFreeNet` with the 'deep_quad'
stem, `extra_conv`, SE after the last conv, skipinit gains):

  stem.conv{1..4}.{weight,gain,bias}          -> stem_conv{0..3}/{w,gain,bias}
  stages.s.b.conv1 / conv2 / conv2b / conv3   -> stage{s}_block{b}/conv0 /
                                                 conv1 / conv1b / conv2
  stages.s.b.downsample.conv                  -> .../conv_shortcut
  stages.s.b.attn_last.fc1 / fc2 (1x1 convs)  -> .../squeeze_excite/fc0 / fc1
  stages.s.b.skipinit_gain                    -> .../skip_gain
  final_conv                                  -> final_conv
Kernels go OIHW -> HWIO, gains [O, 1, 1, 1] -> [O], the SE's 1x1 convs
[out, in, 1, 1] -> [in, out]. The classifier `head.fc` is left unused.

Numerics: timm computes exact GELU and standardises with `var + 1e-5`
(models/nfnet.py's module docstring); `config_from` sets
`gelu_approximate=False, weight_standardization='timm'` so that the features
equal timm's. These weights were trained in Haiku, under DeepMind's numerics;
`numerics='deepmind'` gives those instead (the outputs then differ from
timm's by ~1e-2 relative).
"""

import re
from typing import Any, Optional

import numpy as np

from flamingo_jax.weights import mapping
from flamingo_jax.weights import tensors as tensors_lib
from flamingo_jax.weights import vision

KIND = 'timm_nfnet'
SUMMARY = "timm dm_nfnet_f0..f6 (.bin, .pth or .safetensors)"
NUMERICS = {
    'timm': dict(gelu_approximate=False, weight_standardization='timm'),
    'deepmind': dict(gelu_approximate=True, weight_standardization='deepmind'),
}
_BLOCK = re.compile(r'stages\.(\d+)\.(\d+)\.conv3\.weight')


def add_arguments(parser) -> tuple[str, ...]:
  """The convert CLI's options for this source; returns their names."""
  parser.add_argument(
      '--numerics', choices=sorted(NUMERICS), default='timm',
      help="'timm' reproduces timm's outputs; 'deepmind' computes as the "
           'Haiku release these weights come from.')
  return ('numerics',)


def read(path: str) -> tensors_lib.TensorStore:
  return tensors_lib.open_path(path)


def structure(tensors: tensors_lib.TensorStore) -> dict[str, Any]:
  """depths, widths, stem widths and group width, read off the shapes."""
  depths: dict[int, int] = {}
  widths: dict[int, int] = {}
  for name in tensors:
    match = _BLOCK.fullmatch(name)
    if match:
      stage, block = int(match.group(1)), int(match.group(2))
      depths[stage] = max(depths.get(stage, 0), block + 1)
      if block == 0:
        widths[stage] = tensors.info(name).shape[0]
  if not depths or sorted(depths) != list(range(len(depths))):
    raise ValueError(f'{tensors.source}: no timm NFNet stages.s.b.conv3 '
                     f'(found stages {sorted(depths)}).')
  stem = tuple(tensors.info(f'stem.conv{i}.weight').shape[0]
               for i in range(1, 5))
  group_width = tensors.info('stages.0.0.conv2.weight').shape[1]
  return dict(depths=tuple(depths[s] for s in sorted(depths)),
              widths=tuple(widths[s] for s in sorted(widths)),
              stem_widths=stem, group_width=group_width)


def config_from(path: str, tensors: Optional[tensors_lib.TensorStore] = None,
                *, numerics: str = 'timm') -> dict[str, Any]:
  """The `vision` config; `numerics`: 'timm' (default) or 'deepmind'."""
  if numerics not in NUMERICS:
    raise ValueError(f'numerics must be one of {sorted(NUMERICS)}; got '
                     f'{numerics!r}.')
  tensors = tensors if tensors is not None else read(path)
  variant = vision.nfnet_variant(**structure(tensors), source=path)
  return dict(encoder='nfnet', variant=variant, **NUMERICS[numerics])


def _gain(x: np.ndarray) -> np.ndarray:
  return x.reshape(x.shape[0])


def _one_by_one(x: np.ndarray) -> np.ndarray:
  """A 1x1 conv [out, in, 1, 1] as a linear [in, out]."""
  return x.reshape(x.shape[:2]).T


def _conv_rules(source: str, target: str) -> list[mapping.Rule]:
  return [
      mapping.Rule(rf'{source}\.weight', f'{target}/w', mapping.conv_kernel),
      mapping.Rule(rf'{source}\.gain', f'{target}/gain', _gain),
      mapping.Rule(rf'{source}\.bias', f'{target}/bias'),
  ]


def rules() -> list[mapping.Rule]:
  """The name table (the block's stage and index come from the match)."""
  root = vision.ROOT
  block = r'stages\.(?P<stage>\d+)\.(?P<block>\d+)\.'
  ours = f'{root}/stage{{stage}}_block{{block}}'
  table = []
  for i in range(4):
    table += _conv_rules(rf'stem\.conv{i + 1}', f'{root}/stem_conv{i}')
  table += _conv_rules(r'final_conv', f'{root}/final_conv')
  for theirs, mine in (('conv1', 'conv0'), ('conv2', 'conv1'),
                       ('conv2b', 'conv1b'), ('conv3', 'conv2'),
                       (r'downsample\.conv', 'conv_shortcut')):
    table += _conv_rules(f'{block}{theirs}', f'{ours}/{mine}')
  for theirs, mine in (('fc1', 'fc0'), ('fc2', 'fc1')):
    table.append(mapping.Rule(rf'{block}attn_last\.{theirs}\.weight',
                              f'{ours}/squeeze_excite/{mine}/w', _one_by_one))
    table.append(mapping.Rule(rf'{block}attn_last\.{theirs}\.bias',
                              f'{ours}/squeeze_excite/{mine}/b'))
  table.append(mapping.Rule(rf'{block}skipinit_gain', f'{ours}/skip_gain'))
  return table


def to_params(tensors: tensors_lib.TensorStore, config: dict[str, Any], *,
              dtype: Any = 'float32') -> mapping.Params:
  """The `vision_encoder/...` parameters of `config` from `tensors`."""
  return mapping.map_tensors(
      tensors, rules(), vision.abstract_params(config),
      ignore=[r'head\.fc\.(weight|bias)'], dtype=dtype, what='timm NFNet')
