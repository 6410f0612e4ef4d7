"""Layouts of the decoder LM: Chinchilla's (the default) and the published
families that Flamingo-style checkpoints use (LLaMA, GPT-NeoX, MPT and
its predecessor MosaicGPT, GPT-2).

A layout is a set of fields of `config.model.lm` (plain data, read by
`lm.DecoderLM`); the defaults give Chinchilla's layout, whose parameter
paths are pinned. `FAMILIES` names the settings of each family; an
importer (`flamingo_jax/weights/hf_lm.py`) writes them into the config it
produces, with the sizes of the checkpoint.

  | field             | values (default first)                                |
  |-------------------|-------------------------------------------------------|
  | positions         | 'relative' (Transformer-XL), 'rotary', 'alibi',       |
  |                   | 'learned' (absolute, `max_positions` rows), 'none'    |
  | rotary_fraction   | 1.0: share of each head's dims rotated (NeoX < 1)    |
  | rotary_base       | 10000.0 (LLaMA's rope_theta)                          |
  | alibi_bias_max    | 8.0 (MPT)                                             |
  | max_positions     | 2048: rows of the learned position table              |
  | norm              | 'rms' (RMSNorm), 'layer' (LayerNorm)                  |
  | norm_bias         | True: LayerNorm with an offset (MPT: False)           |
  | norm_eps          | 1e-5                                                  |
  | ffw               | 'mlp' (hidden, activation, output), 'gated' (SwiGLU:  |
  |                   | activation(gate) * hidden, then output)               |
  | ffw_hidden        | None: ffw_multiplier * width, else this width         |
  | use_bias          | False: biases on every projection (GPT-2, NeoX)       |
  | parallel_residual | False; True: x + attn(norm1(x)) + ffw(norm2(x)) (NeoX)|
  | tied_embeddings   | False; True: the output projection is the embedding   |
  |                   | table transposed (GPT-2, MPT): no `lm/unembed`        |
  | num_kv_heads      | None (= num_heads); fewer: grouped-query attention    |
  | qk_norm           | False; True: the layout's norm on the projected       |
  |                   | queries and keys, over all heads' features, before    |
  |                   | the head split (MosaicGPT's attn_qk_ln, MPT's qk_ln)  |

Parameters of one block under each layout (`lm/blocks/block/...`, [N, ...]):
  attention_norm, ffw_norm            scale (+ offset for 'layer' with bias)
  self_attention/{query,key,value,output}/w (+ b with use_bias);
    with 'relative': also relative_key/w, content_bias, position_bias;
    with qk_norm: also self_attention/{q_norm,k_norm}/scale (+ offset)
  ffw/hidden, ffw/output (+ ffw/gate for 'gated'), w (+ b)
and `lm/position_embed/embeddings` [max_positions, D] for 'learned'.

Glossary of shapes:
  D: model width; F: feed-forward hidden width.
"""

import dataclasses
from typing import Any, Optional

import haiku as hk
import jax

from flamingo_jax.models import layers

POSITIONS = ('relative', 'rotary', 'alibi', 'learned', 'none')
NORMS = ('rms', 'layer')
FFWS = ('mlp', 'gated')

# The settings of each family (sizes come from the checkpoint's config).
FAMILIES: dict[str, dict[str, Any]] = {
    'chinchilla': dict(),  # The defaults.
    'llama': dict(positions='rotary', norm='rms', norm_eps=1e-6, ffw='gated',
                  activation='silu'),
    'gpt_neox': dict(positions='rotary', rotary_fraction=0.25, norm='layer',
                     activation='gelu_exact', use_bias=True,
                     parallel_residual=True),
    'mpt': dict(positions='alibi', norm='layer', norm_bias=False,
                activation='gelu_exact', tied_embeddings=True),
    # MPT-1B (mpt-1b-redpajama-200b, OpenFlamingo-3B's LM): MPT's layout
    # with LayerNorms (no bias) on the queries and keys.
    'mosaic_gpt': dict(positions='alibi', norm='layer', norm_bias=False,
                       activation='gelu_exact', tied_embeddings=True,
                       qk_norm=True),
    'gpt2': dict(positions='learned', max_positions=1024, norm='layer',
                 activation='gelu', use_bias=True, tied_embeddings=True),
}


