"""IDEFICS (Laurençon et al., 2023): transformers' `IdeficsForVisionText2Text`
checkpoint (HuggingFaceM4/idefics-9b, idefics-80b and their -instruct) as
one Flamingo.

  python -m flamingo_jax.weights.convert idefics ~/idefics-9b --workdir W

reads the published folder (`config.json`, the safetensors shards with
`model.safetensors.index.json`, `tokenizer.json`) and writes a workdir that
`flamingo_jax.load(W)` takes: `config.json` (`task: 'flamingo'`, the
'idefics' variant (`models/variants.py`) at the sizes of the files,
`eval.max_len`, `data.tokenizer`), the parameters as one orbax checkpoint,
and the tokenizer with IDEFICS's markers.

Tokens and prompts. IDEFICS's processor writes each image as
`<fake_token_around_image><image><fake_token_around_image>` (two images in
a row share the middle fake token); a token sees the last `<image>` at or
before it, and text before the first image sees none. In flamingo_jax,
`<image>` is IDEFICS's `<image>` (an `additional_vocab_size` row), and the
tokenizer writes the fake tokens around it as the processor does
(`Markers.image_around`), so flamingo_jax's prompts (`<image>Output: a
cat<EOC>`, `few_shot`, the evaluation tasks, the data formatting) get
IDEFICS's ids; a text that spells the fake tokens out is encoded the same.
phi gives every token the image of the processor's `image_attention_mask`
(the processor also resets it after each `</s>`, which flamingo_jax's
prompts do not contain). `<EOC>` is `<end_of_utterance>`, IDEFICS's end
of a turn, added to the tokenizer when it lacks it; the embedding and
output rows follow the tokenizer as in `hf_lm` (a token without a row in
the checkpoint gets the mean row), so a model that never saw it ends its
generations at `</s>` or at the token budget.

Name map (i: resampler block; l: cross-attention layer, a row of the
stacked `gated_xattn/block`, inserted before LM block l * interval):
  model.vision_model.*                     vision_encoder/... (hf_clip;
                                           `tokens='last_block'`, class
                                           token kept, `post_layernorm` read
                                           but unused, as in IDEFICS)
  model.embed_tokens.weight [V, D] and     lm/embed/embeddings [V + A, D]
    .additional_embedding.weight [A, D]      (rows concatenated)
  lm_head.weight and .additional_fc.weight lm/unembed/w [D, V + A]
  model.layers.*, model.norm               lm/... (hf_llama's table)
  model.perceiver_resampler.latents        perceiver_resampler/latents
  ...blocks.i.0.context_layer_norm / latents_layer_norm
                                           layer_i/features_norm /
                                           latents_norm
  ...blocks.i.0.{q,k,v,output}_proj        layer_i/attention/{query,key,
                                           value,output}
  ...blocks.i.0.{q,k}_layer_norm           layer_i/attention/{query,key}_norm
  ...blocks.i.1.ln / fc / c_proj           layer_i/ffw_norm / ffw/hidden /
                                           ffw/output
  ...perceiver_resampler.layer_norm        perceiver_resampler/output_norm
  model.gated_cross_attn_layers.l.alpha_cross_attn / alpha_dense [1] or
    [1, 1, D]                              attn_gate / ffw_gate [] or [D]
  ...input_layernorm / post_attention_layernorm  query_norm / ffw_norm
  ...cross_attn.{q,k,v,o}_proj             cross_attention/{query,key,value,
                                           output}
  ...cross_attn.{q,k}_layer_norm           cross_attention/{query,key}_norm
  ...mlp.{gate,up,down}_proj               ffw/{gate,hidden,output}
Our `time_embeddings` are zeros (IDEFICS has none). Linear weights are
transposed. A checkpoint without a resampler (`use_resampler: false`) is
refused.
"""

import json
import os
import re
from typing import Any

import numpy as np

from flamingo_jax.models import flamingo
from flamingo_jax.models import variants
from flamingo_jax.weights import hf_clip
from flamingo_jax.weights import hf_lm
from flamingo_jax.weights import hf_llama
from flamingo_jax.weights import mapping
from flamingo_jax.weights import tensors as tensors_lib

KIND = 'idefics'
SUMMARY = ("IDEFICS's Hugging Face folder (IdeficsForVisionText2Text: "
           'sharded safetensors, config.json, tokenizer.json): a whole '
           'Flamingo that load() takes')

# IDEFICS's markers: `<image>` is ours, `<end_of_utterance>` our `<EOC>`;
# added in this order when the tokenizer lacks them.
IMAGE = '<image>'
FAKE_IMAGE = '<fake_token_around_image>'
EOC = '<end_of_utterance>'
ADDED = (FAKE_IMAGE, IMAGE, EOC)

