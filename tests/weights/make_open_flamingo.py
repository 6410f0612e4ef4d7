"""Makes tests/weights/testdata/open_flamingo/ with open_flamingo itself.

The reference is open_flamingo 2.0.1's own `Flamingo`, `FlamingoLMMixin`
and `extend_instance` (its `src/`), imported from the installed package,
at the tiny configuration of fixtures.py (`OF_*`):

  vision  a Hugging Face `CLIPVisionModel` behind a `.visual` whose output
          is `(pooled, last_hidden_state[:, 1:])`: what open_clip's
          `VisionTransformer(output_tokens=True)` returns as tokens before
          open_clip 2.23 (the last block's patch tokens, no ln_post), which
          `Flamingo._encode_vision_x` reads as `[1]`. open_clip itself needs
          torchvision, so it is not the tower here (open_clip's own layout
          is checked by the open_clip fixture).
  LM      transformers' `MptForCausalLM` (open_flamingo/) or
          `GPTNeoXForCausalLM` (open_flamingo_neox/, checkpoint.pt in
          bfloat16), or MPT-1B's MosaicGPT (open_flamingo_mosaic_gpt/:
          OpenFlamingo-3B's LM, restated by mosaic_gpt_reference.py, stored
          as a bfloat16 pytorch_model.bin, cross-attention before every
          block as in OpenFlamingo-3B) with a word-level tokenizer.json,
          extended as open_flamingo's `create_model_and_transforms` does:
          markers added to the tokenizer, `FlamingoLMMixin`, decoder layers
          `transformer.blocks`, `resize_token_embeddings(len(tokenizer))`.

MosaicGPT has no `generate` here (its remote code has transformers'):
open_flamingo's `Flamingo.generate` is followed step by step instead, as
transformers' greedy search drives it with MosaicGPT's
`prepare_inputs_for_generation`: media cached (`_use_cached_vision_x`,
`_encode_vision_x`), the prompt, then each new token alone with the
`past_key_values` and an all-ones `attention_mask`, stopping after
`<|endofchunk|>` (its `eos_token_id`) or OF_NEW_TOKENS tokens.

Two adaptations, both outside open_flamingo's code:
  - `open_flamingo/__init__.py` imports its factory, which imports open_clip
    (and torchvision): when open_clip is not installed, an empty module
    stands in for it (the factory is not called).
  - transformers 5.x's `generate` calls the LM without `attention_mask`,
    which `FlamingoLMMixin.forward` requires positionally (written for
    transformers 4.28): a subclass gives it the default None, nothing else.

Every parameter is randomised (gates away from 0, so the cross-attention
matters), rounded to the bfloat16 grid, and saved as published:
  open_flamingo/clip/   config.json + model.safetensors (the CLIP tower);
  open_flamingo/mpt/ (gpt_neox/)  config.json + model.safetensors +
                        tokenizer.json
                        (the LM before OpenFlamingo touched it: 48 rows);
  open_flamingo/checkpoint.pt   `model.state_dict()` filtered as
                        open_flamingo's `filter_state_dict_to_trainable`
                        does (the perceiver, the gated cross-attention
                        layers, the resized input embeddings);
  open_flamingo/expected.npz    images, the few-shot captioning prompt's
                        ids, open_flamingo's fp32 logits on them, and its
                        greedy `generate` continuation.

  pip install --no-deps --target /tmp/ofpkgs open-flamingo==2.0.1 einops \
      einops-exts
  PYTHONPATH=/tmp/ofpkgs python tests/weights/make_fixtures.py \
      --only open_flamingo,open_flamingo_neox

(transformers 5 names GPT-NeoX's output layer `lm_head`, which
OpenFlamingo's filter drops as frozen, so open_flamingo_neox's checkpoint.pt
has no output rows: they come from the LM folder, cut to the tokenizer as
`resize_token_embeddings` cuts them. OpenFlamingo-4B, saved with
transformers 4, has them as `lang_encoder.embed_out.weight`.)
"""

import importlib.util
import json
import os
import sys
import types
from typing import Optional

import numpy as np

import fixtures  # pylint: disable=g-import-not-at-top

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
ADDED = ('<|endofchunk|>', '<image>')  # OpenFlamingo's, in its order.
PAD = '<PAD>'


def _import_open_flamingo():
  if ('open_clip' not in sys.modules
      and importlib.util.find_spec('open_clip') is None):
    sys.modules['open_clip'] = types.ModuleType('open_clip')
  # pylint: disable=g-import-not-at-top
  from open_flamingo.src import flamingo
  from open_flamingo.src import flamingo_lm
  from open_flamingo.src import utils
  return flamingo.Flamingo, flamingo_lm.FlamingoLMMixin, utils.extend_instance


