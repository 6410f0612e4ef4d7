"""Hugging Face CLIP vision towers (`CLIPVisionModel`, `...WithProjection`,
`CLIPModel`): safetensors or `pytorch_model.bin`, with their config.json.

Tensor layout (`P` = the tower's prefix, `vision_model.`; found from the
names, so a tower nested in a bigger model, e.g. IDEFICS's
`model.vision_model.`, is read the same way):

  P embeddings.class_embedding               -> class_embedding
  P embeddings.patch_embedding.weight [D,3,p,p] -> patch_embedding/w (HWIO)
  P embeddings.position_embedding.weight     -> position_embeddings
  P pre_layrnorm / post_layernorm            -> ln_pre / ln_post
  P encoder.layers.i.layer_norm1 / 2         -> transformer/ln_1 / ln_2 [i]
  P encoder.layers.i.self_attn.{q,k,v,out}_proj -> transformer/attention/
                                                 {query,key,value,output} [i]
  P encoder.layers.i.mlp.fc1 / fc2           -> transformer/mlp/hidden/output
  visual_projection.weight [E, D]            -> projection/w (when present)

Linear weights are transposed ([out, in] -> [in, out]). Left unused: the
`position_ids` buffer and, in a `CLIPModel`, the text tower. `hidden_act`
'quick_gelu' (OpenAI's weights) or 'gelu' (exact; LAION's) sets the ViT's
`activation`; `last_hidden_state` is our `tokens='last_block'` with the class
token kept, `pooler_output` our `pooled` without projection.
"""

import json
import os
from typing import Any, Optional

from flamingo_jax.weights import mapping
from flamingo_jax.weights import tensors as tensors_lib
from flamingo_jax.weights import vision

KIND = 'hf_clip'
SUMMARY = ('Hugging Face CLIPVisionModel / CLIPModel vision tower '
           '(safetensors or .bin, with config.json)')
_ANCHOR = 'embeddings.patch_embedding.weight'


def add_arguments(parser) -> tuple[str, ...]:
  """The convert CLI's options for this source; returns their names."""
  return vision.add_vit_token_arguments(parser)


def read(path: str) -> tensors_lib.TensorStore:
  return tensors_lib.open_path(path)


def prefix_of(tensors: tensors_lib.TensorStore) -> str:
  """The tower's name prefix, e.g. 'vision_model.'."""
  found = [n[:-len(_ANCHOR)] for n in tensors if n.endswith(_ANCHOR)]
  if len(found) != 1:
    raise ValueError(
        f'{tensors.source}: expected one tensor named '
        f'*{_ANCHOR} (a Hugging Face CLIP vision tower); found {found}.')
  return found[0]


def _hf_config(path: str) -> Optional[dict[str, Any]]:
  directory = path if os.path.isdir(path) else os.path.dirname(path)
  config_path = os.path.join(directory, 'config.json')
  if not os.path.isfile(config_path):
    return None
  with open(config_path) as f:
    config = json.load(f)
  if 'vision_config' in config:  # CLIPModel, IDEFICS...
    config = config['vision_config']
  return config


