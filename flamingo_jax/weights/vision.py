"""What the vision importers share: the encoder's abstract parameters and
the model configs they describe.

A vision importer's `config_from` returns the `config.model.vision` dict of
the encoder the checkpoint holds (`models.flamingo.vision_encoder` builds it
under the fixed name `vision_encoder`), and its `to_params` fills exactly
that encoder's parameters.
"""

import argparse
from collections.abc import Mapping
from typing import Any, Optional

import haiku as hk
import jax
import jax.numpy as jnp

from flamingo_jax.models import flamingo
from flamingo_jax.models import nfnet
from flamingo_jax.models import vit

ROOT = 'vision_encoder'  # The encoder's module name: every path starts so.


def abstract_params(vision: Mapping[str, Any]
                    ) -> dict[str, dict[str, jax.ShapeDtypeStruct]]:
  """The parameter shapes of the encoder `vision` describes (none computed)."""
  vision = dict(vision)
  size = vision.get('image_size', 224) if vision['encoder'] == 'vit' else 64

  def forward(images):
    return flamingo.vision_encoder(vision)(images, is_training=False)

  images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  return jax.eval_shape(hk.transform(forward).init, jax.random.key(0), images)


def vit_config(*, patch_size: int, width: int, depth: int, num_heads: int,
               mlp_dim: int, embed_dim: Optional[int], image_size: int,
               activation: str, tokens: str = 'ln_post',
               keep_class_token: bool = False) -> dict[str, Any]:
  """The `vision` config of a ViT: a VIT_PARAMS variant when the sizes are
  one, else `variant='custom'` with every size spelt out."""
  found = dict(patch_size=patch_size, width=width, depth=depth,
               num_heads=num_heads, mlp_dim=mlp_dim)
  config: dict[str, Any] = dict(encoder='vit', image_size=image_size,
                                activation=activation, tokens=tokens,
                                keep_class_token=keep_class_token,
                                projection=embed_dim is not None)
  for name, params in vit.VIT_PARAMS.items():
    if all(params[k] == v for k, v in found.items()) and (
        embed_dim is None or params['embed_dim'] == embed_dim):
      return dict(config, variant=name)
  return dict(config, variant=vit.CUSTOM, **found,
              embed_dim=embed_dim or width)


def nfnet_variant(*, depths: tuple[int, ...], widths: tuple[int, ...],
                  stem_widths: tuple[int, ...], group_width: int,
                  source: str) -> str:
  """The NFNET_PARAMS entry with this structure, or a ValueError."""
  found = dict(depths=tuple(depths), widths=tuple(widths),
               stem_widths=tuple(stem_widths), group_width=group_width)
  for name, params in nfnet.NFNET_PARAMS.items():
    if all(tuple(params[k]) == v if isinstance(v, tuple) else params[k] == v
           for k, v in found.items()):
      return name
  raise ValueError(
      f'{source} holds an NFNet with {found}, which is none of '
      f'nfnet.NFNET_PARAMS ({sorted(nfnet.NFNET_PARAMS)}).')


def add_vit_token_arguments(parser: argparse.ArgumentParser) -> tuple[str, ...]:
  """The ViT options of the convert CLI; returns their names."""
  parser.add_argument(
      '--tokens', default='ln_post', choices=vit.TOKENS,
      help="the activations the encoder hands on as tokens (models/vit.py): "
           "'last_block' is what OpenFlamingo was trained with (open_clip "
           "< 2.23) and what Hugging Face calls last_hidden_state.")
  parser.add_argument('--keep_class_token', action='store_true',
                      help='keep the class token first among the tokens '
                           '(IDEFICS resamples all of them).')
  return ('tokens', 'keep_class_token')
