"""MosaicML's MosaicGPT (`model_type: mosaic_gpt`, remote code
`mosaic_gpt.py`): MPT-1B, `anas-awadalla/mpt-1b-redpajama-200b` (and its
`-dolly` instruction-tuned sibling), OpenFlamingo-3B's LM; pytorch_model.bin
or safetensors, with config.json (+ the GPT-NeoX tokenizer).

MosaicGPT is MPT's predecessor in mosaicml/examples: the same decoder
(pre-LN blocks, fused Wqkv, ALiBi, exact GELU, tied embeddings) under
other names, with flat config fields instead of MPT's `attn_config`.
Tensor layout (`P` = `transformer.`; i = layer):

  P wte.weight [V, D]                    -> lm/embed/embeddings (tied: the
                                            logits are F.linear(x, wte))
  P blocks.i.ln_1.weight                 -> block/attention_norm/scale
  P blocks.i.attn.Wqkv.weight [3D, D]    -> block/self_attention/
                                            {query,key,value}/w
  P blocks.i.attn.q_ln / k_ln.weight [D] -> block/self_attention/q_norm /
                                            k_norm/scale (`attn_qk_ln`)
  P blocks.i.attn.out_proj.weight        -> block/self_attention/output/w
  P blocks.i.ln_2.weight                 -> block/ffw_norm/scale
  P blocks.i.mlp.mlp_up / mlp_down       -> block/ffw/hidden / output
  P ln_f.weight                          -> lm/final_norm/scale

Config (MPT-1B: d_model 2048, n_heads 16, n_layers 24, mlp_ratio 4,
vocab_size 50432, `alibi: true`, `attn_qk_ln: true`, `no_bias: true`):
  no_bias        MosaicGPT removes the `bias` of *every* module, LayerNorms
                 included (their `bias` is a Parameter too), so `true` means
                 LayerNorms with a scale only and linears without bias
                 (`norm_bias`, `use_bias` False); `false` keeps both.
  attn_qk_ln     LayerNorms over the full width on q and k, after Wqkv and
                 before the head split (`qk_norm`); the same LayerNorm class
                 as the blocks' (`low_precision_layernorm` only changes the
                 autocast dtype), eps 1e-5 (torch's default, not in the
                 config).
  alibi, alibi_bias_max  ALiBi with slopes 2^(-alibi_bias_max * h / H),
                 h = 1..H. MosaicGPT computes them so for any H, where MPT
                 (and our `positions.alibi_slopes`) interleave the slopes of
                 the next power of two: a head count that is not a power of
                 two is refused rather than imported with other slopes.
Refused: `alibi: false` (learned positions), `attn_clip_qkv`, a
`softmax_scale` other than 1/sqrt(head size), `logit_scale`,
`embedding_fraction` != 1, `prefix_lm: true` (a bidirectional prefix, which
MosaicGPT's `generate` applies over the whole prompt).
"""

import math
from typing import Any

from flamingo_jax.weights import hf_lm
from flamingo_jax.weights import hf_mpt
from flamingo_jax.weights import tensors as tensors_lib


class MosaicGpt(hf_mpt.Mpt):
  """MosaicGPT: MPT's mapping under MosaicGPT's names and config fields."""
  KIND = 'hf_mosaic_gpt'
  SUMMARY = ("MosaicML's MosaicGPT (MPT-1B, mpt-1b-redpajama-200b: "
             "OpenFlamingo-3B's LM): pytorch_model.bin or safetensors + "
             'config.json [+ tokenizer.json]')
  FAMILY = 'MosaicGPT'
  MODEL_TYPES = ('mosaic_gpt',)
  ANCHOR = 'wte.weight'
  NAMES = dict(norm_1='ln_1', norm_2='ln_2', norm_f='ln_f',
               up='mlp.mlp_up', down='mlp.mlp_down')

  def check(self, config, source: str, head_size: int) -> None:
    hf_lm.unsupported(config, source, {
        'alibi': (False, lambda v: v is True),
        'attn_clip_qkv': (None, lambda v: v is None),
        'softmax_scale': (None, lambda v: v is None or math.isclose(
            v, head_size**-0.5)),
        'logit_scale': (None, lambda v: v is None),
        'embedding_fraction': (1.0, lambda v: v == 1.0),
        'prefix_lm': (False, lambda v: not v),
        'n_heads': (None, lambda h: h and h & (h - 1) == 0)})

  def qk_ln(self, config) -> bool:
    return bool(config.get('attn_qk_ln', False))

  def alibi_bias_max(self, config) -> float:
    return float(config.get('alibi_bias_max', 8))

  def lm_config(self, config, tensors: tensors_lib.TensorStore, prefix: str,
                source: str) -> dict[str, Any]:
    # MosaicGPTConfig's defaults: biases kept, 1e-5 LayerNorms, always tied.
    config = dict(config, no_bias=bool(config.get('no_bias', False)),
                  tie_word_embeddings=True)
    config.pop('layer_norm_epsilon', None)
    return super().lm_config(config, tensors, prefix, source)


hf_lm.export(MosaicGpt(), globals())