@dataclasses.dataclass(frozen=True)
class Layout:
  """What a decoder block needs of the layout (hashable; see the table)."""
  positions: str = 'relative'
  rotary_fraction: float = 1.0
  rotary_base: float = 10000.0
  alibi_bias_max: float = 8.0
  norm: str = 'rms'
  norm_bias: bool = True
  norm_eps: float = 1e-5
  ffw: str = 'mlp'
  ffw_hidden: Optional[int] = None
  use_bias: bool = False
  parallel_residual: bool = False
  num_kv_heads: Optional[int] = None
  qk_norm: bool = False

  def check(self, num_heads: int) -> None:
    """Raises a ValueError naming a bad or unsupported field value."""
    for field, value, allowed in (('positions', self.positions, POSITIONS),
                                  ('norm', self.norm, NORMS),
                                  ('ffw', self.ffw, FFWS)):
      if value not in allowed:
        raise ValueError(f'Unknown lm {field} {value!r}; expected one of '
                         f'{allowed}.')
    kv_heads = self.num_kv_heads or num_heads
    if num_heads % kv_heads:
      raise ValueError(f'num_kv_heads={kv_heads} must divide num_heads='
                       f'{num_heads} (grouped-query attention).')
    if self.positions == 'relative' and (self.use_bias or self.qk_norm or
                                         kv_heads != num_heads):
      raise ValueError(
          "positions='relative' (Chinchilla's attention) has no biases, "
          'no query/key norms and no grouped-query attention; use_bias, '
          "qk_norm and num_kv_heads need positions 'rotary', 'alibi', "
          "'learned' or 'none'.")


def family_config(family: str, **sizes: Any) -> dict[str, Any]:
  """The `config.model.lm` of `family` (FAMILIES) with the given sizes."""
  if family not in FAMILIES:
    raise ValueError(f'Unknown LM family {family!r}; expected one of '
                     f'{sorted(FAMILIES)}.')
  return dict(FAMILIES[family], **sizes)


def norm(layout: Layout, name: str) -> hk.Module:
  """The layout's normalisation layer (parameters `scale`, `offset`)."""
  if layout.norm == 'rms':
    return hk.RMSNorm(axis=-1, eps=layout.norm_eps, name=name)
  return hk.LayerNorm(axis=-1, create_scale=True,
                      create_offset=layout.norm_bias, eps=layout.norm_eps,
                      name=name)


class FamilyFeedForward(hk.Module):
  """The feed-forward layer of a non-default layout.

  'mlp':   output(act(hidden(x)))
  'gated': output(act(gate(x)) * hidden(x))   (SwiGLU with act = silu)
  """

  def __init__(self, hidden_size: Optional[int], multiplier: int,
               activation: str, gated: bool, with_bias: bool,
               name: Optional[str] = None):
    super().__init__(name=name)
    if activation not in layers.ACTIVATIONS:
      raise ValueError(f'Unknown activation {activation!r}; expected one of '
                       f'{sorted(layers.ACTIVATIONS)}.')
    self.hidden_size = hidden_size  # None: multiplier * D.
    self.multiplier = multiplier
    self.activation = layers.ACTIVATIONS[activation]
    self.gated = gated
    self.with_bias = with_bias

  def __call__(self, x: jax.Array) -> jax.Array:  # [..., D] -> [..., D]
    def linear(size, name):
      return hk.Linear(size, with_bias=self.with_bias, name=name)
    hidden = self.hidden_size or self.multiplier * x.shape[-1]  # F
    h = linear(hidden, 'hidden')(x)  # [..., F]
    if self.gated:
      gate = linear(hidden, 'gate')(x)  # [..., F]
      h = self.activation(gate) * h  # [..., F]
    else:
      h = self.activation(h)  # [..., F]
    return linear(x.shape[-1], 'output')(h)  # [..., D]
