"""OpenFlamingo (Awadalla et al., 2023): its `checkpoint.pt` with the CLIP
vision tower and the Hugging Face LM it was trained on, as one Flamingo.

  python -m flamingo_jax.weights.convert open_flamingo checkpoint.pt \
      --vision ~/clip-vit-large-patch14 --lm ~/mpt-7b --workdir W

writes a workdir that `flamingo_jax.load(W)` takes: `config.json`
(`task: 'flamingo'`, the 'openflamingo' variant (`models/variants.py`)
with the sizes read from the files, `eval.max_len`, `data.tokenizer`), the
parameters as one orbax checkpoint, and the LM's tokenizer with
OpenFlamingo's markers (`<|endofchunk|>` is `<EOC>`, then `<image>`, then
`<PAD>` when the tokenizer has no pad token).

What each input holds (open_flamingo 2.0.1, `src/flamingo.py`,
`src/helpers.py`, `src/flamingo_lm.py`, `train/train_utils.py`):
  checkpoint.pt  `Flamingo.state_dict()` filtered to the trainable part
      (`filter_state_dict_to_trainable`): the resampler (`perceiver.*`),
      the gated cross-attention layers as the LM's decoder layers hold them
      (`lang_encoder.<layers>.<i>.gated_cross_attn_layer.*`), and every LM
      tensor named '*embed*' or still trainable (the input embeddings, with
      the markers' rows: `lang_encoder.transformer.wte.weight`,
      `lang_encoder.gpt_neox.embed_in.weight`, ...), plus, for a tied LM,
      the output layer's second name (`lang_encoder.lm_head.weight`). A
      `{'model_state_dict': ...}` training checkpoint and DDP's `module.`
      prefix are read too.
  --vision  the CLIP tower: a Hugging Face CLIP directory (`hf_clip`, e.g.
      openai/clip-vit-large-patch14) or an OpenCLIP state dict
      (`open_clip`); OpenFlamingo feeds the resampler the last block's patch
      tokens (`--tokens=last_block`, open_clip < 2.23).
  --lm  the LM's Hugging Face directory (config.json, weights, tokenizer):
      MPT (`hf_mpt`), MosaicGPT / MPT-1B (`hf_mosaic_gpt`: OpenFlamingo-3B's
      mpt-1b-redpajama-200b), GPT-NeoX / RedPajama-INCITE (`hf_gpt_neox`),
      LLaMA (`hf_llama`), GPT-2 (`hf_gpt2`), from its config.json's
      model_type.

The LM is assembled as OpenFlamingo's `load_state_dict(strict=False)` does:
the LM directory's tensors, `resize_token_embeddings(len(tokenizer))`,
then every LM tensor of checkpoint.pt in place of the directory's
(`lang_encoder.<layers>.<i>.decoder_layer.X` is `<layers>.<i>.X`). Output
rows that neither file has (an untied LM whose checkpoint lacks the output
layer: the markers' rows) are the mean row, as transformers >= 4.46
initialises them (older transformers drew them at random).

Name map (i: resampler layer; j: LM layer with a cross-attention block, row
(j + 1) / every - 1 of the stacked `gated_xattn/block`):
  perceiver.latents                        perceiver_resampler/latents
  perceiver.frame_embs [F, D]              perceiver_resampler/
                                           time_embeddings (zeros if absent)
  perceiver.media_time_embs [M, 1, D]      perceiver_resampler/
                                           media_time_embeddings [M, D]
                                           (max_media = M; none if absent)
  perceiver.layers.i.0.norm_media          layer_i/features_norm
  perceiver.layers.i.0.norm_latents        layer_i/latents_norm
  perceiver.layers.i.0.to_q / to_kv / to_out  layer_i/attention/query /
                                           key + value / output
  perceiver.layers.i.1.0 / .1 / .3         layer_i/ffw_norm / ffw/hidden /
                                           ffw/output
  perceiver.norm                           perceiver_resampler/output_norm
  ...gated_cross_attn_layer.attn.norm      query_norm
  ...attn.to_q / to_kv / to_out            cross_attention/query /
                                           key + value / output
  ...attn_gate, ff_gate [1]                attn_gate, ffw_gate []
  ...ff.0 / ff.1 / ff.3                    ffw_norm / ffw/hidden / ffw/output

Heads are not in the shapes: OpenFlamingo's `PerceiverResampler` and
`GatedCrossAttentionBlock` have 8 heads of 64 (`--resampler_heads`,
`--xattn_heads` for another build). `cross_attn_every_n_layers` is read from
which LM layers hold a block. `perceiver.media_time_embs` (`max_num_media`;
no released model has them) are read; the slots of a sample beyond their M
rows are then refused (open_flamingo fails on them). OpenFlamingo's text before the first `<image>` sees
no image ('last_image', `only_attend_immediate_media=True`, its default).
"""

