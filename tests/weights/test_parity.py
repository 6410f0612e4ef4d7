"""Parity: each importer against its reference implementation's outputs.

CI mode (no torch): the references' weights and fp32 outputs are committed
fixtures (testdata/, made by make_fixtures.py); the importers read the files
as published, and our encoders and LMs must reproduce the outputs to max
relative difference <= 1e-4 (the LMs' greedy tokens exactly). With torch
and transformers installed, a fresh random Hugging Face CLIP is also
compared live here, and fresh random LMs in test_hf_lm.py.
"""

import functools
import json
import os

import haiku as hk
import jax
import numpy as np
import pytest

from flamingo_jax.models import flamingo
from flamingo_jax.models import lm
from flamingo_jax.weights import hf_clip
from flamingo_jax.weights import hf_gpt2
from flamingo_jax.weights import hf_gpt_neox
from flamingo_jax.weights import hf_llama
from flamingo_jax.weights import hf_mosaic_gpt
from flamingo_jax.weights import hf_mpt
from flamingo_jax.weights import nfnet_npz
from flamingo_jax.weights import open_clip
from flamingo_jax.weights import safetensors_file
from flamingo_jax.weights import timm_nfnet
from tests.weights import fixtures

TOLERANCE = 1e-4


def relative_difference(ours, theirs) -> float:
  """max |ours - theirs| / max |theirs|; printed (pytest -s shows it)."""
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
  difference = float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)))
  print(f'parity {os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]}: '
        f'max relative difference {difference:.2e}')
  return difference


@functools.lru_cache(maxsize=None)
def _encoder(config_items: tuple) -> callable:
  config = dict(config_items)
  model = hk.transform(
      lambda x: flamingo.vision_encoder(config)(x, is_training=False))
  return jax.jit(model.apply)


def encode(config, params, images):
  return _encoder(tuple(sorted(config.items())))(params, None, images)


@pytest.mark.parametrize('tokens,keep_class,key', [
    ('last_block', True, 'last_hidden_state'),
    ('penultimate_block', True, 'penultimate'),
    ('ln_post', True, 'post_ln'),
    ('ln_post', False, 'post_ln'),
])
def test_hf_clip(tokens, keep_class, key):
  path = fixtures.path('hf_clip')
  store = hf_clip.read(path)
  config = hf_clip.config_from(path, store, tokens=tokens,
                               keep_class_token=keep_class)
  assert config['activation'] == 'quick_gelu'
  params = hf_clip.to_params(store, config)
  images, expected = fixtures.expected('hf_clip', 16, seed=2)
  out = encode(config, params, images)
  want = expected[key] if keep_class else expected[key][:, 1:]
  assert relative_difference(out['tokens'], want) <= TOLERANCE
  assert relative_difference(out['pooled'],
                             expected['image_embeds']) <= TOLERANCE


def test_hf_clip_sharded(tmp_path):
  """The same tower split over two shards and an index."""
  store = hf_clip.read(fixtures.path('hf_clip'))
  names = list(store)
  halves = {'model-00001-of-00002.safetensors': names[::2],
            'model-00002-of-00002.safetensors': names[1::2]}
  weight_map = {}
  for shard, shard_names in halves.items():
    safetensors_file.write(str(tmp_path / shard),
                           {n: np.asarray(store[n]) for n in shard_names})
    weight_map.update({n: shard for n in shard_names})
  (tmp_path / 'model.safetensors.index.json').write_text(
      '{"metadata": {}, "weight_map": %s}' % str(weight_map).replace(
          "'", '"'))
  os.symlink(fixtures.path('hf_clip', 'config.json'),
             tmp_path / 'config.json')
  sharded = hf_clip.read(str(tmp_path))
  assert sharded.groups() == [str(tmp_path / s) for s in sorted(halves)]
  config = hf_clip.config_from(str(tmp_path), sharded, tokens='last_block')
  params = hf_clip.to_params(sharded, config)
  images, expected = fixtures.expected('hf_clip', 16, seed=2)
  out = encode(config, params, images)
  assert relative_difference(
      out['tokens'], expected['last_hidden_state'][:, 1:]) <= TOLERANCE