def _word_tokenizer(directory: str):
  """The LM's tokenizer.json (+ tokenizer_config.json): no markers yet."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  vocab = {w: i for i, w in enumerate(fixtures.OF_WORDS)}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(
      vocab, unk_token='<|endoftext|>'))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.add_special_tokens(['<|endoftext|>'])
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token='<|endoftext|>',
      eos_token='<|endoftext|>', unk_token='<|endoftext|>')
  fast.save_pretrained(directory)
  for extra in ('special_tokens_map.json', 'chat_template.jinja'):
    if os.path.exists(os.path.join(directory, extra)):
      os.remove(os.path.join(directory, extra))
  return transformers.AutoTokenizer.from_pretrained(directory)


def _round(module, seed: int, gates: bool = False) -> None:
  """Noise on every parameter, on the bfloat16 grid; gates in [0.3, 1]."""
  import torch  # pylint: disable=g-import-not-at-top
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, param in module.named_parameters():
      noise = torch.randn(param.shape, generator=generator)
      if name.endswith('_gate') and gates:
        param.copy_(0.3 + 0.7 * torch.rand(param.shape, generator=generator))
      elif param.dim() <= 1:
        param.add_(0.1 * noise)
      else:
        param.add_(0.05 * noise)
      param.copy_(param.to(torch.bfloat16).to(torch.float32))


def _trainable_state(model):
  """`model.state_dict()` as open_flamingo's training saves it: the
  parameters its factory leaves trainable (perceiver, gated cross-attention
  layers, input embeddings), frozen ones dropped unless named '*embed*',
  and the duplicate names of `old_decoder_blocks` / `gated_cross_attn_layers`
  and the vision encoder dropped (train_utils.filter_state_dict_to_trainable,
  which imports wandb, so its rule is restated here)."""
  model.requires_grad_(False)
  model.perceiver.requires_grad_(True)
  model.lang_encoder.gated_cross_attn_layers.requires_grad_(True)
  model.lang_encoder.get_input_embeddings().requires_grad_(True)
  state = model.state_dict()
  for name, param in model.named_parameters():
    if 'embed' in name or param.requires_grad:
      continue
    state.pop(name, None)
  return {k: v for k, v in state.items()
          if 'lang_encoder.old_decoder_blocks' not in k
          and 'lang_encoder.gated_cross_attn_layers' not in k
          and 'vision_encoder' not in k}


def _generate_with_cache(model, vision_x, lang_x, eoc_id):
  """open_flamingo's `Flamingo.generate` (greedy, one beam) over an LM
  without transformers' `generate`: see the module docstring."""
  import torch  # pylint: disable=g-import-not-at-top
  lm = model.lang_encoder
  lm._use_cached_vision_x = True  # pylint: disable=protected-access
  model._encode_vision_x(vision_x=vision_x)  # pylint: disable=protected-access
  mask = torch.ones_like(lang_x)
  out = lm(input_ids=lang_x, attention_mask=mask, use_cache=True)
  tokens = []
  while len(tokens) < fixtures.OF_NEW_TOKENS:
    token = out.logits[:, -1].argmax(-1, keepdim=True)  # [1, 1]
    tokens.append(int(token))
    if tokens[-1] == eoc_id:
      break
    mask = torch.cat([mask, torch.ones_like(token)], dim=1)
    out = lm(input_ids=token, attention_mask=mask,
             past_key_values=out.past_key_values, use_cache=True)
  lm.clear_conditioned_layers()
  lm._use_cached_vision_x = False  # pylint: disable=protected-access
  return torch.tensor(tokens)


# The seed of the Flamingo-level parameters per fixture (default 31): one
# whose greedy continuation is not a single repeated token where one exists.
SEEDS = {'open_flamingo_mosaic_gpt': 40}


