"""The small reference configurations shared by make_fixtures.py and tests.

Each fixture directory under testdata/ holds a tiny random model of one
published family, saved in that family's own file format by the reference
implementation (make_fixtures.py), and `expected.npz`: the input images
(`images_sum`, a checksum of the seeded input images `images()`) and the
reference's
fp32 outputs on them. The weights are rounded to the stored dtype before
the reference runs, so the outputs are exactly those of the stored file.
"""

import os

import numpy as np

TESTDATA = os.path.join(os.path.dirname(__file__), 'testdata')
BATCH = 2

# Hugging Face CLIPVisionModelWithProjection (transformers), stored as
# BF16 safetensors with its config.json.
HF_CLIP = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=3,
               num_attention_heads=2, image_size=16, patch_size=4,
               projection_dim=8, hidden_act='quick_gelu')

# open_clip CLIP (exact GELU, as LAION's towers), stored as an fp16 state
# dict: zip (open_clip_pytorch_model.bin) and legacy (legacy.pt) formats.
OPEN_CLIP_VISION = dict(layers=3, width=16, head_width=8, patch_size=4,
                        image_size=16, mlp_ratio=2.0)
OPEN_CLIP_TEXT = dict(context_length=4, vocab_size=16, width=8, heads=2,
                      layers=1)
OPEN_CLIP_EMBED_DIM = 8
# The open_clip fixture's state dict again, as OpenAI's original CLIP `.pt`
# files are: a TorchScript archive (make_fixtures.make_openai_torchscript).
OPENAI_TORCHSCRIPT = 'openai_torchscript.pt'

# NFNet structures (models/nfnet.py:NFNET_PARAMS entries) for the two NFNet
# references: DeepMind's code fixes the stem at (16, 32, 64, widths[0] / 2),
# timm's deep_quad stem is (c/8, c/4, c/2, c).
NFNET_VARIANTS = {
    'parity_dm': dict(widths=(16, 32, 32, 32), depths=(1, 1, 2, 1),
                      stem_widths=(16, 32, 64, 8), group_width=8,
                      train_imsize=64, test_imsize=64, drop_rate=0.0),
    'parity_timm': dict(widths=(16, 32, 32, 32), depths=(1, 1, 2, 1),
                        stem_widths=(2, 4, 8, 16), group_width=8,
                        train_imsize=64, test_imsize=64, drop_rate=0.0),
}
NFNET_IMAGE_SIZE = 64


# Hugging Face causal LMs (transformers): (config class, model class,
# config), stored as BF16 safetensors by save_pretrained (LLaMA in shards,
# with model.safetensors.index.json). `expected.npz` holds the tokens, the
# reference's fp32 logits on them and its greedy continuation of
# `tokens[0, :LM_PROMPT]`.
LM_VOCAB = 96
LM_PROMPT, LM_STEPS = 6, 8
HF_LMS = {
    'hf_llama': ('LlamaConfig', 'LlamaForCausalLM', dict(
        vocab_size=LM_VOCAB, hidden_size=32, intermediate_size=40,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        rope_theta=500.0, rms_norm_eps=1e-6, bos_token_id=1,
        eos_token_id=2)),
    'hf_gpt_neox': ('GPTNeoXConfig', 'GPTNeoXForCausalLM', dict(
        vocab_size=LM_VOCAB, hidden_size=32, intermediate_size=48,
        num_hidden_layers=2, num_attention_heads=4, rotary_pct=0.5,
        bos_token_id=0, eos_token_id=0)),
    # 6 heads: ALiBi's slopes of a head count that is not a power of two.
    'hf_mpt': ('MptConfig', 'MptForCausalLM', dict(
        vocab_size=LM_VOCAB, d_model=24, n_layers=2, n_heads=6,
        max_seq_len=64)),
    'hf_gpt2': ('GPT2Config', 'GPT2LMHeadModel', dict(
        vocab_size=LM_VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=40,
        bos_token_id=0, eos_token_id=0)),
}


# MosaicGPT (MPT-1B's remote code `mosaic_gpt.py`, restated in torch by
# mosaic_gpt_reference.py: q/k LayerNorms, no biases, ALiBi over 4 heads,
# its head count a power of two), stored as MPT-1B is: a bfloat16
# pytorch_model.bin with config.json (MPT-1B's fields at these sizes).
# `expected.npz` as for HF_LMS, the greedy tokens through its cache.
MOSAIC_GPT = dict(vocab_size=LM_VOCAB, d_model=32, n_heads=4, n_layers=2,
                  max_seq_len=64)


