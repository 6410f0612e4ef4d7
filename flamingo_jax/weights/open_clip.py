"""OpenCLIP / OpenAI CLIP vision towers (the `visual.` part of a CLIP
state dict): `open_clip_pytorch_model.bin`, `open_clip_model.safetensors`,
any `.pt`/`.bin`/`.safetensors` holding `model.state_dict()`, or OpenAI's
original release (`ViT-L-14.pt`: a TorchScript archive, read without
running its code by `torch_file`).

Tensor layout (`P` = `visual.`, found from the names; a bare tower has no
prefix):

  P class_embedding [D]                    -> class_embedding
  P positional_embedding [1 + g*g, D]      -> position_embeddings
  P conv1.weight [D, 3, p, p]              -> patch_embedding/w (HWIO)
  P ln_pre / ln_post                       -> ln_pre / ln_post
  P proj [D, E] (x @ proj)                 -> projection/w (as is)
  P transformer.resblocks.i.ln_1 / ln_2    -> transformer/ln_1 / ln_2 [i]
  P ...attn.in_proj_weight [3D, D], _bias  -> attention/{query,key,value} [i]
  P ...attn.out_proj                       -> attention/output [i]
  P ...mlp.c_fc / c_proj                   -> mlp/hidden / mlp/output [i]

The text tower and `logit_scale` are left unused. Towers with parts our ViT
lacks (an attentional pooler, layer scale, a timm trunk) stop with the
unmatched tensors named.

The activation is not in the weights: OpenAI's towers use quick-GELU,
LAION's (e.g. ViT-H-14 laion2b) exact GELU. It is read from
`open_clip_config.json` (`model_cfg.quick_gelu`) beside the weights, or must
be given. The number of heads is `width / head_width` (`head_width` 64
unless the config says otherwise; 80 for ViT-H-14).

OpenFlamingo feeds its resampler `vision_encoder.visual(x)[1]`: the last
block's patch tokens, before `ln_post` with open_clip 2.16-2.22 (which it was
trained with; `tokens='last_block'`) and after it from open_clip 2.23
(`tokens='ln_post'`).
"""

import json
import os
from typing import Any, Optional

import numpy as np

from flamingo_jax.weights import mapping
from flamingo_jax.weights import tensors as tensors_lib
from flamingo_jax.weights import vision

KIND = 'open_clip'
SUMMARY = ('OpenCLIP / OpenAI CLIP vision tower (state dict: .bin, .pt or '
           ".safetensors, or OpenAI's TorchScript .pt; "
           'open_clip_config.json beside it if any)')
_ANCHOR = 'conv1.weight'


def add_arguments(parser) -> tuple[str, ...]:
  """The convert CLI's options for this source; returns their names."""
  names = vision.add_vit_token_arguments(parser)
  parser.add_argument(
      '--activation', choices=('quick_gelu', 'gelu'), default=None,
      help="default: from open_clip_config.json beside the weights; "
           "OpenAI's towers use quick_gelu, LAION's gelu.")
  parser.add_argument('--head_width', type=int, default=None,
                      help='channels per attention head (default: from '
                           'open_clip_config.json, else 64).')
  return names + ('activation', 'head_width')


def read(path: str) -> tensors_lib.TensorStore:
  return tensors_lib.open_path(path)


def prefix_of(tensors: tensors_lib.TensorStore) -> str:
  """'visual.' for a whole CLIP model, '' for a bare tower."""
  found = [n[:-len(_ANCHOR)] for n in tensors
           if n.endswith(_ANCHOR) and
           f'{n[:-len(_ANCHOR)]}positional_embedding' in tensors]
  if len(found) != 1:
    raise ValueError(
        f'{tensors.source}: expected one CLIP vision tower (conv1.weight '
        f'beside positional_embedding); found prefixes {found}.')
  return found[0]


def _open_clip_config(path: str) -> Optional[dict[str, Any]]:
  directory = path if os.path.isdir(path) else os.path.dirname(path)
  config_path = os.path.join(directory, 'open_clip_config.json')
  if not os.path.isfile(config_path):
    return None
  with open(config_path) as f:
    config = json.load(f)
  return config.get('model_cfg', config)


