"""Regenerates tests/weights/testdata/ with the reference implementations.

Each family's reference builds its model at the tiny configuration of
fixtures.py, randomises every parameter (so that zero-initialised gains do
not hide a mapping error), rounds the weights to the dtype it stores, saves
them in the family's published file format, and records its fp32 outputs
on fixed images. CI then checks the importers against these files without
torch (tests/weights/test_parity.py).

Needs the `[parity]` extra (torch, transformers, timm, open_clip_torch,
dill; timm and open_clip need torchvision; the Hugging Face LMs,
`--only hf_llama,hf_gpt_neox,hf_mpt,hf_gpt2`, need torch and transformers
only; MosaicGPT, `--only hf_mosaic_gpt`, torch only: its reference is
mosaic_gpt_reference.py; OpenFlamingo, `--only open_flamingo,open_flamingo_neox`, also open_flamingo 2.0.1
installed without its pins: see make_open_flamingo.py; IDEFICS,
`--only idefics,idefics_float`, torch and transformers: make_idefics.py)
and, for DeepMind's
NFNet, a
checkout of github.com/google-deepmind/deepmind-research (its `nfnets/`
code is the reference; it is imported from there, never copied):

  pip install -e '.[parity]'
  python tests/weights/make_fixtures.py \
      --deepmind_research=/path/to/deepmind-research [--only hf_clip,...]
"""

import argparse
import importlib
import json
import os
import shutil
import sys
import types

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fixtures  # pylint: disable=g-import-not-at-top,wrong-import-position

FAMILIES = ('hf_clip', 'open_clip', 'nfnet_npz', 'timm_nfnet',
            *fixtures.HF_LMS, 'hf_mosaic_gpt', *fixtures.OPEN_FLAMINGOS,
            *fixtures.IDEFICSES)


OPENAI_TORCHSCRIPT = fixtures.OPENAI_TORCHSCRIPT


def _fresh(name: str) -> str:
  directory = fixtures.path(name)
  shutil.rmtree(directory, ignore_errors=True)
  os.makedirs(directory)
  return directory


def _randomise_torch(module, seed: int, dtype) -> None:
  """Noise on every parameter, gains away from 0, then rounded to `dtype`."""
  import torch  # pylint: disable=g-import-not-at-top
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, param in module.named_parameters():
      noise = torch.randn(param.shape, generator=generator)
      if param.dim() <= 1 or name.endswith('gain'):
        param.add_(0.1 * noise)
      else:
        param.add_(0.02 * noise)
      if name.endswith('skipinit_gain'):
        param.add_(0.6)
      param.copy_(param.to(dtype).to(torch.float32))


def _save_expected(directory: str, images: np.ndarray, **outputs) -> None:
  arrays = {k: np.asarray(v, np.float32) for k, v in outputs.items()}
  np.savez_compressed(os.path.join(directory, 'expected.npz'),
                      images_sum=images.sum(dtype=np.float64), **arrays)


def make_hf_clip() -> None:
  import safetensors.torch  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  directory = _fresh('hf_clip')
  torch.manual_seed(0)
  config = transformers.CLIPVisionConfig(**fixtures.HF_CLIP)
  model = transformers.CLIPVisionModelWithProjection(config).eval()
  _randomise_torch(model, 1, torch.bfloat16)
  model.save_pretrained(directory, safe_serialization=True)
  state = {k: v.to(torch.bfloat16).contiguous()
           for k, v in model.state_dict().items()}
  safetensors.torch.save_file(state,
                              os.path.join(directory, 'model.safetensors'),
                              metadata={'format': 'pt'})
  images = fixtures.images(config.image_size, seed=2)
  with torch.no_grad():
    out = model(pixel_values=torch.from_numpy(images).permute(0, 3, 1, 2),
                output_hidden_states=True)
    post_ln = model.vision_model.post_layernorm(out.last_hidden_state)
  _save_expected(directory, images,
                 last_hidden_state=out.last_hidden_state,
                 penultimate=out.hidden_states[-2],
                 post_ln=post_ln, image_embeds=out.image_embeds)


def make_openai_torchscript(directory: str, state) -> None:
  """`state` as OpenAI's CLIP release ships it: a TorchScript archive
  (`torch.jit.save` of a traced model) whose modules hold the tensors under
  the state dict's names (OpenAI's `visual.` names are OpenCLIP's)."""
  import torch  # pylint: disable=g-import-not-at-top

  class Tree(torch.nn.Module):

    def forward(self, x):
      return x

  root = Tree()
  for name, value in state.items():
    *path, leaf = name.split('.')
    module = root
    for part in path:
      if not hasattr(module, part):
        module.add_module(part, Tree())
      module = getattr(module, part)
    module.register_parameter(
        leaf, torch.nn.Parameter(value.clone(), requires_grad=False))
  traced = torch.jit.trace(root, torch.zeros(1))
  assert set(traced.state_dict()) == set(state)
  traced.save(os.path.join(directory, OPENAI_TORCHSCRIPT))