import json
import os
import re
from typing import Any, Optional

import numpy as np

from flamingo_jax.models import flamingo
from flamingo_jax.models import variants
from flamingo_jax.weights import hf_clip
from flamingo_jax.weights import hf_gpt2
from flamingo_jax.weights import hf_gpt_neox
from flamingo_jax.weights import hf_llama
from flamingo_jax.weights import hf_lm
from flamingo_jax.weights import hf_mosaic_gpt
from flamingo_jax.weights import hf_mpt
from flamingo_jax.weights import mapping
from flamingo_jax.weights import open_clip
from flamingo_jax.weights import tensors as tensors_lib

KIND = 'open_flamingo'
SUMMARY = ("OpenFlamingo's checkpoint.pt + its CLIP tower (--vision) + its "
           'Hugging Face LM (--lm): a whole Flamingo that load() takes')

VISION_SOURCES = {m.KIND: m for m in (hf_clip, open_clip)}
LM_SOURCES = {m.KIND: m for m in (hf_mpt, hf_mosaic_gpt, hf_gpt_neox,
                                   hf_llama, hf_gpt2)}
_LM_FAMILIES = {'mpt': 'hf_mpt', 'mosaic_gpt': 'hf_mosaic_gpt',
                'gpt_neox': 'hf_gpt_neox', 'llama': 'hf_llama',
                'gpt2': 'hf_gpt2'}

# open_flamingo 2.0.1's fixed sizes (helpers.py defaults).
HEADS = 8
FFW_MULTIPLIER = 4

_XATTN = re.compile(r'lang_encoder\.(?P<layers>.+)\.(?P<j>\d+)\.'
                    r'gated_cross_attn_layer\.(?P<rest>.+)')
_DECODER = re.compile(r'lang_encoder\.(?P<layers>.+)\.(?P<j>\d+)\.'
                      r'decoder_layer\.(?P<rest>.+)')
# Other names of the same tensors, or what the model does not take from
# checkpoint.pt (the vision tower comes from --vision).
_DUPLICATES = re.compile(r'lang_encoder\.(old_decoder_blocks|'
                         r'gated_cross_attn_layers)\..*|vision_encoder\..*')


def add_arguments(parser) -> tuple[str, ...]:
  """The convert CLI's options for this source; returns their names."""
  parser.add_argument('--vision',
                      help='the CLIP tower: a Hugging Face CLIP directory '
                           '(openai/clip-vit-large-patch14) or an OpenCLIP '
                           'state dict (open_clip_pytorch_model.bin)')
  parser.add_argument('--vision_source', default='auto',
                      choices=('auto', *VISION_SOURCES),
                      help="auto: hf_clip for a directory with config.json, "
                           'else open_clip')
  parser.add_argument('--lm',
                      help="the LM's Hugging Face directory (config.json, "
                           'safetensors or .bin, tokenizer.json)')
  parser.add_argument('--vision_activation', default=None,
                      choices=('quick_gelu', 'gelu'),
                      help="an OpenCLIP tower's activation when no "
                           "open_clip_config.json says it (OpenAI's ViT-L/14: "
                           'quick_gelu)')
  parser.add_argument('--tokens', default='last_block',
                      help="the ViT tokens fed to the resampler "
                           "('last_block': OpenFlamingo's; models/vit.py)")
  parser.add_argument('--resampler_heads', type=int, default=HEADS,
                      help="the resampler's heads (OpenFlamingo: 8)")
  parser.add_argument('--xattn_heads', type=int, default=HEADS,
                      help="the cross-attention's heads (OpenFlamingo: 8)")
  parser.add_argument('--attend', default='last_image',
                      choices=('last_image', 'all_previous_images'),
                      help='only_attend_immediate_media True (last_image, '
                           "OpenFlamingo's) or False")
  parser.add_argument('--max_len', type=int, default=2048,
                      help='eval.max_len: the longest prompt plus new '
                           'tokens that load() accepts')
  return ('vision', 'vision_source', 'vision_activation', 'lm', 'tokens',
          'resampler_heads', 'xattn_heads', 'attend', 'max_len')