_VISION = 'model.vision_model.'
_OWN = ('model.perceiver_resampler.', 'model.gated_cross_attn_layers.')
_LM = re.compile(r'model\.(embed_tokens|layers|norm)\..*|lm_head\..*')
_TABLES = {  # Our table: (the checkpoint's table, its additional rows).
    'model.embed_tokens.weight': 'model.embed_tokens.additional_embedding.'
                                 'weight',
    'lm_head.weight': 'lm_head.additional_fc.weight',
}


def add_arguments(parser) -> tuple[str, ...]:
  """The convert CLI's options for this source; returns their names."""
  parser.add_argument('--max_len', type=int, default=None,
                      help='eval.max_len: the longest prompt plus new tokens '
                           'that load() accepts (default: config.json\'s '
                           'max_position_embeddings)')
  return ('max_len',)


def read(path: str) -> tensors_lib.TensorStore:
  return tensors_lib.open_path(path)


def hf_config(path: str) -> dict[str, Any]:
  """config.json beside the weights, checked to be IDEFICS's."""
  file = os.path.join(hf_lm.directory_of(path), 'config.json')
  if not os.path.isfile(file):
    raise FileNotFoundError(f'No config.json beside {path}: an IDEFICS '
                            'folder holds one (heads, intervals, norms).')
  with open(file) as f:
    config = json.load(f)
  if config.get('model_type') != 'idefics':
    raise mapping.CheckpointMismatchError(
        f"{file} has model_type {config.get('model_type')!r}: not an "
        "IDEFICS checkpoint (expected 'idefics').")
  perceiver = config.get('perceiver_config') or {}
  if not (config.get('use_resampler') or perceiver.get('use_resampler')):
    raise ValueError(f'{file}: use_resampler is false (the vision tokens '
                     'go to the LM directly); flamingo_jax always resamples.')
  return config


def split(store: tensors_lib.TensorStore
          ) -> tuple[list[str], list[str], list[str]]:
  """The tensor names by part: (vision tower, LM, resampler and
  cross-attention; unknown names go to the last, to be reported)."""
  vision, lm, own = [], [], []
  for name in store:
    if name.startswith(_VISION):
      vision.append(name)
    elif _LM.fullmatch(name):
      lm.append(name)
    else:
      own.append(name)
  return vision, lm, own


def _view(store: tensors_lib.TensorStore, names: list[str]
          ) -> tensors_lib.TensorStore:
  """`store` restricted to `names` (same reads, same release per shard)."""
  infos = {n: store.info(n) for n in names}
  releasers = {g: (lambda g=g: store.release(g)) for g in store.groups()}
  return tensors_lib.TensorStore(infos, store.__getitem__,
                                 releasers=releasers, source=store.source)


def lm_view(store: tensors_lib.TensorStore, names: list[str]
            ) -> tensors_lib.TensorStore:
  """The LM's tensors as a LLaMA checkpoint's: each decoupled table
  (`DecoupledEmbedding`, `DecoupledLinear`) one [V + A, D] table, its
  additional rows after the vocabulary."""
  infos = {n: store.info(n) for n in names if n not in _TABLES.values()}
  for table, extra in _TABLES.items():
    if table not in infos or extra not in names:
      continue
    base, more = store.info(table).shape, store.info(extra).shape
    if len(more) != 2 or more[1:] != base[1:]:
      raise mapping.CheckpointMismatchError(
          f'{store.source}: tensor {extra} has shape {tuple(more)} but '
          f'{table} has {tuple(base)}: the additional rows must be '
          f'[A, {base[1]}].')
    infos[table] = tensors_lib.TensorInfo(
        (base[0] + more[0], *base[1:]), store.info(table).dtype,
        store.info(table).group)

  def load(name: str) -> np.ndarray:
    if name in _TABLES and _TABLES[name] in names:
      return np.concatenate([np.asarray(store[name]),
                             np.asarray(store[_TABLES[name]])])
    return store[name]

  releasers = {g: (lambda g=g: store.release(g)) for g in store.groups()}
  return tensors_lib.TensorStore(infos, load, releasers=releasers,
                                 source=store.source)


def _linear(source: str, target: str) -> list[mapping.Rule]:
  return [mapping.Rule(rf'{source}\.weight', f'{target}/w',
                       mapping.transpose)]


def _norm(source: str, target: str, with_bias: bool = True
          ) -> list[mapping.Rule]:
  return hf_lm.norm(source, target, with_bias)


