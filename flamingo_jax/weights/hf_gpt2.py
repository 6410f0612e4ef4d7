"""Hugging Face GPT-2 (`GPT2LMHeadModel`, `model_type: gpt2`); safetensors
(sharded) or .bin, with config.json.

Tensor layout (`P` = `transformer.` or nothing, as in the published
`gpt2` files; i = layer):

  P wte.weight [V, D]                    -> lm/embed/embeddings (tied)
  P wpe.weight [n_positions, D]          -> lm/position_embed/embeddings
  P h.i.ln_1.{weight,bias}               -> block/attention_norm
  P h.i.attn.c_attn.{weight [D, 3D], bias} -> block/self_attention/
                                            {query,key,value}
  P h.i.attn.c_proj.*                    -> block/self_attention/output
  P h.i.ln_2.*                           -> block/ffw_norm
  P h.i.mlp.c_fc.* / c_proj.*            -> block/ffw/hidden / output
  P ln_f.*                               -> lm/final_norm

GPT-2's `Conv1D` weights are already [in, out]: not transposed; the fused
c_attn is split into q, k, v on its output axis. Learned absolute
positions, LayerNorms and linears with biases, `gelu_new` (the tanh
approximation, our 'gelu'), tied embeddings. Left unused: the
`attn.bias` / `attn.masked_bias` buffers and a stored `lm_head.weight`
(the tied copy). Refused: `scale_attn_by_inverse_layer_idx`,
`scale_attn_weights=false`.
"""

from typing import Any

import numpy as np

from flamingo_jax.models import lm_layout
from flamingo_jax.weights import hf_lm
from flamingo_jax.weights import mapping
from flamingo_jax.weights import tensors as tensors_lib

ACTIVATIONS = {'gelu_new': 'gelu', 'gelu_pytorch_tanh': 'gelu',
               'gelu': 'gelu_exact', 'relu': 'relu', 'silu': 'silu'}


def _split_columns(x: np.ndarray) -> tuple[np.ndarray, ...]:
  """[D, 3D] or [3D] -> q, k, v on the last axis."""
  return tuple(np.split(x, 3, axis=-1))


class Gpt2(hf_lm.Family):
  """Hugging Face GPT-2."""
  KIND = 'hf_gpt2'
  SUMMARY = ('Hugging Face GPT2LMHeadModel: safetensors (sharded) + '
             'config.json [+ tokenizer.json]')
  FAMILY = 'GPT-2'
  MODEL_TYPES = ('gpt2',)
  ANCHOR = 'wte.weight'

  def lm_config(self, config, tensors: tensors_lib.TensorStore, prefix: str,
                source: str) -> dict[str, Any]:
    hf_lm.unsupported(
        config, source,
        {'activation_function': ('gelu_new', lambda v: v in ACTIVATIONS),
         'scale_attn_by_inverse_layer_idx': (False, lambda v: not v),
         'scale_attn_weights': (True, lambda v: v is True)})
    width, heads = config['n_embd'], config['n_head']
    layers = hf_lm.num_layers(
        tensors, rf'{prefix}h\.(?P<layer>\d+)\.ln_1\.weight')
    hidden = tensors.info(f'{prefix}h.0.mlp.c_fc.weight').shape[1]
    return lm_layout.family_config(
        'gpt2', num_layers=layers, width=width, num_heads=heads,
        head_size=width // heads, ffw_hidden=hidden,
        max_positions=tensors.info(f'{prefix}wpe.weight').shape[0],
        activation=ACTIVATIONS[config.get('activation_function',
                                          'gelu_new')],
        norm_eps=config.get('layer_norm_epsilon', 1e-5),
        tied_embeddings=bool(config.get('tie_word_embeddings', True)))

  def rules(self, prefix, lm_config, rows):
    p = prefix.replace('.', r'\.')
    layer = rf'{p}h\.(?P<layer>\d+)\.'
    block = hf_lm.BLOCK
    attention = f'{block}/self_attention'
    keep = mapping.identity  # Conv1D: [in, out] already.
    table = [
        mapping.Rule(rf'{p}wte\.weight', 'lm/embed/embeddings',
                     hf_lm.fit_rows(rows)),
        mapping.Rule(rf'{p}wpe\.weight', 'lm/position_embed/embeddings'),
        mapping.Rule(rf'{layer}attn\.c_attn\.weight',
                     tuple(f'{attention}/{t}/w'
                           for t in ('query', 'key', 'value')),
                     _split_columns),
        mapping.Rule(rf'{layer}attn\.c_attn\.bias',
                     tuple(f'{attention}/{t}/b'
                           for t in ('query', 'key', 'value')),
                     _split_columns),
    ]
    table += hf_lm.linear(rf'{layer}attn\.c_proj', f'{attention}/output',
                          True, keep)
    table += hf_lm.linear(rf'{layer}mlp\.c_fc', f'{block}/ffw/hidden', True,
                          keep)
    table += hf_lm.linear(rf'{layer}mlp\.c_proj', f'{block}/ffw/output', True,
                          keep)
    table += hf_lm.norm(f'{layer}ln_1', f'{block}/attention_norm', True)
    table += hf_lm.norm(f'{layer}ln_2', f'{block}/ffw_norm', True)
    table += hf_lm.norm(f'{p}ln_f', 'lm/final_norm', True)
    ignore = [rf'{layer}attn\.(bias|masked_bias)']
    head, ignored = hf_lm.unembedding(lm_config, rows)
    return table + head, ignore + ignored


hf_lm.export(Gpt2(), globals())