def read(path: str, torch_backend: str = 'auto') -> tensors_lib.TensorStore:
  """checkpoint.pt, read without running its pickle (torch_file)."""
  return tensors_lib.open_path(path, torch_backend=torch_backend)


def _strip(store: tensors_lib.TensorStore) -> dict[str, str]:
  """{model name: name in the file}: `model_state_dict.` and `module.`
  prefixes dropped, a training checkpoint's other entries left out."""
  names = {}
  wrapped = any(n.startswith('model_state_dict.') for n in store)
  for name in store:
    short = name
    if wrapped:
      if not name.startswith('model_state_dict.'):
        continue  # optimizer_state_dict, lr_scheduler_state_dict.
      short = name[len('model_state_dict.'):]
    if short.startswith('module.'):
      short = short[len('module.'):]
    names[short] = name
  return names


def _renamed(store: tensors_lib.TensorStore, names: dict[str, str],
             source: str) -> tensors_lib.TensorStore:
  """A view of `store` under new names ({new: old})."""
  infos = {new: store.info(old) for new, old in names.items()}
  return tensors_lib.TensorStore(infos, lambda n: store[names[n]],
                                 source=source)


def _overlay(base: tensors_lib.TensorStore, top: tensors_lib.TensorStore,
             source: str) -> tensors_lib.TensorStore:
  """`base` with the tensors of `top` in place of (or beside) its own."""
  infos = {n: base.info(n) for n in base if n not in top}
  infos.update({n: top.info(n) for n in top})
  releasers = {g: (lambda g=g: base.release(g)) for g in base.groups()}
  return tensors_lib.TensorStore(
      infos, lambda n: top[n] if n in top else base[n], releasers=releasers,
      source=source)


def split(store: tensors_lib.TensorStore
          ) -> tuple[dict[str, str], dict[str, str], dict[int, dict[str, str]]]:
  """checkpoint.pt's names by part: (resampler {name: file name}, LM
  {LM directory name: file name}, cross-attention {LM layer j: {rest: file
  name}})."""
  resampler, lm, xattn = {}, {}, {}
  for name, original in _strip(store).items():
    if name.startswith('perceiver.'):
      resampler[name] = original
    elif (match := _XATTN.fullmatch(name)):
      xattn.setdefault(int(match['j']), {})[match['rest']] = original
    elif _DUPLICATES.fullmatch(name):
      continue
    elif (match := _DECODER.fullmatch(name)):
      lm[f"{match['layers']}.{match['j']}.{match['rest']}"] = original
    elif name.startswith('lang_encoder.'):
      lm[name[len('lang_encoder.'):]] = original
    else:
      resampler[name] = original  # Unknown: reported as an extra tensor.
  return resampler, lm, xattn


def every_n(layers: list[int], num_layers: int, source: str) -> int:
  """cross_attn_every_n_layers from the LM layers holding a block."""
  if not layers:
    raise mapping.CheckpointMismatchError(
        f'{source} has no lang_encoder.*.gated_cross_attn_layer.* tensors: '
        'not an OpenFlamingo checkpoint.')
  every = layers[0] + 1
  expected = list(range(every - 1, num_layers, every))
  if layers != expected:
    raise mapping.CheckpointMismatchError(
        f'{source}: gated_cross_attn_layer tensors at LM layers {layers}, '
        f'but cross_attn_every_n_layers={every} over the {num_layers} '
        f'layers of the LM places them at {expected}.')
  return every


def _linear(source: str, target: str) -> list[mapping.Rule]:
  return [mapping.Rule(rf'{source}\.weight', f'{target}/w',
                       mapping.transpose)]