def make_open_clip() -> None:
  import open_clip  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  directory = _fresh('open_clip')
  torch.manual_seed(0)
  model = open_clip.model.CLIP(
      fixtures.OPEN_CLIP_EMBED_DIM,
      open_clip.model.CLIPVisionCfg(**fixtures.OPEN_CLIP_VISION),
      open_clip.model.CLIPTextCfg(**fixtures.OPEN_CLIP_TEXT),
      quick_gelu=False).eval()
  _randomise_torch(model, 3, torch.float16)
  state = {k: v.to(torch.float16) for k, v in model.state_dict().items()}
  torch.save(state, os.path.join(directory, 'open_clip_pytorch_model.bin'))
  torch.save(state, os.path.join(directory, 'legacy.pt'),
             _use_new_zipfile_serialization=False)
  make_openai_torchscript(directory, state)
  with open(os.path.join(directory, 'open_clip_config.json'), 'w') as f:
    json.dump({'model_cfg': {
        'embed_dim': fixtures.OPEN_CLIP_EMBED_DIM,
        'vision_cfg': fixtures.OPEN_CLIP_VISION,
        'text_cfg': fixtures.OPEN_CLIP_TEXT, 'quick_gelu': False}}, f,
              indent=1)
  visual = model.visual
  visual.output_tokens = True
  captured = {}
  visual.transformer.register_forward_hook(
      lambda module, args, output: captured.update(last_block=output))
  images = fixtures.images(fixtures.OPEN_CLIP_VISION['image_size'], seed=4)
  with torch.no_grad():
    pooled, tokens = visual(torch.from_numpy(images).permute(0, 3, 1, 2))
  last_block = captured['last_block']
  if last_block.shape[0] != images.shape[0]:  # Sequence-first layout.
    last_block = last_block.permute(1, 0, 2)
  _save_expected(directory, images, pooled=pooled, tokens=tokens,
                 last_block=last_block[:, 1:])