def config_from(path: str, tensors: Optional[tensors_lib.TensorStore] = None,
                *, tokens: str = 'ln_post', keep_class_token: bool = False
                ) -> dict[str, Any]:
  """The `vision` config of the tower at `path` (its config.json + shapes).

  Args:
    path: the weights file or its directory (config.json sits beside).
    tensors: the store, if already open.
    tokens, keep_class_token: which activations the encoder hands on (see
      models/vit.py); not a property of the weights.

  Returns:
    The `config.model.vision` dict.
  """
  tensors = tensors if tensors is not None else read(path)
  prefix = prefix_of(tensors)
  config = _hf_config(path)
  if config is None:
    raise FileNotFoundError(
        f'No config.json beside {path}: the number of heads and the '
        'activation (hidden_act) are not in the weights.')
  eps = config.get('layer_norm_eps', 1e-5)
  if abs(eps - 1e-5) > 1e-12:
    raise ValueError(f'{path}: layer_norm_eps={eps}; our ViT uses 1e-5.')
  activation = config.get('hidden_act', 'quick_gelu')
  if activation not in ('quick_gelu', 'gelu'):
    raise ValueError(f'{path}: hidden_act {activation!r} is neither '
                     "'quick_gelu' nor 'gelu'.")
  projection = 'visual_projection.weight' in tensors
  depth = len({n for n in tensors
               if n.startswith(f'{prefix}encoder.layers.')
               and n.endswith('.layer_norm1.weight')})
  # Sizes from the shapes; heads and activation from the config, with
  # transformers' CLIPVisionConfig defaults for what it leaves out.
  width, _, patch, _ = tensors.info(f'{prefix}{_ANCHOR}').shape
  rows = tensors.info(f'{prefix}embeddings.position_embedding.weight').shape[0]
  grid = int(round((rows - 1) ** 0.5))
  mlp_dim = tensors.info(
      f'{prefix}encoder.layers.0.mlp.fc1.weight').shape[0]
  return vision.vit_config(
      patch_size=patch, width=width, depth=depth,
      num_heads=config.get('num_attention_heads', 12), mlp_dim=mlp_dim,
      embed_dim=(tensors.info('visual_projection.weight').shape[0]
                 if projection else None),
      image_size=grid * patch, activation=activation, tokens=tokens,
      keep_class_token=keep_class_token)


def rules(prefix: str) -> list[mapping.Rule]:
  """The name table, for a tower under `prefix`."""
  p = prefix.replace('.', r'\.')
  layer = rf'{p}encoder\.layers\.(?P<layer>\d+)\.'
  root = vision.ROOT
  stack = f'{root}/transformer'
  table = [
      mapping.Rule(rf'{p}embeddings\.class_embedding',
                   f'{root}/class_embedding'),
      mapping.Rule(rf'{p}embeddings\.patch_embedding\.weight',
                   f'{root}/patch_embedding/w', mapping.conv_kernel),
      mapping.Rule(rf'{p}embeddings\.position_embedding\.weight',
                   f'{root}/position_embeddings'),
      mapping.Rule(r'visual_projection\.weight', f'{root}/projection/w',
                   mapping.transpose),
  ]
  norms = {f'{p}pre_layrnorm': f'{root}/ln_pre',
           f'{p}post_layernorm': f'{root}/ln_post',
           f'{layer}layer_norm1': f'{stack}/ln_1',
           f'{layer}layer_norm2': f'{stack}/ln_2'}
  for source, target in norms.items():
    table.append(mapping.Rule(rf'{source}\.weight', f'{target}/scale'))
    table.append(mapping.Rule(rf'{source}\.bias', f'{target}/offset'))
  linears = {f'{layer}self_attn\\.q_proj': f'{stack}/attention/query',
             f'{layer}self_attn\\.k_proj': f'{stack}/attention/key',
             f'{layer}self_attn\\.v_proj': f'{stack}/attention/value',
             f'{layer}self_attn\\.out_proj': f'{stack}/attention/output',
             f'{layer}mlp\\.fc1': f'{stack}/mlp/hidden',
             f'{layer}mlp\\.fc2': f'{stack}/mlp/output'}
  for source, target in linears.items():
    table.append(mapping.Rule(rf'{source}\.weight', f'{target}/w',
                              mapping.transpose))
    table.append(mapping.Rule(rf'{source}\.bias', f'{target}/b'))
  return table


def ignored(prefix: str) -> list[str]:
  """What a vision import leaves: position_ids, and all outside the tower."""
  p = prefix.replace('.', r'\.')
  return [rf'{p}embeddings\.position_ids',
          rf'(?!{p}|visual_projection\.).*']


def to_params(tensors: tensors_lib.TensorStore, config: dict[str, Any], *,
              dtype: Any = 'float32') -> mapping.Params:
  """The `vision_encoder/...` parameters of `config` from `tensors`."""
  prefix = prefix_of(tensors)
  return mapping.map_tensors(
      tensors, rules(prefix), vision.abstract_params(config),
      ignore=ignored(prefix), dtype=dtype,
      what='Hugging Face CLIP vision tower')