def _norm(source: str, target: str) -> list[mapping.Rule]:
  return [mapping.Rule(rf'{source}\.weight', f'{target}/scale'),
          mapping.Rule(rf'{source}\.bias', f'{target}/offset')]


def _kv(source: str, target: str) -> list[mapping.Rule]:
  return [mapping.Rule(rf'{source}\.weight',
                       (f'{target}/key/w', f'{target}/value/w'),
                       mapping.split_rows(2, mapping.transpose))]


def rules() -> list[mapping.Rule]:
  """Resampler names as in checkpoint.pt; cross-attention ones as
  `xattn.<row>.<rest>` (`to_params` renames them)."""
  root, layer = 'perceiver_resampler', r'perceiver\.layers\.(?P<i>\d+)\.'
  table = [mapping.Rule(r'perceiver\.latents', f'{root}/latents'),
           mapping.Rule(r'perceiver\.frame_embs', f'{root}/time_embeddings'),
           mapping.Rule(r'perceiver\.media_time_embs',
                        f'{root}/media_time_embeddings',
                        lambda x: x.reshape(x.shape[0], x.shape[-1]))]
  table += _norm(r'perceiver\.norm', f'{root}/output_norm')
  attention = f'{root}/layer_{{i}}/attention'
  table += _norm(rf'{layer}0\.norm_media', f'{root}/layer_{{i}}/features_norm')
  table += _norm(rf'{layer}0\.norm_latents', f'{root}/layer_{{i}}/latents_norm')
  table += _linear(rf'{layer}0\.to_q', f'{attention}/query')
  table += _kv(rf'{layer}0\.to_kv', attention)
  table += _linear(rf'{layer}0\.to_out', f'{attention}/output')
  table += _norm(rf'{layer}1\.0', f'{root}/layer_{{i}}/ffw_norm')
  table += _linear(rf'{layer}1\.1', f'{root}/layer_{{i}}/ffw/hidden')
  table += _linear(rf'{layer}1\.3', f'{root}/layer_{{i}}/ffw/output')
  block, row = 'gated_xattn/block', r'xattn\.(?P<layer>\d+)\.'
  scalar = lambda x: x.reshape(())
  table += [mapping.Rule(rf'{row}attn_gate', f'{block}/attn_gate', scalar),
            mapping.Rule(rf'{row}ff_gate', f'{block}/ffw_gate', scalar)]
  table += _norm(rf'{row}attn\.norm', f'{block}/query_norm')
  table += _linear(rf'{row}attn\.to_q', f'{block}/cross_attention/query')
  table += _kv(rf'{row}attn\.to_kv', f'{block}/cross_attention')
  table += _linear(rf'{row}attn\.to_out', f'{block}/cross_attention/output')
  table += _norm(rf'{row}ff\.0', f'{block}/ffw_norm')
  table += _linear(rf'{row}ff\.1', f'{block}/ffw/hidden')
  table += _linear(rf'{row}ff\.3', f'{block}/ffw/output')
  return table


def _vision_source(path: str, choice: str):
  if choice != 'auto':
    return VISION_SOURCES[choice]
  directory = path if os.path.isdir(path) else os.path.dirname(path)
  if os.path.isfile(os.path.join(directory, 'config.json')):
    return hf_clip
  return open_clip


def _lm_source(path: str):
  config = os.path.join(hf_lm.directory_of(path), 'config.json')
  if not os.path.isfile(config):
    raise FileNotFoundError(f'No config.json in the LM directory {path}.')
  with open(config) as f:
    model_type = json.load(f).get('model_type')
  if model_type not in _LM_FAMILIES:
    raise ValueError(
        f'{config}: model_type {model_type!r} is none of the LM families '
        f'read here ({sorted(_LM_FAMILIES)}).')
  return LM_SOURCES[_LM_FAMILIES[model_type]]