def lm_tokens(seed: int) -> np.ndarray:
  """[BATCH, 11] int64 token ids made from `seed`."""
  return np.random.default_rng(seed).integers(0, LM_VOCAB, (BATCH, 11))


def load_expected(name: str) -> dict[str, np.ndarray]:
  """The arrays of fixture `name`'s expected.npz (for an LM: tokens, logits
  [BATCH, 11, LM_VOCAB], greedy [LM_STEPS])."""
  with np.load(path(name, 'expected.npz'), allow_pickle=False) as data:
    return dict(data)


def images(size: int, seed: int) -> np.ndarray:
  """[BATCH, size, size, 3] float32 normalised images, made from `seed`
  (not stored: `expected.npz` keeps their sum to catch a changed stream)."""
  rng = np.random.default_rng(seed)
  pixels = rng.integers(0, 256, (BATCH, size, size, 3), dtype=np.uint8)
  return ((pixels.astype(np.float32) / 255.0 - 0.5) / 0.25).astype(np.float32)


def path(*parts: str) -> str:
  return os.path.join(TESTDATA, *parts)


def expected(name: str, size: int, seed: int
             ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """The images of `seed` and the reference outputs on them."""
  outputs = load_expected(name)
  inputs = images(size, seed)
  stored_sum = outputs.pop('images_sum')
  if not np.isclose(inputs.sum(dtype=np.float64), stored_sum):
    raise AssertionError(f'{name}: the seeded images differ from the ones '
                         'the fixture was made with (numpy changed its '
                         'random stream?); rerun make_fixtures.py.')
  return inputs, outputs


# OpenFlamingo (open_flamingo 2.0.1's `Flamingo`) at a tiny random size:
# a Hugging Face CLIP ViT (quick GELU, as OpenAI's ViT-L/14) and a Hugging
# Face MPT with a word-level tokenizer.json, cross-attention before every
# 2nd of 4 LM blocks; the resampler and xattn layers keep open_flamingo's
# fixed sizes (8 heads of 64, 6 resampler layers, 64 latents). The LM's 48
# embedding rows (a vocabulary padded past the tokenizer's 41) are resized
# to the 44 tokens the markers make, as OpenFlamingo's factory does.
# testdata/open_flamingo/ holds checkpoint.pt (the trainable tensors, as
# OpenFlamingo's training saves them), clip/ and mpt/ (the published
# folders) and expected.npz (see make_open_flamingo.py).
OF_CLIP = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
               num_attention_heads=2, image_size=16, patch_size=4,
               hidden_act='quick_gelu')
OF_MPT = dict(vocab_size=48, d_model=24, n_layers=4, n_heads=6,
              max_seq_len=128)
OF_EVERY = 2  # cross_attn_every_n_layers.
# A second one, testdata/open_flamingo_neox/: a GPT-NeoX LM (untied output
# rows in checkpoint.pt as `embed_out`, as OpenFlamingo-4B's RedPajama),
# cross-attention before every block (OpenFlamingo-3B's placement), and
# checkpoint.pt in bfloat16.
OF_NEOX = dict(vocab_size=48, hidden_size=24, intermediate_size=48,
               num_hidden_layers=2, num_attention_heads=3, rotary_pct=0.5,
               bos_token_id=0, eos_token_id=0)
# A third, testdata/open_flamingo_mosaic_gpt/: OpenFlamingo-3B's shape,
# MPT-1B's MosaicGPT (mosaic_gpt_reference.py; q/k LayerNorms, no biases)
# as a bfloat16 pytorch_model.bin, cross-attention before every block.
OF_MOSAIC_GPT = dict(vocab_size=48, d_model=24, n_heads=4, n_layers=2,
                     max_seq_len=128)