@pytest.mark.parametrize('file', ['open_clip_pytorch_model.bin', 'legacy.pt',
                                  fixtures.OPENAI_TORCHSCRIPT])
@pytest.mark.parametrize('tokens,key', [('ln_post', 'tokens'),
                                        ('last_block', 'last_block')])
def test_open_clip(file, tokens, key):
  path = fixtures.path('open_clip', file)
  store = open_clip.read(path)
  config = open_clip.config_from(path, store, tokens=tokens)
  assert config['activation'] == 'gelu'  # From open_clip_config.json.
  params = open_clip.to_params(store, config)
  images, expected = fixtures.expected('open_clip', 16, seed=4)
  out = encode(config, params, images)
  assert relative_difference(out['tokens'], expected[key]) <= TOLERANCE
  assert relative_difference(out['pooled'], expected['pooled']) <= TOLERANCE


def test_open_clip_needs_an_activation(tmp_path):
  os.symlink(fixtures.path('open_clip', 'open_clip_pytorch_model.bin'),
             tmp_path / 'weights.bin')
  with pytest.raises(ValueError, match="activation='quick_gelu'"):
    open_clip.config_from(str(tmp_path / 'weights.bin'))
  with pytest.raises(ValueError, match='head_width 64'):
    open_clip.config_from(str(tmp_path / 'weights.bin'), activation='gelu')
  config = open_clip.config_from(str(tmp_path / 'weights.bin'),
                                 activation='gelu', head_width=8)
  assert (config['activation'], config['num_heads']) == ('gelu', 2)


def test_deepmind_nfnet():
  path = fixtures.path('nfnet_npz', 'parity_dm_haiku.npz')
  store = nfnet_npz.read(path)
  config = nfnet_npz.config_from(path, store)
  assert config['variant'] == 'parity_dm'
  params = nfnet_npz.to_params(store, config)
  images, expected = fixtures.expected('nfnet_npz', 64, seed=5)
  out = encode(config, params, images)
  assert relative_difference(out['tokens'], expected['tokens']) <= TOLERANCE
  assert relative_difference(out['pooled'], expected['pooled']) <= TOLERANCE


def test_timm_nfnet():
  path = fixtures.path('timm_nfnet', 'model.safetensors')
  store = timm_nfnet.read(path)
  config = timm_nfnet.config_from(path, store)
  assert config['variant'] == 'parity_timm'
  params = timm_nfnet.to_params(store, config)
  images, expected = fixtures.expected('timm_nfnet', 64, seed=8)
  out = encode(config, params, images)
  assert relative_difference(out['tokens'], expected['tokens']) <= TOLERANCE
  # DeepMind's numerics on the same weights are measurably different.
  deepmind = dict(config, **timm_nfnet.NUMERICS['deepmind'])
  other = np.asarray(encode(deepmind, params, images)['tokens'])
  assert np.max(np.abs(other - expected['tokens'])) > 1e-3 * np.max(
      np.abs(expected['tokens']))


def test_nfnet_structure_is_read_from_the_shapes():
  store = timm_nfnet.read(fixtures.path('timm_nfnet', 'model.safetensors'))
  assert timm_nfnet.structure(store) == {
      k: fixtures.NFNET_VARIANTS['parity_timm'][k]
      for k in ('depths', 'widths', 'stem_widths', 'group_width')}