def make(directory: str, name: str = 'open_flamingo',
         seed: Optional[int] = None) -> None:
  """Writes fixture `name` (fixtures.OPEN_FLAMINGOS) into `directory`
  (emptied by the caller)."""
  seed = seed if seed is not None else SEEDS.get(name, 31)
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  flamingo_class, mixin, extend_instance = _import_open_flamingo()

  class Mixin(mixin):  # transformers 5.x: see the module docstring.

    def forward(self, input_ids, attention_mask=None, **kwargs):
      return mixin.forward(self, input_ids, attention_mask, **kwargs)

  (config_class, model_class, lm_kwargs, lm_folder, decoder_layers, every,
   checkpoint_dtype) = fixtures.OPEN_FLAMINGOS[name]
  clip_dir = os.path.join(directory, 'clip')
  lm_dir = os.path.join(directory, lm_folder)
  torch.manual_seed(0)
  clip = transformers.CLIPVisionModel(
      transformers.CLIPVisionConfig(**fixtures.OF_CLIP)).eval()
  _round(clip, 1)
  clip.save_pretrained(clip_dir)

  if model_class == 'MosaicGPT':
    import mosaic_gpt_reference  # pylint: disable=g-import-not-at-top
    lm_config = mosaic_gpt_reference.config(**lm_kwargs)
    lm = mosaic_gpt_reference.MosaicGPT(lm_config).init_weights().eval()
    _round(lm, 2)
    os.makedirs(lm_dir)
    torch.save({k: v.to(torch.bfloat16) for k, v in lm.state_dict().items()},
               os.path.join(lm_dir, 'pytorch_model.bin'))
    with open(os.path.join(lm_dir, 'config.json'), 'w') as f:
      json.dump(lm_config, f, indent=1)
  else:
    lm = getattr(transformers, model_class)(
        getattr(transformers, config_class)(**lm_kwargs)).eval()
    _round(lm, 2)
    lm.to(torch.bfloat16).save_pretrained(lm_dir)
    lm.to(torch.float32)
  for extra in ('generation_config.json',):
    if os.path.exists(os.path.join(lm_dir, extra)):
      os.remove(os.path.join(lm_dir, extra))

  # As open_flamingo's create_model_and_transforms.
  tokenizer = _word_tokenizer(lm_dir)
  tokenizer.add_special_tokens({'additional_special_tokens': list(ADDED)})
  if tokenizer.pad_token is None:
    tokenizer.add_special_tokens({'pad_token': PAD})
  extend_instance(lm, Mixin)
  lm.set_decoder_layers_attr_name(decoder_layers)
  lm.resize_token_embeddings(len(tokenizer))

  class Visual(torch.nn.Module):
    """open_clip's visual (output_tokens=True, < 2.23) over HF CLIP."""

    def __init__(self, tower):
      super().__init__()
      self.tower = tower

    def forward(self, pixels):
      out = self.tower(pixel_values=pixels)
      return out.pooler_output, out.last_hidden_state[:, 1:]

  eoc_id = tokenizer.encode('<|endofchunk|>')[-1]
  image_id = tokenizer.encode('<image>')[-1]
  model = flamingo_class(
      types.SimpleNamespace(visual=Visual(clip)), lm, eoc_id, image_id,
      vis_dim=fixtures.OF_CLIP['hidden_size'],
      cross_attn_every_n_layers=every).eval()
  _round(model.perceiver, seed)
  _round(model.lang_encoder.gated_cross_attn_layers, seed + 1, gates=True)
  _round(model.lang_encoder.get_input_embeddings(), seed + 2)

  state = _trainable_state(model)
  torch.save({k: v.to(getattr(torch, checkpoint_dtype))
              for k, v in state.items()},
             os.path.join(directory, 'checkpoint.pt'))

  # The few-shot captioning prompt, as OpenFlamingo spells it, after the
  # <BOS> (= <|endoftext|>) that flamingo_jax's prompts begin with.
  shots = ''.join(f'<image>Output: {c}<|endofchunk|>'
                  for c in fixtures.OF_CAPTIONS)
  prompt = shots + '<image>Output:'
  ids = [tokenizer.bos_token_id] + tokenizer(prompt)['input_ids']
  images = fixtures.open_flamingo_images()
  pixels = (images.astype(np.float32) / 255.0 - np.asarray(CLIP_MEAN,
                                                           np.float32))
  pixels = pixels / np.asarray(CLIP_STD, np.float32)  # [N, H, W, 3]
  vision_x = torch.from_numpy(pixels).permute(0, 3, 1, 2)[None, :, None]
  lang_x = torch.tensor([ids])
  with torch.no_grad():
    logits = model(vision_x, lang_x).logits[0]  # [L, V]
    if hasattr(model.lang_encoder, 'generate'):
      generated = model.generate(
          vision_x, lang_x, attention_mask=torch.ones_like(lang_x),
          max_new_tokens=fixtures.OF_NEW_TOKENS, num_beams=1,
          do_sample=False, pad_token_id=tokenizer.pad_token_id)[0, len(ids):]
    else:
      generated = _generate_with_cache(model, vision_x, lang_x, eoc_id)
  greedy = generated.numpy()
  # flamingo_jax's generation bans <image> and <PAD> and also stops at
  # <|endoftext|>: a continuation with them would not compare like for like.
  unlike = {image_id, tokenizer.pad_token_id, tokenizer.eos_token_id}
  if unlike & set(greedy.tolist()):
    raise SystemExit(f'seed {seed}: the greedy continuation {greedy} has '
                     f'tokens of {unlike}; pick another seed.')
  np.savez_compressed(
      os.path.join(directory, 'expected.npz'), images=images,
      prompt_ids=np.asarray(ids, np.int32),
      logits=logits.numpy().astype(np.float32), greedy=greedy,
      greedy_text=np.str_(tokenizer.decode(greedy)))
  with open(os.path.join(directory, 'reference.json'), 'w') as f:
    json.dump({'open_flamingo': '2.0.1', 'transformers':
               transformers.__version__, 'torch': torch.__version__,
               'seed': seed, 'eoc_id': eoc_id, 'image_id': image_id,
               'cross_attn_every_n_layers': every, 'lm': model_class,
               'generate': ('Flamingo.generate' if hasattr(
                   model.lang_encoder, 'generate') else
                            'Flamingo.generate step by step (module '
                            'docstring)'),
               'prompt': prompt, 'greedy_text': tokenizer.decode(greedy)},
              f, indent=1)
  print('greedy', greedy, repr(tokenizer.decode(greedy)))