def _gate(x: np.ndarray) -> np.ndarray:
  """alpha [1] -> [] ('float'), [1, 1, D] -> [D] ('vector')."""
  return x.reshape(()) if x.size == 1 and x.ndim == 1 else x.reshape(-1)


def rules() -> list[mapping.Rule]:
  """The resampler's and the cross-attention layers' name table."""
  root = 'perceiver_resampler'
  p = r'model\.perceiver_resampler\.'
  block = rf'{p}blocks\.(?P<i>\d+)\.'
  layer = f'{root}/layer_{{i}}'
  table = [mapping.Rule(rf'{p}latents', f'{root}/latents')]
  table += _norm(rf'{p}layer_norm', f'{root}/output_norm')
  table += _norm(rf'{block}0\.context_layer_norm', f'{layer}/features_norm')
  table += _norm(rf'{block}0\.latents_layer_norm', f'{layer}/latents_norm')
  table += _norm(rf'{block}0\.q_layer_norm', f'{layer}/attention/query_norm')
  table += _norm(rf'{block}0\.k_layer_norm', f'{layer}/attention/key_norm')
  for source, target in (('q_proj', 'query'), ('k_proj', 'key'),
                         ('v_proj', 'value'), ('output_proj', 'output')):
    table += _linear(rf'{block}0\.{source}', f'{layer}/attention/{target}')
  table += _norm(rf'{block}1\.ln', f'{layer}/ffw_norm')
  table += _linear(rf'{block}1\.fc', f'{layer}/ffw/hidden')
  table += _linear(rf'{block}1\.c_proj', f'{layer}/ffw/output')

  xattn, row = 'gated_xattn/block', (r'model\.gated_cross_attn_layers\.'
                                     r'(?P<layer>\d+)\.')
  table += [mapping.Rule(rf'{row}alpha_cross_attn', f'{xattn}/attn_gate',
                         _gate),
            mapping.Rule(rf'{row}alpha_dense', f'{xattn}/ffw_gate', _gate)]
  table += _norm(rf'{row}input_layernorm', f'{xattn}/query_norm', False)
  table += _norm(rf'{row}post_attention_layernorm', f'{xattn}/ffw_norm',
                 False)
  attention = f'{xattn}/cross_attention'
  for source, target in (('q', 'query'), ('k', 'key'), ('v', 'value'),
                         ('o', 'output')):
    table += _linear(rf'{row}cross_attn\.{source}_proj',
                     f'{attention}/{target}')
  table += _norm(rf'{row}cross_attn\.q_layer_norm', f'{attention}/query_norm',
                 False)
  table += _norm(rf'{row}cross_attn\.k_layer_norm', f'{attention}/key_norm',
                 False)
  for source, target in (('gate', 'gate'), ('up', 'hidden'),
                         ('down', 'output')):
    table += _linear(rf'{row}mlp\.{source}_proj', f'{xattn}/ffw/{target}')
  return table


_IGNORED = [r'.*rotary_emb\.inv_freq']


def tokenizer_for(path: str):
  """The folder's tokenizer with IDEFICS's markers (module docstring)."""
  from flamingo_jax.data import hf_tokenizer  # pylint: disable=g-import-not-at-top
  directory = hf_lm.directory_of(path)
  options = dict(image=IMAGE, eoc=EOC, add=ADDED, pad_if_missing='<unk>',
                 image_around=FAKE_IMAGE)
  if os.path.isfile(os.path.join(directory, hf_tokenizer.FILE)):
    return hf_tokenizer.from_hf(directory, **options)
  if os.path.isfile(os.path.join(directory, hf_tokenizer.SENTENCEPIECE_FILE)):
    return hf_tokenizer.from_sentencepiece(directory, **options)
  raise FileNotFoundError(
      f'No tokenizer.json (or tokenizer.model) in {directory}: the markers\' '
      'ids and the embedding rows follow the tokenizer (give the folder as '
      'published).')