def test_live_hf_clip_against_transformers():
  """A fresh random CLIP tower from transformers, compared directly."""
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  torch.manual_seed(1)
  config = transformers.CLIPVisionConfig(**{**fixtures.HF_CLIP,
                                            'hidden_act': 'gelu'})
  model = transformers.CLIPVisionModel(config).eval()
  with torch.no_grad():
    for param in model.parameters():
      param.add_(0.05 * torch.randn_like(param))
  arrays = {k: v.numpy() for k, v in model.state_dict().items()}
  store = hf_clip.tensors_lib.from_arrays(arrays)
  vision = {'encoder': 'vit', 'variant': 'custom', 'image_size': 16,
            'activation': 'gelu', 'tokens': 'last_block',
            'keep_class_token': True, 'projection': False,
            'patch_size': 4, 'width': config.hidden_size,
            'depth': config.num_hidden_layers,
            'num_heads': config.num_attention_heads,
            'mlp_dim': config.intermediate_size,
            'embed_dim': config.hidden_size}
  params = hf_clip.to_params(store, vision)
  images = fixtures.images(16, seed=11)
  with torch.no_grad():
    theirs = model(pixel_values=torch.from_numpy(images).permute(0, 3, 1, 2))
  out = encode(vision, params, images)
  assert relative_difference(out['tokens'],
                             theirs.last_hidden_state) <= TOLERANCE
  assert relative_difference(out['pooled'], theirs.pooler_output) <= TOLERANCE


def _state_store(module):
  import torch  # pylint: disable=g-import-not-at-top
  with torch.no_grad():
    for name, param in module.named_parameters():
      param.add_(0.1 * torch.randn_like(param))
      if name.endswith('skipinit_gain'):
        param.add_(0.6)
  return hf_clip.tensors_lib.from_arrays(
      {k: v.numpy() for k, v in module.state_dict().items()})


def test_live_timm_nfnet():
  torch = pytest.importorskip('torch')
  timm_models = pytest.importorskip('timm.models.nfnet')
  params = fixtures.NFNET_VARIANTS['parity_timm']
  torch.manual_seed(2)
  model = timm_models.NormFreeNet(timm_models.NfCfg(
      depths=params['depths'], channels=params['widths'],
      stem_type='deep_quad', stem_chs=params['stem_widths'][-1],
      group_size=params['group_width'], bottle_ratio=0.5, extra_conv=True,
      gamma_in_act=True, same_padding=True, skipinit=True,
      num_features=2 * params['widths'][-1], act_layer='gelu',
      attn_layer='se', attn_kwargs=dict(rd_ratio=0.5)), num_classes=3).eval()
  store = _state_store(model)
  config = timm_nfnet.config_from('live', store)
  ours = timm_nfnet.to_params(store, config)
  images = fixtures.images(64, seed=12)
  with torch.no_grad():
    theirs = model.forward_features(
        torch.from_numpy(images).permute(0, 3, 1, 2)).flatten(2)
  out = encode(config, ours, images)
  assert relative_difference(out['tokens'],
                             theirs.transpose(1, 2)) <= TOLERANCE


def test_live_open_clip():
  torch = pytest.importorskip('torch')
  open_clip_lib = pytest.importorskip('open_clip')
  torch.manual_seed(3)
  model = open_clip_lib.model.CLIP(
      fixtures.OPEN_CLIP_EMBED_DIM,
      open_clip_lib.model.CLIPVisionCfg(**fixtures.OPEN_CLIP_VISION),
      open_clip_lib.model.CLIPTextCfg(**fixtures.OPEN_CLIP_TEXT),
      quick_gelu=True).eval()
  store = _state_store(model)
  config = open_clip.config_from(
      'live', store, activation='quick_gelu',
      head_width=fixtures.OPEN_CLIP_VISION['head_width'])
  ours = open_clip.to_params(store, config)
  images = fixtures.images(16, seed=13)
  model.visual.output_tokens = True
  with torch.no_grad():
    pooled, tokens = model.visual(torch.from_numpy(images).permute(0, 3, 1, 2))
  out = encode(config, ours, images)
  assert relative_difference(out['tokens'], tokens) <= TOLERANCE
  assert relative_difference(out['pooled'], pooled) <= TOLERANCE