def config_from(path: str, tensors: Optional[tensors_lib.TensorStore] = None,
                *, activation: Optional[str] = None,
                head_width: Optional[int] = None, tokens: str = 'ln_post',
                keep_class_token: bool = False) -> dict[str, Any]:
  """The `vision` config of the tower at `path`.

  Args:
    path: the weights file (or its directory).
    tensors: the store, if already open.
    activation: 'quick_gelu' or 'gelu'; default from open_clip_config.json
      (an error without one).
    head_width: channels per head; default from the config, else 64.
    tokens, keep_class_token: which activations the encoder hands on.

  Returns:
    The `config.model.vision` dict.
  """
  tensors = tensors if tensors is not None else read(path)
  p = prefix_of(tensors)
  model_cfg = _open_clip_config(path) or {}
  vision_cfg = model_cfg.get('vision_cfg', {})
  if activation is None:
    if 'quick_gelu' not in model_cfg:
      raise ValueError(
          f'{path}: the activation is not in the weights and there is no '
          'open_clip_config.json with model_cfg.quick_gelu beside them; '
          "give activation='quick_gelu' (OpenAI's weights) or 'gelu' "
          '(LAION, DataComp).')
    activation = 'quick_gelu' if model_cfg['quick_gelu'] else 'gelu'
  width, _, patch, _ = tensors.info(f'{p}conv1.weight').shape
  grid_rows = tensors.info(f'{p}positional_embedding').shape[0] - 1
  grid = int(round(np.sqrt(grid_rows)))
  depth = len({n for n in tensors if n.startswith(f'{p}transformer.resblocks.')
               and n.endswith('.ln_1.weight')})
  mlp_dim = tensors.info(
      f'{p}transformer.resblocks.0.mlp.c_fc.weight').shape[0]
  head_width = head_width or vision_cfg.get('head_width', 64)
  if width % head_width:
    raise ValueError(f'{path}: width {width} is not a multiple of '
                     f'head_width {head_width}.')
  embed_dim = (tensors.info(f'{p}proj').shape[1] if f'{p}proj' in tensors
               else None)
  return vision.vit_config(
      patch_size=patch, width=width, depth=depth,
      num_heads=width // head_width, mlp_dim=mlp_dim, embed_dim=embed_dim,
      image_size=grid * patch, activation=activation, tokens=tokens,
      keep_class_token=keep_class_token)


def rules(prefix: str) -> list[mapping.Rule]:
  """The name table, for a tower under `prefix`."""
  p = prefix.replace('.', r'\.')
  block = rf'{p}transformer\.resblocks\.(?P<layer>\d+)\.'
  root = vision.ROOT
  stack = f'{root}/transformer'
  attention = f'{stack}/attention'
  qkv = tuple(f'{attention}/{n}' for n in ('query', 'key', 'value'))
  table = [
      mapping.Rule(rf'{p}class_embedding', f'{root}/class_embedding'),
      mapping.Rule(rf'{p}positional_embedding',
                   f'{root}/position_embeddings'),
      mapping.Rule(rf'{p}conv1\.weight', f'{root}/patch_embedding/w',
                   mapping.conv_kernel),
      mapping.Rule(rf'{p}proj', f'{root}/projection/w'),
      mapping.Rule(rf'{block}attn\.in_proj_weight',
                   tuple(f'{t}/w' for t in qkv),
                   mapping.split_rows(3, mapping.transpose)),
      mapping.Rule(rf'{block}attn\.in_proj_bias',
                   tuple(f'{t}/b' for t in qkv), mapping.split_rows(3)),
  ]
  norms = {f'{p}ln_pre': f'{root}/ln_pre', f'{p}ln_post': f'{root}/ln_post',
           f'{block}ln_1': f'{stack}/ln_1', f'{block}ln_2': f'{stack}/ln_2'}
  for source, target in norms.items():
    table.append(mapping.Rule(rf'{source}\.weight', f'{target}/scale'))
    table.append(mapping.Rule(rf'{source}\.bias', f'{target}/offset'))
  linears = {rf'{block}attn\.out_proj': f'{attention}/output',
             rf'{block}mlp\.c_fc': f'{stack}/mlp/hidden',
             rf'{block}mlp\.c_proj': f'{stack}/mlp/output'}
  for source, target in linears.items():
    table.append(mapping.Rule(rf'{source}\.weight', f'{target}/w',
                              mapping.transpose))
    table.append(mapping.Rule(rf'{source}\.bias', f'{target}/b'))
  return table


def to_params(tensors: tensors_lib.TensorStore, config: dict[str, Any], *,
              dtype: Any = 'float32') -> mapping.Params:
  """The `vision_encoder/...` parameters of `config` from `tensors`."""
  prefix = prefix_of(tensors)
  ignore = [rf'(?!{prefix.replace(".", chr(92) + ".")}).*'] if prefix else []
  return mapping.map_tensors(
      tensors, rules(prefix), vision.abstract_params(config), ignore=ignore,
      dtype=dtype, what='OpenCLIP vision tower')