def model_config(config: dict[str, Any], vision: dict[str, Any],
                 lm: dict[str, Any], own: tensors_lib.TensorStore
                 ) -> dict[str, Any]:
  """The 'idefics' variant (models/variants.py) at this checkpoint's
  sizes (config.json for heads and switches, the shapes for the rest)."""
  source = own.source
  perceiver = config.get('perceiver_config') or {}
  interval = int(config.get('cross_layer_interval', 1))
  layers = lm['num_layers']
  if layers % interval:
    raise ValueError(f'{source}: {layers} LM layers are not a multiple of '
                     f'cross_layer_interval={interval}.')
  found = sorted({int(m['layer']) for n in own if (m := re.match(
      r'model\.gated_cross_attn_layers\.(?P<layer>\d+)\.', n))})
  if found != list(range(layers // interval)):
    raise mapping.CheckpointMismatchError(
        f'{source}: gated_cross_attn_layers {found}, but {layers} LM layers '
        f'with cross_layer_interval={interval} need '
        f'{list(range(layers // interval))}.')
  needed = ('model.perceiver_resampler.latents',
            'model.perceiver_resampler.blocks.0.1.fc.weight')
  missing = [n for n in needed if n not in own]
  if missing:
    raise mapping.CheckpointMismatchError(
        f'{source} has no {missing}: not an IDEFICS checkpoint with a '
        'resampler.')
  latents, width = own.info(needed[0]).shape
  inner = own.info(needed[1]).shape[0]
  if inner % width:
    raise mapping.CheckpointMismatchError(
        f'{source}: tensor {needed[1]} has shape {own.info(needed[1]).shape}'
        f', not a multiple of the resampler width {width}.')
  heads = perceiver.get('resampler_n_heads', 16)
  depth = len({n.split('.')[3] for n in own
               if n.startswith('model.perceiver_resampler.blocks.')})
  out = variants.with_variant(flamingo.model_config('tiny'), 'idefics')
  out['vision'] = vision
  out['image_size'] = vision['image_size']
  out['lm'] = dict(lm, remat_policy='none')
  out['resampler'].update(
      num_layers=depth, width=width, num_heads=heads,
      head_size=perceiver.get('resampler_head_dim', 96),
      num_latents=latents, max_frames=1, ffw_multiplier=inner // width,
      qk_norm=bool(perceiver.get('qk_layer_norms_perceiver', False)))
  out['xattn'].update(
      every=interval, attend='last_image', num_heads=lm['num_heads'],
      head_size=lm['width'] // lm['num_heads'],
      ffw_hidden=config.get('intermediate_size'),
      norm_eps=float(config.get('rms_norm_eps', 1e-6)),
      alpha_type=config.get('alpha_type', 'float'),
      qk_norm='rms_norm' if config.get('qk_layer_norms') else None)
  return out


def _own_params(own: tensors_lib.TensorStore, config: dict[str, Any],
                dtype: Any) -> mapping.Params:
  """perceiver_resampler/... and gated_xattn/... of `config`."""
  abstract = {m: dict(v) for m, v in flamingo.abstract_params(config).items()
              if m.startswith(('perceiver_resampler', 'gated_xattn'))}
  table = abstract['perceiver_resampler'].pop('time_embeddings')
  params = mapping.map_tensors(
      own, rules(), abstract, ignore=_IGNORED, dtype=dtype,
      what='IDEFICS resampler and gated cross-attention')
  params['perceiver_resampler']['time_embeddings'] = np.zeros(table.shape,
                                                              dtype)
  return params


def convert(path: str, *, dtype: Any = np.float32, max_len=None):
  """Reads and maps the folder (weights/convert.py's `convert`)."""
  from flamingo_jax.weights import convert as convert_lib  # pylint: disable=g-import-not-at-top
  config = hf_config(path)
  store = read(path)
  vision_names, lm_names, own_names = split(store)
  if not vision_names:
    raise mapping.CheckpointMismatchError(
        f'{store.source} has no {_VISION}* tensors: not an IDEFICS '
        'checkpoint.')
  tokenizer = tokenizer_for(path)

  vision_store = _view(store, vision_names)
  vision = hf_clip.config_from(path, vision_store, tokens='last_block',
                               keep_class_token=True)
  params = hf_clip.to_params(vision_store, vision, dtype=dtype)

  llama = hf_llama.SOURCE
  lm_store = lm_view(store, lm_names)
  lm = llama.lm_config(config, lm_store, 'model.', str(path))
  lm['vocab_size'] = tokenizer.vocab_size
  lm_rules, ignore = llama.rules('model.', lm, lm['vocab_size'])
  params.update(hf_lm.map_params(
      lm_store, lm, lm_rules, ignore + _IGNORED, dtype=dtype,
      what='IDEFICS LM (LLaMA)'))

  own = _view(store, own_names)
  model = model_config(config, vision, lm, own)
  params.update(_own_params(own, model, dtype))
  store.close()
  max_len = max_len or int(config.get('max_position_embeddings', 2048))
  return convert_lib.Converted(
      model=model, params=params, tokenizer=tokenizer,
      inputs=[os.path.abspath(path)], task='flamingo',
      extra={'eval': {'max_len': int(max_len)}})
