"""Writes a random LLaMA-shaped bf16 checkpoint to measure the converter's
peak memory (not a test; nothing in CI runs it).

TinyLlama-1.1B's widths (D 2048, FFW 5632, 32 heads, 4 key/value heads) over
14 layers and a 1024-token vocabulary: 1.24 GB in 4 safetensors shards with
`model.safetensors.index.json`, written with numpy and flamingo_jax's own
safetensors writer (no torch), one shard in memory at a time:

  python tests/weights/make_memory_checkpoint.py /tmp/bigllama
  /usr/bin/time -v python -m flamingo_jax.weights.convert hf_llama \
      /tmp/bigllama --workdir /tmp/bigllama_jax --dtype bfloat16
  rm -r /tmp/bigllama /tmp/bigllama_jax

`make_memory_checkpoint.py DIR llama7b` writes LLaMA-7B's shape instead
(D 4096, FFW 11008, 32 layers, 32 heads, vocabulary 32000: 13.5 GB).
"""

import json
import os
import sys

import ml_dtypes
import numpy as np

from flamingo_jax.weights import safetensors_file

SIZES = {  # width, ffw, layers, vocab, heads, kv_heads
    'tinyllama14': (2048, 5632, 14, 1024, 32, 4),
    'llama7b': (4096, 11008, 32, 32000, 32, 32),
}
WIDTH, FFW, LAYERS, VOCAB, HEADS, KV_HEADS = SIZES['tinyllama14']
LAYERS_PER_SHARD = 4


def _random(rng, *shape) -> np.ndarray:
  return (0.02 * rng.standard_normal(shape, np.float32)).astype(
      ml_dtypes.bfloat16)


def _layer(rng, i: int) -> dict[str, np.ndarray]:
  p, kv = f'model.layers.{i}.', KV_HEADS * (WIDTH // HEADS)
  ones = np.ones(WIDTH, ml_dtypes.bfloat16)
  return {p + 'self_attn.q_proj.weight': _random(rng, WIDTH, WIDTH),
          p + 'self_attn.k_proj.weight': _random(rng, kv, WIDTH),
          p + 'self_attn.v_proj.weight': _random(rng, kv, WIDTH),
          p + 'self_attn.o_proj.weight': _random(rng, WIDTH, WIDTH),
          p + 'mlp.gate_proj.weight': _random(rng, FFW, WIDTH),
          p + 'mlp.up_proj.weight': _random(rng, FFW, WIDTH),
          p + 'mlp.down_proj.weight': _random(rng, WIDTH, FFW),
          p + 'input_layernorm.weight': ones,
          p + 'post_attention_layernorm.weight': ones}


def main(directory: str) -> None:
  os.makedirs(directory, exist_ok=True)
  rng = np.random.default_rng(0)
  shards = [range(s, min(s + LAYERS_PER_SHARD, LAYERS))
            for s in range(0, LAYERS, LAYERS_PER_SHARD)]
  weight_map = {}
  for n, layers in enumerate(shards):
    name = f'model-{n + 1:05d}-of-{len(shards):05d}.safetensors'
    arrays = {}
    if n == 0:
      arrays['model.embed_tokens.weight'] = _random(rng, VOCAB, WIDTH)
    for i in layers:
      arrays.update(_layer(rng, i))
    if n == len(shards) - 1:
      arrays['model.norm.weight'] = np.ones(WIDTH, ml_dtypes.bfloat16)
      arrays['lm_head.weight'] = _random(rng, VOCAB, WIDTH)
    safetensors_file.write(os.path.join(directory, name), arrays)
    weight_map.update(dict.fromkeys(arrays, name))
  with open(os.path.join(directory, 'model.safetensors.index.json'), 'w') as f:
    json.dump({'metadata': {}, 'weight_map': weight_map}, f)
  with open(os.path.join(directory, 'config.json'), 'w') as f:
    json.dump({'model_type': 'llama', 'hidden_size': WIDTH,
               'intermediate_size': FFW, 'num_hidden_layers': LAYERS,
               'num_attention_heads': HEADS, 'num_key_value_heads': KV_HEADS,
               'vocab_size': VOCAB, 'rms_norm_eps': 1e-5,
               'rope_theta': 10000.0, 'tie_word_embeddings': False,
               'hidden_act': 'silu'}, f)


if __name__ == '__main__':
  if len(sys.argv) > 2:
    WIDTH, FFW, LAYERS, VOCAB, HEADS, KV_HEADS = SIZES[sys.argv[2]]
  main(sys.argv[1])