def model_config(vision: dict[str, Any], lm: dict[str, Any], *,
                 resampler_width: int, resampler_layers: int,
                 resampler_inner: int, num_latents: int, max_frames: int,
                 xattn_inner: int, every: int, resampler_heads: int,
                 xattn_heads: int, attend: str,
                 max_media: Optional[int] = None) -> dict[str, Any]:
  """The 'openflamingo' variant (models/variants.py) at these sizes."""
  for what, inner, heads in (('resampler', resampler_inner, resampler_heads),
                             ('cross-attention', xattn_inner, xattn_heads)):
    if inner % heads:
      raise ValueError(f'The {what} projects to {inner} features, not a '
                       f'multiple of {heads} heads.')
  config = flamingo.model_config('tiny')  # Every field; sizes set below.
  config = variants.with_variant(config, 'openflamingo')
  config['vision'] = vision
  config['image_size'] = vision['image_size']
  config['lm'] = dict(lm, remat_policy='none')
  config['resampler'].update(
      num_layers=resampler_layers, width=resampler_width,
      num_heads=resampler_heads, head_size=resampler_inner // resampler_heads,
      num_latents=num_latents, max_frames=max_frames,
      ffw_multiplier=FFW_MULTIPLIER)
  if max_media is not None:
    config['resampler']['max_media'] = max_media
  config['xattn'].update(
      every=every, attend=attend, num_heads=xattn_heads,
      head_size=xattn_inner // xattn_heads, ffw_multiplier=FFW_MULTIPLIER)
  return config


def _vision_params(vision: str, choice: str, activation: Optional[str],
                   tokens: str, dtype: Any):
  """(config.model.vision, vision_encoder/... parameters) of --vision."""
  module = _vision_source(vision, choice)
  store = module.read(vision)
  options = {'activation': activation} if module is open_clip else {}
  config = module.config_from(vision, store, tokens=tokens, **options)
  params = module.to_params(store, config, dtype=dtype)
  store.close()
  return config, params


def _check_lm_tensors(checkpoint: tensors_lib.TensorStore,
                      names: dict[str, str], directory: tensors_lib.TensorStore,
                      anchor: str, vocab: int, tokenizer_source: str) -> None:
  """checkpoint.pt's LM tensors replace the directory's of the same shape;
  a vocabulary table (the anchor, or one with the directory's anchor rows)
  has the tokenizer's rows, as OpenFlamingo's `resize_token_embeddings`
  made it."""
  rows = directory.info(anchor).shape[0] if anchor in directory else None
  problems = []
  for name, original in names.items():
    shape = tuple(checkpoint.info(original).shape)
    want = tuple(directory.info(name).shape) if name in directory else None
    table = name == anchor or (want is not None and len(want) == 2
                               and want[0] == rows)
    if table:
      want = (vocab, *(want or shape)[1:])
    if want is not None and shape != want:
      why = (f' ({tokenizer_source} with OpenFlamingo\'s markers has {vocab} '
             'tokens)' if table else '')
      problems.append(f'tensor {original} has shape {shape} but the LM needs '
                      f'{want}{why}.')
  if problems:
    raise mapping.CheckpointMismatchError(
        f'{checkpoint.source} does not fit the LM (nothing was written):\n  '
        + '\n  '.join(problems))


def _lm_params(lm: str, checkpoint: tensors_lib.TensorStore,
               names: dict[str, str], dtype: Any):
  """(config.model.lm, lm/... parameters, tokenizer): the directory, then
  checkpoint.pt's LM tensors in place of its own."""
  family = _lm_source(lm)
  tokenizer = hf_lm.tokenizer_for(lm, True)
  if tokenizer is None:
    raise FileNotFoundError(
        f'No tokenizer.json in {lm}: the markers\' ids and the embedding '
        'rows follow the tokenizer (give the LM directory as published).')
  directory = family.read(lm)
  store = _overlay(directory, _renamed(checkpoint, names, checkpoint.source),
                   source=f'{lm} + {checkpoint.source}')
  spec = family.SOURCE
  anchor = hf_lm.prefix_of(store, spec.ANCHOR, spec.FAMILY) + spec.ANCHOR
  _check_lm_tensors(checkpoint, names, directory, anchor,
                    tokenizer.vocab_size, lm)
  config = family.config_from(lm, store, vocab_size=tokenizer.vocab_size)
  params = family.to_params(store, config, dtype=dtype)
  store.close()
  return config, params, tokenizer


def _own_params(checkpoint: tensors_lib.TensorStore,
                resampler_names: dict[str, str],
                xattn_names: dict[int, dict[str, str]],
                config: dict[str, Any], every: int, dtype: Any):
  """perceiver_resampler/... and gated_xattn/... of `config`."""
  own = dict(resampler_names)
  for j, rests in xattn_names.items():
    own.update({f'xattn.{(j + 1) // every - 1}.{rest}': name
                for rest, name in rests.items()})
  abstract = {m: dict(v) for m, v in flamingo.abstract_params(config).items()
              if m.startswith(('perceiver_resampler', 'gated_xattn'))}
  zeros = {}
  if 'perceiver.frame_embs' not in resampler_names:  # Ours is zeros.
    table = abstract['perceiver_resampler'].pop('time_embeddings')
    zeros = {'time_embeddings': np.zeros(table.shape, dtype)}
  params = mapping.map_tensors(
      _renamed(checkpoint, own, checkpoint.source), rules(), abstract,
      dtype=dtype,
      what='OpenFlamingo checkpoint (resampler, gated cross-attention)')
  params['perceiver_resampler'].update(zeros)
  return params


def convert(path: str, *, dtype: Any = np.float32,
            vision: Optional[str] = None, lm: Optional[str] = None,
            vision_source: str = 'auto',
            vision_activation: Optional[str] = None,
            tokens: str = 'last_block',
            resampler_heads: int = HEADS, xattn_heads: int = HEADS,
            attend: str = 'last_image', max_len: int = 2048,
            torch_backend: str = 'auto'):
  """Reads and maps the three inputs (weights/convert.py's `convert`)."""
  from flamingo_jax.weights import convert as convert_lib  # pylint: disable=g-import-not-at-top
  if not vision or not lm:
    raise ValueError('open_flamingo needs --vision (the CLIP tower) and --lm '
                     "(the LM's Hugging Face directory) beside checkpoint.pt.")
  checkpoint = read(path, torch_backend)
  source = checkpoint.source
  resampler_names, lm_names, xattn_names = split(checkpoint)
  shape = lambda n: (checkpoint.info(resampler_names[n]).shape
                     if n in resampler_names else None)
  latents = shape('perceiver.latents')
  to_q = shape('perceiver.layers.0.0.to_q.weight')
  if latents is None or to_q is None:
    raise mapping.CheckpointMismatchError(
        f'{source} has no perceiver.latents / perceiver.layers.0.0.to_q.'
        'weight: not an OpenFlamingo checkpoint.')

  vision_config, params = _vision_params(vision, vision_source,
                                         vision_activation, tokens, dtype)
  lm_config, lm_params, tokenizer = _lm_params(lm, checkpoint, lm_names,
                                               dtype)
  params.update(lm_params)
  every = every_n(sorted(xattn_names), lm_config['num_layers'], source)
  first = xattn_names[min(xattn_names)]
  if 'attn.to_q.weight' not in first:
    raise mapping.CheckpointMismatchError(
        f'{source}: no gated_cross_attn_layer.attn.to_q.weight at LM layer '
        f'{min(xattn_names)}.')
  frames = shape('perceiver.frame_embs')
  media_rows = shape('perceiver.media_time_embs')
  config = model_config(
      vision_config, lm_config, resampler_width=latents[1],
      resampler_layers=len({n.split('.')[2] for n in resampler_names
                            if n.startswith('perceiver.layers.')}),
      resampler_inner=to_q[0], num_latents=latents[0],
      max_frames=frames[0] if frames else 1,
      xattn_inner=checkpoint.info(first['attn.to_q.weight']).shape[0],
      every=every, resampler_heads=resampler_heads, xattn_heads=xattn_heads,
      attend=attend, max_media=media_rows[0] if media_rows else None)
  params.update(_own_params(checkpoint, resampler_names, xattn_names, config,
                            every, dtype))
  checkpoint.close()
  return convert_lib.Converted(
      model=config, params=params, tokenizer=tokenizer,
      inputs=[os.path.abspath(p) for p in (path, vision, lm)],
      task='flamingo', extra={'eval': {'max_len': int(max_len)}})
