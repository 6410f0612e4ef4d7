"""Hugging Face MPT (`MptForCausalLM`, `model_type: mpt`): MPT-7B/30B
(MPT-7B is OpenFlamingo-9B's LM); safetensors (sharded) or .bin, with
config.json.

Tensor layout (`P` = `transformer.` or nothing; i = layer):

  P wte.weight [V, D]                    -> lm/embed/embeddings (tied: also
                                            the output projection)
  P blocks.i.norm_1.weight               -> block/attention_norm/scale
  P blocks.i.attn.Wqkv.weight [3D, D]    -> block/self_attention/
                                            {query,key,value}/w (q, k, v whole)
  P blocks.i.attn.q_ln / k_ln.weight [D] -> block/self_attention/q_norm /
                                            k_norm/scale (`qk_ln` only)
  P blocks.i.attn.out_proj.weight        -> block/self_attention/output/w
  P blocks.i.norm_2.weight               -> block/ffw_norm/scale
  P blocks.i.ffn.up_proj / down_proj     -> block/ffw/hidden / output
  P norm_f.weight                        -> lm/final_norm/scale

ALiBi (`attn_config.alibi`, `alibi_bias_max`), LayerNorms without bias and
linears without bias (`no_bias`), exact GELU, tied embeddings.
`attn_config.qk_ln` (LayerNorms on the queries and keys over the full
width, before the head split: the LM's `qk_norm`) is read as MosaicML's
remote-code MPT (llm-foundry) defines it; transformers' own
`MptForCausalLM` has no such norms (it ignores the field), so a checkpoint
with `qk_ln: true` must hold the `q_ln` / `k_ln` tensors. Refused:
`clip_qkv`, a `softmax_scale` other than 1/sqrt(head size), `logit_scale`,
learned positions instead of ALiBi, `embedding_fraction` != 1. MosaicML's
own remote-code checkpoints (`mosaicml/mpt-7b`) use the same names; the
older MosaicGPT layout of MPT-1B (`mpt-1b-redpajama-200b`, OpenFlamingo-3B's
LM: `ln_1`, `mlp.mlp_up`, ...) is `hf_mosaic_gpt.py`.
"""

import math
from typing import Any

from flamingo_jax.models import lm_layout
from flamingo_jax.weights import hf_lm
from flamingo_jax.weights import mapping
from flamingo_jax.weights import tensors as tensors_lib


class Mpt(hf_lm.Family):
  """Hugging Face MPT."""
  KIND = 'hf_mpt'
  SUMMARY = ('Hugging Face MptForCausalLM (MPT-7B/30B; MPT-1B is '
             'hf_mosaic_gpt): safetensors (sharded) + config.json '
             '[+ tokenizer.json]')
  FAMILY = 'MPT'
  MODEL_TYPES = ('mpt',)
  ANCHOR = 'wte.weight'
  # Tensor names after `P blocks.i.` (or `P`), which MosaicGPT renames.
  NAMES = dict(norm_1='norm_1', norm_2='norm_2', norm_f='norm_f',
               up='ffn.up_proj', down='ffn.down_proj')

  def check(self, config, source: str, head_size: int) -> None:
    """Raises naming the config fields our LM does not implement."""
    attn = dict(config.get('attn_config') or {})
    hf_lm.unsupported(
        {**config, **{f'attn_config.{k}': v for k, v in attn.items()}},
        source,
        {'attn_config.alibi': (True, lambda v: v is True),
         'attn_config.clip_qkv': (None, lambda v: v is None),
         'attn_config.softmax_scale': (None, lambda v: v is None or math.isclose(
             v, head_size**-0.5)),
         'logit_scale': (None, lambda v: v is None),
         'embedding_fraction': (1.0, lambda v: v == 1.0)})

  def qk_ln(self, config) -> bool:
    return bool(dict(config.get('attn_config') or {}).get('qk_ln', False))

  def alibi_bias_max(self, config) -> float:
    return float(dict(config.get('attn_config') or {}).get(
        'alibi_bias_max', 8))

  def lm_config(self, config, tensors: tensors_lib.TensorStore, prefix: str,
                source: str) -> dict[str, Any]:
    width, heads = config['d_model'], config['n_heads']
    head_size = width // heads
    self.check(config, source, head_size)
    names = self.NAMES
    layers = hf_lm.num_layers(
        tensors, rf'{prefix}blocks\.(?P<layer>\d+)\.{names["norm_1"]}\.weight')
    hidden = tensors.info(f'{prefix}blocks.0.{names["up"]}.weight').shape[0]
    no_bias = bool(config.get('no_bias', True))
    return lm_layout.family_config(
        'mpt', num_layers=layers, width=width, num_heads=heads,
        head_size=head_size, ffw_hidden=hidden,
        alibi_bias_max=self.alibi_bias_max(config),
        norm_eps=config.get('layer_norm_epsilon', 1e-5),
        norm_bias=not no_bias, use_bias=not no_bias,
        tied_embeddings=bool(config.get('tie_word_embeddings', True)),
        qk_norm=self.qk_ln(config))

  def rules(self, prefix, lm_config, rows):
    p = prefix.replace('.', r'\.')
    layer = rf'{p}blocks\.(?P<layer>\d+)\.'
    block = hf_lm.BLOCK
    bias = lm_config['use_bias']
    attention = f'{block}/self_attention'
    table = [mapping.Rule(rf'{p}wte\.weight', 'lm/embed/embeddings',
                          hf_lm.fit_rows(rows)),
             mapping.Rule(rf'{layer}attn\.Wqkv\.weight',
                          tuple(f'{attention}/{t}/w'
                                for t in ('query', 'key', 'value')),
                          mapping.split_rows(3, mapping.transpose))]
    if bias:
      table.append(mapping.Rule(
          rf'{layer}attn\.Wqkv\.bias',
          tuple(f'{attention}/{t}/b' for t in ('query', 'key', 'value')),
          mapping.split_rows(3)))
    table += hf_lm.linear(rf'{layer}attn\.out_proj', f'{attention}/output',
                          bias)
    names = {k: v.replace('.', r'\.') for k, v in self.NAMES.items()}
    table += hf_lm.linear(rf'{layer}{names["up"]}', f'{block}/ffw/hidden',
                          bias)
    table += hf_lm.linear(rf'{layer}{names["down"]}', f'{block}/ffw/output',
                          bias)
    norm_bias = lm_config['norm_bias']
    table += hf_lm.norm(f'{layer}{names["norm_1"]}',
                        f'{block}/attention_norm', norm_bias)
    table += hf_lm.norm(f'{layer}{names["norm_2"]}', f'{block}/ffw_norm',
                        norm_bias)
    table += hf_lm.norm(f'{p}{names["norm_f"]}', 'lm/final_norm', norm_bias)
    if lm_config.get('qk_norm'):
      for source, target in (('q_ln', 'q_norm'), ('k_ln', 'k_norm')):
        table += hf_lm.norm(rf'{layer}attn\.{source}',
                            f'{attention}/{target}', norm_bias)
    head, ignored = hf_lm.unembedding(lm_config, rows)
    return table + head, ignored


hf_lm.export(Mpt(), globals())