# -- Hugging Face causal LMs (fixtures.HF_LMS) ---------------------------------

HF_LM_SOURCES = {'hf_llama': hf_llama, 'hf_gpt_neox': hf_gpt_neox,
                 'hf_mpt': hf_mpt, 'hf_gpt2': hf_gpt2,
                 # MPT-1B's MosaicGPT, against mosaic_gpt_reference.py.
                 'hf_mosaic_gpt': hf_mosaic_gpt}


def lm_logits(config, params, tokens):
  model = hk.without_apply_rng(hk.transform(
      lambda t: lm.DecoderLM(**config)(t)))
  return jax.jit(model.apply)(params, tokens)


def _import_lm(name):
  source = HF_LM_SOURCES[name]
  store = source.read(fixtures.path(name))
  config = source.config_from(fixtures.path(name), store)
  return config, source.to_params(store, config), store


@pytest.mark.parametrize('name', sorted(HF_LM_SOURCES))
def test_hf_lm(name):
  config, params, store = _import_lm(name)
  expected = fixtures.load_expected(name)
  logits = lm_logits(config, params, expected['tokens'])
  vocab = fixtures.LM_VOCAB
  assert logits.shape[-1] == vocab + 1  # + our <EOC>, unused here.
  assert relative_difference(logits[..., :vocab],
                             expected['logits']) <= TOLERANCE
  if name == 'hf_llama':
    assert len(store.groups()) == 3  # Shards, through the index.


@pytest.mark.parametrize('name', sorted(HF_LM_SOURCES))
def test_hf_lm_greedy_generation_in_flamingo(name):
  """Each imported LM (LLaMA's grouped-query attention, GPT-NeoX's rotary,
  MPT's ALiBi, GPT-2's learned positions, MosaicGPT's q/k norms) inside
  Flamingo (gates
  closed: exactly the LM), decoded greedily through the cached path
  (`Flamingo.prefill`, one `decode_step` per token), gives transformers'
  greedy tokens."""
  config, lm_params, _ = _import_lm(name)
  expected = fixtures.load_expected(name)
  model_config = flamingo.model_config('tiny')
  model_config['lm'] = config
  resampler = model_config['resampler']
  visual = np.ones([1, 1, resampler['num_latents'], resampler['width']],
                   np.float32)
  prompt = expected['tokens'][:1, :fixtures.LM_PROMPT].astype(np.int32)
  steps = fixtures.LM_STEPS
  ones = np.ones([1, 1], bool)

  def prefill(tokens, visual):
    valid = np.ones(tokens.shape, bool)
    return flamingo.Flamingo(model_config).prefill(
        tokens, valid, valid.astype(np.int32), visual, ones,
        tokens.shape[1] + steps)  # [1, P, V], state

  def step(token, state):  # [1, 1] -> [1, 1, V], state
    return flamingo.Flamingo(model_config).decode_step(
        token, ones, ones.astype(np.int32), state)

  def decode(tokens, visual):  # Creates the xattn parameters.
    return flamingo.Flamingo(model_config).decode(
        tokens, visual, ones, np.ones(tokens.shape, np.int32))

  # Closed gates: the xattn layers' other parameters never count (zeros).
  shapes = jax.eval_shape(hk.transform(decode).init, jax.random.key(0),
                          prompt, visual)
  params = {**jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes),
            **lm_params}
  logits, state = jax.jit(hk.transform(prefill).apply)(params, None, prompt,
                                                       visual)
  step = jax.jit(hk.transform(step).apply)
  tokens = []
  for _ in range(steps):
    token = np.argmax(logits[:, -1, :fixtures.LM_VOCAB], axis=-1)[:, None]
    tokens.append(int(token[0, 0]))
    logits, state = step(params, None, token.astype(np.int32), state)
  assert tokens == expected['greedy'].tolist()


# -- MosaicGPT (MPT-1B) and MPT's qk_ln -----------------------------------------