# name: (transformers config, model, kwargs, LM folder, decoder layers,
#        cross_attn_every_n_layers, checkpoint.pt dtype); MosaicGPT has no
#        transformers classes (mosaic_gpt_reference.py).
OPEN_FLAMINGOS = {
    'open_flamingo': ('MptConfig', 'MptForCausalLM', OF_MPT, 'mpt',
                      'transformer.blocks', OF_EVERY, 'float32'),
    'open_flamingo_neox': ('GPTNeoXConfig', 'GPTNeoXForCausalLM', OF_NEOX,
                           'gpt_neox', 'gpt_neox.layers', 1, 'bfloat16'),
    'open_flamingo_mosaic_gpt': (None, 'MosaicGPT', OF_MOSAIC_GPT,
                                 'mpt-1b-redpajama-200b',
                                 'transformer.blocks', 1, 'float32'),
}
OF_WORDS = ('<|endoftext|>', 'Output', ':', 'a', 'the', 'cat', 'dog', 'red',
            'blue', 'sits', 'runs', 'on', 'in', 'mat', 'grass', 'ball',
            'small', 'big', 'two', 'one', 'with', 'and', 'of', 'sky',
            'tree', 'car', 'road', 'man', 'woman', 'hat', 'green', 'white',
            'black', 'house', 'near', 'water', 'boat', 'bird', 'flies',
            'over', 'under')
# Few-shot captioning: two shots, then the query image.
OF_CAPTIONS = ('a red cat sits on the mat', 'two dog runs in the grass')
OF_NEW_TOKENS = 6
OF_IMAGES_SEED = 21


def open_flamingo_images() -> np.ndarray:
  """[3, 16, 16, 3] uint8: the two shots' images, then the query's."""
  rng = np.random.default_rng(OF_IMAGES_SEED)
  return rng.integers(0, 256, (3, OF_CLIP['image_size'],
                               OF_CLIP['image_size'], 3), dtype=np.uint8)


# IDEFICS (transformers' `IdeficsForVisionText2Text`) at a tiny random size:
# a 4-layer LLaMA with a cross-attention layer before every 2nd block
# (`cross_layer_interval`, as idefics-9b's 4), the 2 IDEFICS tokens
# (`<fake_token_around_image>`, `<image>`) as `additional_vocab_size` rows,
# a 2-block CLIP-like tower whose width the resampler keeps. name: (config
# overrides, seed): 'idefics' has idefics-80b's vector gates and q/k
# norms, 'idefics_float' idefics-9b's scalar gates without them.
# testdata/<name>/ holds the published folder (config.json, sharded BF16
# safetensors with model.safetensors.index.json, tokenizer.json) and
# expected.npz (see make_idefics.py).
IDEFICS_WORDS = ('<unk>', '<s>', '</s>', 'Output', ':', 'a', 'the', 'cat',
                 'dog', 'red', 'blue', 'sits', 'runs', 'on', 'in', 'mat',
                 'grass', 'ball', 'small', 'big', 'two', 'one', 'with',
                 'and', 'of', 'sky', 'tree', 'car', 'road', 'man', 'woman',
                 'hat', 'green', 'white', 'black', 'house', 'near', 'water',
                 'boat', 'bird')
IDEFICS_ADDED = ('<fake_token_around_image>', '<image>')
IDEFICS_CONFIG = dict(
    vocab_size=len(IDEFICS_WORDS), additional_vocab_size=len(IDEFICS_ADDED),
    hidden_size=32, intermediate_size=48, num_hidden_layers=4,
    num_attention_heads=4, cross_layer_interval=2, rms_norm_eps=1e-6,
    use_resampler=True, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    vision_config=dict(embed_dim=16, image_size=16, patch_size=4,
                       intermediate_size=32, num_hidden_layers=2,
                       num_attention_heads=2, hidden_act='gelu'),
    perceiver_config=dict(use_resampler=True, resampler_n_latents=4,
                          resampler_depth=2, resampler_n_heads=2,
                          resampler_head_dim=8))
IDEFICSES = {
    'idefics': (dict(alpha_type='vector', qk_layer_norms=True,
                     perceiver_qk_norms=True), 41),
    'idefics_float': (dict(alpha_type='float', qk_layer_norms=False,
                           perceiver_qk_norms=False), 44),
}
# One shot and the query, as IDEFICS's processor spells images.
IDEFICS_IMAGE = '<fake_token_around_image><image><fake_token_around_image>'
IDEFICS_PROMPT = (f'{IDEFICS_IMAGE}Output: a red cat sits on the mat'
                  f'{IDEFICS_IMAGE}Output:')
IDEFICS_NEW_TOKENS = 6
IDEFICS_IMAGES_SEED = 23


def idefics_images() -> np.ndarray:
  """[2, 16, 16, 3] uint8: the shot's image, then the query's."""
  size = IDEFICS_CONFIG['vision_config']['image_size']
  rng = np.random.default_rng(IDEFICS_IMAGES_SEED)
  return rng.integers(0, 256, (2, size, size, 3), dtype=np.uint8)
