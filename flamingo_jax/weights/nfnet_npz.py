"""DeepMind's NFNet-F0..F6 Haiku weights (`F{0..6}_haiku.npz`, a dill
pickle read by `haiku_pickle`; see there).

The release's parameter names come from deepmind-research `nfnets/nfnet.py`
(module `NFNet`, blocks built unnamed in its constructor, so Haiku numbers
them `nf_block`, `nf_block_1`, ... in network order; squeeze-excite's two
unnamed linears are `linear`, `linear_1`). Ours name blocks by stage and
position (`models/nfnet.py:block_schedule`, the same order):

  NFNet/~/stem_conv{0..3}/{w,gain,bias}      -> stem_conv{0..3}/...
  NFNet/~/nf_block_n/~/conv{0,1,1b,2}/...    -> stage{s}_block{b}/conv.../...
  NFNet/~/nf_block_n/~/conv_shortcut/...     -> .../conv_shortcut/...
  NFNet/~/nf_block_n/~/squeeze_excite/~/linear, linear_1
                                             -> .../squeeze_excite/fc0, fc1
  NFNet/~/nf_block_n/skip_gain               -> stage{s}_block{b}/skip_gain
  NFNet/~/final_conv/...                     -> final_conv/...
All arrays keep their layout (both are Haiku: HWIO kernels, [in, out]
linears). The ImageNet classifier (`NFNet/~/linear`) is left unused: the
encoder hands on its features.
"""

import re
from typing import Any, Optional

from flamingo_jax.models import nfnet
from flamingo_jax.weights import haiku_pickle
from flamingo_jax.weights import mapping
from flamingo_jax.weights import tensors as tensors_lib
from flamingo_jax.weights import vision

KIND = 'nfnet_npz'
SUMMARY = "DeepMind NFNet-F0..F6 Haiku weights (F*_haiku.npz, a dill pickle)"
_ROOT = 'NFNet/~/'
_BLOCK = re.compile(r'NFNet/~/nf_block(?:_(\d+))?/~/(\w+)/w')
_CONVS = ('conv0', 'conv1', 'conv1b', 'conv2', 'conv_shortcut')
_PARAMS = ('w', 'gain', 'bias')


def add_arguments(parser) -> tuple[str, ...]:
  """The convert CLI's options for this source (none)."""
  del parser
  return ()


def read(path: str) -> tensors_lib.TensorStore:
  return haiku_pickle.read(path)


def _block_name(index: int) -> str:
  return f'{_ROOT}nf_block' + (f'_{index}' if index else '')


def _blocks(tensors: tensors_lib.TensorStore) -> dict[int, dict[str, Any]]:
  """Block index -> {conv name: kernel shape}, from the names."""
  blocks: dict[int, dict[str, Any]] = {}
  for name in tensors:
    match = _BLOCK.fullmatch(name)
    if match:
      index = int(match.group(1) or 0)
      blocks.setdefault(index, {})[match.group(2)] = tensors.info(name).shape
  return dict(sorted(blocks.items()))


def structure(tensors: tensors_lib.TensorStore) -> dict[str, Any]:
  """depths, widths, stem widths and group width, read off the shapes.

  Each stage starts with the one block that has a shortcut conv.
  """
  blocks = _blocks(tensors)
  if not blocks or list(blocks) != list(range(len(blocks))):
    raise ValueError(f'{tensors.source}: no NFNet blocks NFNet/~/nf_block* '
                     f'numbered 0.. (found {list(blocks)[:10]}).')
  starts = [i for i, convs in blocks.items() if 'conv_shortcut' in convs]
  if not starts or starts[0] != 0:
    raise ValueError(f'{tensors.source}: block 0 has no shortcut conv.')
  depths = tuple(b - a for a, b in zip(starts, starts[1:] + [len(blocks)]))
  widths = tuple(blocks[s]['conv2'][-1] for s in starts)
  stem = tuple(tensors.info(f'{_ROOT}stem_conv{i}/w').shape[-1]
               for i in range(4))
  group_width = blocks[0]['conv1'][2]
  return dict(depths=depths, widths=widths, stem_widths=stem,
              group_width=group_width)


def config_from(path: str, tensors: Optional[tensors_lib.TensorStore] = None
                ) -> dict[str, Any]:
  """The `vision` config: `{'encoder': 'nfnet', 'variant': 'F6'}` etc."""
  tensors = tensors if tensors is not None else read(path)
  variant = vision.nfnet_variant(**structure(tensors), source=path)
  return dict(encoder='nfnet', variant=variant, gelu_approximate=True,
              weight_standardization='deepmind')


def rules(variant: str) -> list[mapping.Rule]:
  """The name table of `variant` (one rule per tensor)."""
  root = vision.ROOT
  table = []

  def same(source: str, target: str) -> None:
    table.append(mapping.Rule(re.escape(source), target))

  for i in range(4):
    for p in _PARAMS:
      same(f'{_ROOT}stem_conv{i}/{p}', f'{root}/stem_conv{i}/{p}')
  for p in _PARAMS:
    same(f'{_ROOT}final_conv/{p}', f'{root}/final_conv/{p}')
  for index, spec in enumerate(nfnet.block_schedule(variant, 0.0)):
    source, target = _block_name(index), f'{root}/{spec.name}'
    same(f'{source}/skip_gain', f'{target}/skip_gain')
    for conv in _CONVS:
      for p in _PARAMS:
        same(f'{source}/~/{conv}/{p}', f'{target}/{conv}/{p}')
    for theirs, ours in (('linear', 'fc0'), ('linear_1', 'fc1')):
      for p in ('w', 'b'):
        same(f'{source}/~/squeeze_excite/~/{theirs}/{p}',
             f'{target}/squeeze_excite/{ours}/{p}')
  return table


def to_params(tensors: tensors_lib.TensorStore, config: dict[str, Any], *,
              dtype: Any = 'float32') -> mapping.Params:
  """The `vision_encoder/...` parameters of `config` from `tensors`."""
  return mapping.map_tensors(
      tensors, rules(config['variant']), vision.abstract_params(config),
      ignore=[re.escape(f'{_ROOT}linear/') + '(w|b)'], dtype=dtype,
      what='DeepMind NFNet')