def _deepmind_nfnet(checkout: str) -> types.ModuleType:
  if not os.path.isfile(os.path.join(checkout, 'nfnets', 'nfnet.py')):
    raise SystemExit(f'--deepmind_research={checkout} has no nfnets/nfnet.py')
  sys.path.insert(0, checkout)
  base = importlib.import_module('nfnets.base')
  params = fixtures.NFNET_VARIANTS['parity_dm']
  if params['stem_widths'] != (16, 32, 64, params['widths'][0] // 2):
    raise SystemExit('parity_dm must have the stem DeepMind hard-codes.')
  base.nfnet_params['parity_dm'] = {
      'width': list(params['widths']), 'depth': list(params['depths']),
      'group_width': [params['group_width']] * 4,
      'train_imsize': params['train_imsize'],
      'test_imsize': params['test_imsize'], 'drop_rate': 0.0,
      'RA_level': '405'}
  return importlib.import_module('nfnets.nfnet')


def make_nfnet_npz(checkout: str) -> None:
  import dill  # pylint: disable=g-import-not-at-top
  import haiku as hk  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  dm_nfnet = _deepmind_nfnet(checkout)
  directory = _fresh('nfnet_npz')

  def forward(x):
    net = dm_nfnet.NFNet(num_classes=10, variant='parity_dm')
    pooled = net(x, is_training=False)['pool']
    # The tokens: the body of NFNet.__call__ up to the pooling, by its parts.
    out = net.stem(x)
    for block in net.blocks:
      out, _ = block(out, is_training=False)
    tokens = net.activation(net.final_conv(out))
    return pooled, tokens.reshape(tokens.shape[0], -1, tokens.shape[-1])

  model = hk.transform(forward)
  images = fixtures.images(fixtures.NFNET_IMAGE_SIZE, seed=5)
  params = model.init(jax.random.key(0), images)
  rng = np.random.default_rng(6)
  params = {m: {n: _perturb(n, np.asarray(v, np.float32), rng)
                for n, v in leaves.items()} for m, leaves in params.items()}
  # float32 as released, on the bfloat16 grid (half the bytes compress away).
  params = jax.tree.map(
      lambda v: v.astype(jnp.bfloat16).astype(np.float32), params)
  pooled, tokens = model.apply(params, None, images)
  # As the release: dill's dump of the two-level dict of float32 arrays.
  with open(os.path.join(directory, 'parity_dm_haiku.npz'), 'wb') as f:
    dill.dump(params, f)
  _save_expected(directory, images, pooled=pooled, tokens=tokens)


def _perturb(name: str, value: np.ndarray, rng) -> np.ndarray:
  if value.ndim <= 1:
    value = value + 0.1 * rng.standard_normal(value.shape)
  if name == 'skip_gain':
    value = value + 0.6
  return value.astype(np.float32)


def make_timm_nfnet() -> None:
  import safetensors.torch  # pylint: disable=g-import-not-at-top
  import timm.models.nfnet as timm_nfnet  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  directory = _fresh('timm_nfnet')
  params = fixtures.NFNET_VARIANTS['parity_timm']
  cfg = timm_nfnet.NfCfg(
      depths=params['depths'], channels=params['widths'],
      stem_type='deep_quad', stem_chs=params['stem_widths'][-1],
      group_size=params['group_width'], bottle_ratio=0.5, extra_conv=True,
      gamma_in_act=True, same_padding=True, skipinit=True,
      num_features=2 * params['widths'][-1], act_layer='gelu',
      attn_layer='se', attn_kwargs=dict(rd_ratio=0.5))
  torch.manual_seed(0)
  model = timm_nfnet.NormFreeNet(cfg, num_classes=10).eval()
  _randomise_torch(model, 7, torch.float16)
  state = {k: v.to(torch.float16).contiguous()
           for k, v in model.state_dict().items()}
  safetensors.torch.save_file(state,
                              os.path.join(directory, 'model.safetensors'))
  images = fixtures.images(fixtures.NFNET_IMAGE_SIZE, seed=8)
  with torch.no_grad():
    features = model.forward_features(
        torch.from_numpy(images).permute(0, 3, 1, 2))  # [B, C, h, w]
  tokens = features.flatten(2).transpose(1, 2)  # [B, h*w, C]
  _save_expected(directory, images, tokens=tokens, pooled=tokens.mean(1))


def make_hf_lm(name: str) -> None:
  """A tiny random Hugging Face causal LM of fixtures.HF_LMS[name]."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  directory = _fresh(name)
  config_class, model_class, kwargs = fixtures.HF_LMS[name]
  torch.manual_seed(0)
  model = getattr(transformers, model_class)(
      getattr(transformers, config_class)(**kwargs)).eval()
  _randomise_torch(model, 9, torch.bfloat16)
  model.to(torch.bfloat16).save_pretrained(
      directory, max_shard_size='20KB' if name == 'hf_llama' else '50MB')
  for extra in ('generation_config.json',):
    if os.path.exists(os.path.join(directory, extra)):
      os.remove(os.path.join(directory, extra))
  model.to(torch.float32)
  tokens = fixtures.lm_tokens(seed=10)
  prompt = torch.from_numpy(tokens[:1, :fixtures.LM_PROMPT])
  with torch.no_grad():
    logits = model(torch.from_numpy(tokens)).logits
    greedy = model.generate(
        prompt, max_new_tokens=fixtures.LM_STEPS,
        min_new_tokens=fixtures.LM_STEPS, do_sample=False, eos_token_id=None,
        pad_token_id=0)[0, fixtures.LM_PROMPT:]
  np.savez_compressed(os.path.join(directory, 'expected.npz'), tokens=tokens,
                      logits=logits.numpy().astype(np.float32),
                      greedy=greedy.numpy())


def make_hf_mosaic_gpt() -> None:
  """A tiny random MosaicGPT (MPT-1B's layout) as MPT-1B is published."""
  import torch  # pylint: disable=g-import-not-at-top
  import mosaic_gpt_reference  # pylint: disable=g-import-not-at-top
  directory = _fresh('hf_mosaic_gpt')
  config = mosaic_gpt_reference.config(**fixtures.MOSAIC_GPT)
  torch.manual_seed(0)
  model = mosaic_gpt_reference.MosaicGPT(config).init_weights().eval()
  _randomise_torch(model, 9, torch.bfloat16)
  torch.save({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()},
             os.path.join(directory, 'pytorch_model.bin'))
  with open(os.path.join(directory, 'config.json'), 'w') as f:
    json.dump(config, f, indent=1)
  tokens = fixtures.lm_tokens(seed=10)
  prompt = torch.from_numpy(tokens[:1, :fixtures.LM_PROMPT])
  with torch.no_grad():
    logits = model(torch.from_numpy(tokens)).logits
    greedy = model.greedy(prompt, fixtures.LM_STEPS)
    # The cache changes nothing: the same tokens by whole forward passes.
    ids = prompt
    for _ in range(fixtures.LM_STEPS):
      ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)
    assert ids[0, fixtures.LM_PROMPT:].tolist() == greedy.tolist()
  np.savez_compressed(os.path.join(directory, 'expected.npz'), tokens=tokens,
                      logits=logits.numpy().astype(np.float32),
                      greedy=greedy.numpy())


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--deepmind_research', default=None,
                      help='a checkout of google-deepmind/deepmind-research')
  parser.add_argument('--only', default=','.join(FAMILIES),
                      help=f'comma-separated subset of {FAMILIES}')
  args = parser.parse_args()
  for family in args.only.split(','):
    if family == 'nfnet_npz':
      if not args.deepmind_research:
        raise SystemExit('nfnet_npz needs --deepmind_research=PATH.')
      make_nfnet_npz(args.deepmind_research)
    elif family in fixtures.HF_LMS:
      make_hf_lm(family)
    elif family in fixtures.OPEN_FLAMINGOS:
      import make_open_flamingo  # pylint: disable=g-import-not-at-top
      make_open_flamingo.make(_fresh(family), family)
    elif family in fixtures.IDEFICSES:
      import make_idefics  # pylint: disable=g-import-not-at-top
      make_idefics.make(_fresh(family), family)
    else:
      globals()[f'make_{family}']()
    print(f'wrote {fixtures.path(family)}')


if __name__ == '__main__':
  main()
