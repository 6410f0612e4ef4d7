"""Makes tests/weights/testdata/idefics*/ with transformers' IDEFICS.

The reference is transformers' own `IdeficsForVisionText2Text` (and its
processor's `image_attention_mask` functions), at the tiny configurations
of fixtures.py (`IDEFICS_CONFIG`, `IDEFICSES`), with a word-level
tokenizer.json that already holds IDEFICS's `<fake_token_around_image>` and
`<image>` as its `additional_vocab_size` rows, as the published tokenizer
does.

Every parameter is randomised, the gates' alphas (scalars or vectors) drawn
in [0.3, 1] so the cross-attention matters, rounded to the bfloat16 grid,
and saved as published: `config.json`, bfloat16 safetensors in shards with
`model.safetensors.index.json`, `tokenizer.json` (+ tokenizer_config.json).
`expected.npz`, from the saved folder read back in fp32, holds the two
images, the prompt's ids (fixtures.
IDEFICS_PROMPT after `<s>`), IDEFICS's fp32 logits on them and its greedy
`generate` continuation.

  python tests/weights/make_fixtures.py --only idefics,idefics_float
"""

import json
import os

import numpy as np

import fixtures  # pylint: disable=g-import-not-at-top

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _tokenizer(directory: str):
  """The fixture's tokenizer.json (+ tokenizer_config.json), reloaded."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  vocab = {w: i for i, w in enumerate(fixtures.IDEFICS_WORDS)}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab,
                                                         unk_token='<unk>'))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.add_special_tokens(['<unk>', '<s>', '</s>'])
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token='<s>', eos_token='</s>',
      unk_token='<unk>', pad_token='<unk>')
  fast.add_special_tokens(
      {'additional_special_tokens': list(fixtures.IDEFICS_ADDED)})
  fast.save_pretrained(directory)
  for extra in ('special_tokens_map.json', 'chat_template.jinja'):
    if os.path.exists(os.path.join(directory, extra)):
      os.remove(os.path.join(directory, extra))
  return transformers.AutoTokenizer.from_pretrained(directory)


def _randomise(model, seed: int) -> None:
  """Noise on every parameter, alphas in [0.3, 1], on the bfloat16 grid."""
  import torch  # pylint: disable=g-import-not-at-top
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, param in model.named_parameters():
      noise = torch.randn(param.shape, generator=generator)
      if '.alpha_' in name:
        param.copy_(0.3 + 0.7 * torch.rand(param.shape, generator=generator))
      elif param.dim() <= 1 or 'latents' in name:
        param.add_(0.1 * noise)
      else:
        param.add_(0.2 * noise)
      param.copy_(param.to(torch.bfloat16).to(torch.float32))


def make(directory: str, name: str = 'idefics') -> None:
  """Writes fixture `name` (fixtures.IDEFICSES) into `directory` (emptied
  by the caller)."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from transformers.models.idefics import processing_idefics  # pylint: disable=g-import-not-at-top
  overrides, seed = fixtures.IDEFICSES[name]
  overrides = dict(overrides)
  kwargs = json.loads(json.dumps(fixtures.IDEFICS_CONFIG))
  kwargs['perceiver_config']['qk_layer_norms_perceiver'] = overrides.pop(
      'perceiver_qk_norms')
  kwargs.update(overrides)
  torch.manual_seed(seed)
  config = transformers.IdeficsConfig(**kwargs)
  model = transformers.IdeficsForVisionText2Text(config).eval()
  _randomise(model, seed)
  model.to(torch.bfloat16).save_pretrained(directory, max_shard_size='100KB')
  # The reference is the saved folder read back in fp32: casting the model
  # back would keep bfloat16-rounded buffers (the rotary frequencies).
  model = transformers.IdeficsForVisionText2Text.from_pretrained(
      directory, dtype=torch.float32).eval()
  for extra in ('generation_config.json',):
    if os.path.exists(os.path.join(directory, extra)):
      os.remove(os.path.join(directory, extra))
  tokenizer = _tokenizer(directory)

  ids = [tokenizer.bos_token_id] + tokenizer(
      fixtures.IDEFICS_PROMPT)['input_ids']
  input_ids = torch.tensor([ids])
  images = fixtures.idefics_images()
  pixels = (images.astype(np.float32) / 255.0
            - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(
                CLIP_STD, np.float32)  # [N, H, W, 3]
  pixel_values = torch.from_numpy(pixels).permute(0, 3, 1, 2)[None]
  # As IdeficsProcessor: the last <image> at or before each token.
  processing = processing_idefics
  incremental, _ = processing.image_attention_mask_for_packed_input_ids(
      input_ids.clone(), tokenizer, 'pt')
  image_attention_mask = processing.incremental_to_binary_attention_mask(
      incremental, 'pt', num_classes=len(images))  # [1, L, N]
  with torch.no_grad():
    logits = model(input_ids=input_ids, pixel_values=pixel_values,
                   image_attention_mask=image_attention_mask).logits[0]
    generated = model.generate(
        input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
        pixel_values=pixel_values, image_attention_mask=image_attention_mask,
        max_new_tokens=fixtures.IDEFICS_NEW_TOKENS, num_beams=1,
        do_sample=False, pad_token_id=tokenizer.pad_token_id)[0, len(ids):]
  greedy = generated.numpy()
  # flamingo_jax's generation bans <image> and the pad token and stops at
  # </s>: a continuation with them would not compare like for like.
  image_id = tokenizer.convert_tokens_to_ids('<image>')
  unlike = {image_id, tokenizer.pad_token_id, tokenizer.eos_token_id}
  if unlike & set(greedy.tolist()) or len(greedy) < fixtures.IDEFICS_NEW_TOKENS:
    raise SystemExit(f'{name}: the greedy continuation {greedy} has tokens '
                     f'of {unlike}; pick another seed.')
  np.savez_compressed(
      os.path.join(directory, 'expected.npz'), images=images,
      prompt_ids=np.asarray(ids, np.int32),
      image_attention_mask=image_attention_mask[0].numpy().astype(np.int32),
      logits=logits.numpy().astype(np.float32), greedy=greedy,
      greedy_text=np.str_(tokenizer.decode(greedy)))
  with open(os.path.join(directory, 'reference.json'), 'w') as f:
    json.dump({'transformers': transformers.__version__,
               'torch': torch.__version__, 'seed': seed,
               'model': 'IdeficsForVisionText2Text',
               'prompt': fixtures.IDEFICS_PROMPT,
               'greedy_text': tokenizer.decode(greedy)}, f, indent=1)
  print('greedy', greedy, repr(tokenizer.decode(greedy)))
