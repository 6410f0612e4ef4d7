"""Hugging Face LLaMA (`LlamaForCausalLM`, `model_type: llama`): LLaMA 1/2,
and the LM of IDEFICS; safetensors (sharded) or .bin, with config.json.

Tensor layout (`P` = `model.` or nothing; i = layer):

  P embed_tokens.weight [V, D]              -> lm/embed/embeddings
  P layers.i.input_layernorm.weight         -> block/attention_norm/scale [i]
  P layers.i.self_attn.{q,k,v,o}_proj.weight -> block/self_attention/
                                               {query,key,value,output}/w
  P layers.i.post_attention_layernorm.weight -> block/ffw_norm/scale
  P layers.i.mlp.{gate,up,down}_proj.weight -> block/ffw/{gate,hidden,output}/w
  P norm.weight                             -> lm/final_norm/scale
  lm_head.weight [V, D]                     -> lm/unembed/w (untied only)

Linear weights are transposed. Hugging Face's q/k weights are already
permuted for the rotate-half rotary convention that `models/positions.py`
uses (Meta's original checkpoints are not: convert them with transformers'
`convert_llama_weights_to_hf.py` first). Grouped-query attention
(`num_key_value_heads`), `rms_norm_eps`, `rope_theta`, `head_dim` and
`tie_word_embeddings` come from config.json; RoPE scaling (`rope_scaling`,
LLaMA 3.1's) is refused.
"""

from typing import Any

from flamingo_jax.models import lm_layout
from flamingo_jax.weights import hf_lm
from flamingo_jax.weights import mapping
from flamingo_jax.weights import tensors as tensors_lib


def _rope(config: dict[str, Any]) -> dict[str, Any]:
  """rope_parameters (transformers >= 5) or the older flat fields."""
  rope = dict(config.get('rope_parameters') or {})
  scaling = config.get('rope_scaling') or {}
  rope.setdefault('rope_type', scaling.get('rope_type', scaling.get(
      'type', 'default')))
  rope.setdefault('rope_theta', config.get('rope_theta', 10000.0))
  return rope


class Llama(hf_lm.Family):
  """Hugging Face LLaMA."""
  KIND = 'hf_llama'
  SUMMARY = ('Hugging Face LlamaForCausalLM (LLaMA 1/2, IDEFICS\'s LM): '
             'safetensors (sharded) + config.json [+ tokenizer.json]')
  FAMILY = 'LLaMA'
  MODEL_TYPES = ('llama',)
  ANCHOR = 'embed_tokens.weight'

  def lm_config(self, config, tensors: tensors_lib.TensorStore, prefix: str,
                source: str) -> dict[str, Any]:
    rope = _rope(config)
    hf_lm.unsupported(
        {**config, 'rope_type': rope['rope_type']}, source,
        {'hidden_act': ('silu', lambda v: v == 'silu'),
         'rope_type': ('default', lambda v: v == 'default'),
         'pretraining_tp': (1, lambda v: v == 1)})
    attention_bias = config.get('attention_bias', False)
    if attention_bias != config.get('mlp_bias', False):
      raise ValueError(f'{source}: attention_bias={attention_bias} and '
                       f'mlp_bias={config.get("mlp_bias", False)} differ; '
                       'flamingo_jax has one use_bias for both.')
    width = config['hidden_size']
    heads = config['num_attention_heads']
    kv_heads = config.get('num_key_value_heads') or heads
    layers = hf_lm.num_layers(
        tensors, rf'{prefix}layers\.(?P<layer>\d+)\.input_layernorm\.weight')
    return lm_layout.family_config(
        'llama', num_layers=layers, width=width, num_heads=heads,
        head_size=config.get('head_dim') or width // heads,
        num_kv_heads=None if kv_heads == heads else kv_heads,
        ffw_hidden=config['intermediate_size'],
        norm_eps=config.get('rms_norm_eps', 1e-6),
        rotary_base=float(rope['rope_theta']),
        use_bias=attention_bias,
        tied_embeddings=bool(config.get('tie_word_embeddings', False)))

  def rules(self, prefix, lm_config, rows):
    p = prefix.replace('.', r'\.')
    layer = rf'{p}layers\.(?P<layer>\d+)\.'
    bias = lm_config['use_bias']
    block = hf_lm.BLOCK
    table = [mapping.Rule(rf'{p}embed_tokens\.weight', 'lm/embed/embeddings',
                          hf_lm.fit_rows(rows))]
    table += hf_lm.norm(f'{layer}input_layernorm', f'{block}/attention_norm',
                        False)
    table += hf_lm.norm(f'{layer}post_attention_layernorm',
                        f'{block}/ffw_norm', False)
    table += hf_lm.norm(f'{p}norm', 'lm/final_norm', False)
    for source, target in (('q', 'query'), ('k', 'key'), ('v', 'value'),
                           ('o', 'output')):
      table += hf_lm.linear(rf'{layer}self_attn\.{source}_proj',
                            f'{block}/self_attention/{target}', bias)
    for source, target in (('gate', 'gate'), ('up', 'hidden'),
                           ('down', 'output')):
      table += hf_lm.linear(rf'{layer}mlp\.{source}_proj',
                            f'{block}/ffw/{target}', bias)
    ignore = [r'.*rotary_emb\.inv_freq']
    head, ignored = hf_lm.unembedding(lm_config, rows)
    return table + head, ignore + ignored


hf_lm.export(Llama(), globals())