# MosaicGPT's names -> MPT's (llm-foundry's remote code and transformers).
_MPT_NAMES = (('.ln_1.', '.norm_1.'), ('.ln_2.', '.norm_2.'),
              ('ln_f.', 'norm_f.'), ('mlp.mlp_up', 'ffn.up_proj'),
              ('mlp.mlp_down', 'ffn.down_proj'))


def _mosaic_gpt_copy(directory, config_update=None, rename=False,
                     drop=()) -> str:
  """The MosaicGPT fixture as safetensors in `directory`, its config.json
  updated; with `rename`, in MPT's names and config (`attn_config.qk_ln`)."""
  store = hf_mosaic_gpt.read(fixtures.path('hf_mosaic_gpt'))
  arrays = {}
  for name in store:
    new = name
    for old, mpt in _MPT_NAMES if rename else ():
      new = new.replace(old, mpt)
    if not any(d in new for d in drop):
      arrays[new] = np.asarray(store[name])
  safetensors_file.write(os.path.join(directory, 'model.safetensors'),
                         arrays)
  with open(fixtures.path('hf_mosaic_gpt', 'config.json')) as f:
    config = json.load(f)
  if rename:
    config = dict(model_type='mpt', d_model=config['d_model'],
                  n_heads=config['n_heads'], n_layers=config['n_layers'],
                  max_seq_len=config['max_seq_len'],
                  vocab_size=config['vocab_size'], no_bias=True,
                  attn_config=dict(alibi=True, qk_ln=True))
  config.update(config_update or {})
  with open(os.path.join(directory, 'config.json'), 'w') as f:
    json.dump(config, f)
  return directory


def test_hf_mpt_with_qk_ln_is_mosaic_gpt_renamed(tmp_path):
  """MPT's `attn_config.qk_ln` (MosaicML's remote-code MPT; transformers'
  MptForCausalLM has no q/k norms) maps `attn.q_ln`/`k_ln` as MosaicGPT
  does: the MosaicGPT fixture in MPT's names gives its logits."""
  directory = _mosaic_gpt_copy(str(tmp_path), rename=True)
  store = hf_mpt.read(directory)
  config = hf_mpt.config_from(directory, store)
  assert config['qk_norm'] and not config['use_bias']
  logits = lm_logits(config, hf_mpt.to_params(store, config),
                     fixtures.load_expected('hf_mosaic_gpt')['tokens'])
  assert relative_difference(
      logits[..., :fixtures.LM_VOCAB],
      fixtures.load_expected('hf_mosaic_gpt')['logits']) <= TOLERANCE


def test_mosaic_gpt_config_and_refusals(tmp_path):
  config = hf_mosaic_gpt.config_from(fixtures.path('hf_mosaic_gpt'))
  assert (config['qk_norm'], config['positions'], config['norm_bias'],
          config['use_bias'], config['tied_embeddings'],
          config['activation'], config['ffw_hidden']) == (
              True, 'alibi', False, False, True, 'gelu_exact', 128)
  for update, match in (({'n_heads': 6, 'd_model': 48}, "'n_heads': 6"),
                        ({'prefix_lm': True}, 'prefix_lm'),
                        ({'alibi': False}, "'alibi': False"),
                        ({'model_type': 'mpt'}, 'not a MosaicGPT')):
    directory = tmp_path / str(len(list(tmp_path.iterdir())))
    directory.mkdir()
    _mosaic_gpt_copy(str(directory), update)
    with pytest.raises(ValueError, match=match):
      hf_mosaic_gpt.config_from(str(directory))
  # qk_ln without the norms' tensors: named, not silently skipped.
  directory = tmp_path / 'no_qk'
  directory.mkdir()
  _mosaic_gpt_copy(str(directory), rename=True, drop=('k_ln',))
  store = hf_mpt.read(str(directory))
  with pytest.raises(ValueError, match='k_norm'):
    hf_mpt.to_params(store, hf_mpt.config_from(str(directory), store))
