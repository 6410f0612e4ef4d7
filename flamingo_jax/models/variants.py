"""Flamingo as published checkpoints built it, where they differ from the paper.

`with_variant(model_config, name)` sets the fields below (VARIANTS); the
modules (flamingo.py, xattn.py, resampler.py) read them, and the
importers (flamingo_jax/weights/) name the variant of their source.

  'openflamingo' (Awadalla et al., 2023; its `Flamingo` with
      `cross_attn_every_n_layers` = our xattn `every`):
    - placement: a block before LM block i for each i with (i + 1) % every
      == 0 (the paper's start at the first block);
    - xattn: GELU (exact) feed-forward instead of Squared ReLU, and no
      LayerNorm on the visual tokens (`visual_norm=False`);
    - resampler: GELU feed-forward; OpenFlamingo's released models have no
      `frame_embs` / `media_time_embs`, so an import sets our
      `time_embeddings` to zero (`frame_embs`, when present, are those
      rows; `media_time_embs`, per medium of a sample, are the resampler's
      `media_time_embeddings`, its `max_media` their number);
    - `only_attend_immediate_media=True` is our `attend='last_image'`
      (the `<image>` token itself sees its image in both); False is
      'all_previous_images', except that OpenFlamingo then gives the tokens
      before the first image a uniform average of all media, ours zero.
  'idefics' (Laurençon et al., 2023, OBELICS; transformers'
      `IdeficsForVisionText2Text`, `cross_layer_interval` = our `every`):
    - placement: the paper's ('interleaved': before LM blocks 0, every,
      2 * every, ...);
    - xattn (xattn.py): RMSNorm pre-norms, a SwiGLU dense layer of the
      LM's intermediate size, the LM's heads, no norm on the visual tokens;
      `alpha_type` ('float': one tanh gate, the paper's; 'vector': one per
      feature) and `qk_norm` (`qk_layer_norms`) are read from config.json;
    - resampler: a ReLU feed-forward, optional q/k LayerNorms
      (`qk_layer_norms_perceiver`), no temporal embeddings (imported as
      zeros), the vision width as its own (no input projection);
    - vision: a CLIP ViT (H/14 for the released models) whose last block's
      output, class token included and without `ln_post`, is resampled
      (`tokens='last_block'`, `keep_class_token=True`);
    - LM: LLaMA; its `additional_vocab_size` rows (`DecoupledEmbedding`,
      `DecoupledLinear`, e.g. `<fake_token_around_image>` and `<image>`)
      are the rows after the vocabulary of one embedding table;
    - masking: a token sees the last `<image>` at or before it (ours
      'last_image', the processor's `image_attention_mask`); tokens with no
      image get zero from cross-attention in both.
"""

from collections.abc import Mapping
from typing import Any


# The model config fields each variant sets (module docstring).
VARIANTS = {
    'paper': {},
    'openflamingo': dict(
        resampler=dict(ffw_activation='gelu_exact'),
        xattn=dict(placement='openflamingo', ffw_activation='gelu_exact',
                   visual_norm=False)),
    'idefics': dict(
        resampler=dict(ffw_activation='relu'),
        xattn=dict(placement='interleaved', ffw_activation='swiglu',
                   visual_norm=False, norm='rms_norm')),
}


def with_variant(config: Mapping[str, Any], variant: str) -> dict[str, Any]:
  """The model `config` (a copy) with the fields of VARIANTS[variant]."""
  if variant not in VARIANTS:
    raise ValueError(f'Unknown Flamingo variant {variant!r}; expected one of '
                     f'{sorted(VARIANTS)}.')
  config = config.to_dict() if hasattr(config, 'to_dict') else dict(config)
  for section, fields in VARIANTS[variant].items():
    config[section] = dict(config[section], **fields)
  return config
