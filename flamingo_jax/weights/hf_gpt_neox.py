"""Hugging Face GPT-NeoX (`GPTNeoXForCausalLM`, `model_type: gpt_neox`):
Pythia, RedPajama-INCITE (OpenFlamingo-4B's LM); safetensors (sharded) or
.bin, with config.json.

Tensor layout (`P` = `gpt_neox.` or nothing; i = layer):

  P embed_in.weight [V, D]                    -> lm/embed/embeddings
  P layers.i.input_layernorm.{weight,bias}    -> block/attention_norm
  P layers.i.post_attention_layernorm.*       -> block/ffw_norm
  P layers.i.attention.query_key_value.* [3D, D] -> block/self_attention/
                                                 {query,key,value}
  P layers.i.attention.dense.*                -> block/self_attention/output
  P layers.i.mlp.dense_h_to_4h.* / dense_4h_to_h.* -> block/ffw/hidden / output
  P final_layer_norm.{weight,bias}            -> lm/final_norm
  embed_out.weight or lm_head.weight [V, D]   -> lm/unembed/w

The fused projection is laid out per head, [H, (q, k, v), K] on its output
axis (not q, k, v each whole): it is split per head, then transposed.
Partial rotary (`rotary_pct` or rope_parameters' `partial_rotary_factor`),
rotate-half, on the first dimensions of each head; the parallel residual
(`use_parallel_residual`) with its two LayerNorms; exact GELU ('gelu').
Left unused: the `attention.bias` / `masked_bias` / `rotary_emb.inv_freq`
buffers of older checkpoints.
"""

from typing import Any

import numpy as np

from flamingo_jax.models import lm_layout
from flamingo_jax.weights import hf_lm
from flamingo_jax.weights import mapping
from flamingo_jax.weights import tensors as tensors_lib

ACTIVATIONS = {'gelu': 'gelu_exact', 'gelu_new': 'gelu',
               'gelu_pytorch_tanh': 'gelu', 'relu': 'relu', 'silu': 'silu'}


def _split_heads(num_heads: int, transpose: bool) -> mapping.Transform:
  """[H * 3 * K, ...] (per head: q, k, v) -> q, k, v [H * K, ...] each
  (weights then transposed to [D, H * K])."""
  def split(x: np.ndarray) -> tuple[np.ndarray, ...]:
    per_head = x.reshape(num_heads, 3, -1, *x.shape[1:])  # [H, 3, K, ...]
    parts = [per_head[:, i].reshape(-1, *x.shape[1:]) for i in range(3)]
    return tuple(p.T if transpose else p for p in parts)
  return split


class GptNeoX(hf_lm.Family):
  """Hugging Face GPT-NeoX."""
  KIND = 'hf_gpt_neox'
  SUMMARY = ('Hugging Face GPTNeoXForCausalLM (Pythia, RedPajama-INCITE): '
             'safetensors (sharded) + config.json [+ tokenizer.json]')
  FAMILY = 'GPT-NeoX'
  MODEL_TYPES = ('gpt_neox',)
  ANCHOR = 'embed_in.weight'

  def lm_config(self, config, tensors: tensors_lib.TensorStore, prefix: str,
                source: str) -> dict[str, Any]:
    rope = dict(config.get('rope_parameters') or {})
    scaling = config.get('rope_scaling') or {}
    rope_type = rope.get('rope_type', scaling.get('type', 'default'))
    hf_lm.unsupported(
        {**config, 'rope_type': rope_type}, source,
        {'hidden_act': ('gelu', lambda v: v in ACTIVATIONS),
         'rope_type': ('default', lambda v: v == 'default'),
         # Its MLP always has biases; flamingo_jax has one use_bias.
         'attention_bias': (True, lambda v: v is True)})
    width = config['hidden_size']
    heads = config['num_attention_heads']
    layers = hf_lm.num_layers(
        tensors, rf'{prefix}layers\.(?P<layer>\d+)\.input_layernorm\.weight')
    return lm_layout.family_config(
        'gpt_neox', num_layers=layers, width=width, num_heads=heads,
        head_size=width // heads, ffw_hidden=config['intermediate_size'],
        activation=ACTIVATIONS[config.get('hidden_act', 'gelu')],
        rotary_fraction=float(rope.get('partial_rotary_factor',
                                       config.get('rotary_pct', 0.25))),
        rotary_base=float(rope.get('rope_theta', config.get(
            'rope_theta', config.get('rotary_emb_base', 10000.0)))),
        norm_eps=config.get('layer_norm_eps', 1e-5),
        use_bias=True,
        parallel_residual=bool(config.get('use_parallel_residual', True)),
        tied_embeddings=bool(config.get('tie_word_embeddings', False)))

  def rules(self, prefix, lm_config, rows):
    p = prefix.replace('.', r'\.')
    layer = rf'{p}layers\.(?P<layer>\d+)\.'
    block = hf_lm.BLOCK
    heads = lm_config['num_heads']
    bias = True
    attention = f'{block}/self_attention'
    table = [
        mapping.Rule(rf'{p}embed_in\.weight', 'lm/embed/embeddings',
                     hf_lm.fit_rows(rows)),
        mapping.Rule(rf'{layer}attention\.query_key_value\.weight',
                     tuple(f'{attention}/{t}/w'
                           for t in ('query', 'key', 'value')),
                     _split_heads(heads, transpose=True)),
    ]
    table.append(mapping.Rule(
        rf'{layer}attention\.query_key_value\.bias',
        tuple(f'{attention}/{t}/b' for t in ('query', 'key', 'value')),
        _split_heads(heads, transpose=False)))
    table += hf_lm.linear(rf'{layer}attention\.dense', f'{attention}/output',
                          bias)
    table += hf_lm.linear(rf'{layer}mlp\.dense_h_to_4h', f'{block}/ffw/hidden',
                          True)
    table += hf_lm.linear(rf'{layer}mlp\.dense_4h_to_h', f'{block}/ffw/output',
                          True)
    table += hf_lm.norm(f'{layer}input_layernorm', f'{block}/attention_norm',
                        True)
    table += hf_lm.norm(f'{layer}post_attention_layernorm',
                        f'{block}/ffw_norm', True)
    table += hf_lm.norm(f'{p}final_layer_norm', 'lm/final_norm', True)
    ignore = [rf'{layer}attention\.(bias|masked_bias|rotary_emb\.inv_freq)',
              r'.*rotary_emb\.inv_freq']
    head, ignored = hf_lm.unembedding(lm_config, rows, r'(embed_out|lm_head)\.weight')
    return table + head, ignore + ignored


hf_lm.export(GptNeoX(), globals())
