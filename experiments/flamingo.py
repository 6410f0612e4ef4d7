r"""Flamingo models: the paper's sizes and its architectural ablations.

`arg` is a comma-separated list: a size first (3B, 9B, 80B or tiny), then any
ablations from ABLATIONS below, e.g.

  python -m flamingo_jax.summarize --config experiments/flamingo.py:3B
  python -m flamingo_jax.summarize --config \
      experiments/flamingo.py:3B,vanilla_xattn --json

Expected (`summarize --config experiments/flamingo.py:3B`): LM 1.44B, vision
435M, xattn 1.16B, resampler 194M, total 3.22B (paper Table 5: 1.4B / 435M /
1.2B / 194M / 3.2B). `tiny` builds and runs in seconds on a CPU.

Each ablation changes only what its name says, on top of the chosen size; the
paper ran them on Flamingo-3B.
"""

import ml_collections

from flamingo_jax.models import flamingo

# name -> (paper row, overrides of config.model as {'section.key': value}).
ABLATIONS = {
    # Table 3 (iii): no 0-initialised tanh gating.
    'no_tanh_gating': ('Table 3 (iii)', {'xattn.gating': 'none'}),
    # Table 3 (iv): cross-attention architecture.
    'vanilla_xattn': ('Table 3 (iv)', {'xattn.xattn_type': 'vanilla_xattn'}),
    'grafting': ('Table 3 (iv)', {'xattn.xattn_type': 'grafting'}),
    # Table 3 (v): cross-attention frequency.
    'xattn_single_in_middle': ('Table 3 (v)',
                               {'xattn.placement': 'single_in_middle'}),
    'xattn_every_4': ('Table 3 (v)', {'xattn.every': 4}),
    'xattn_every_2': ('Table 3 (v)', {'xattn.every': 2}),
    # Table 3 (vi): resampler.
    'resampler_mlp': ('Table 3 (vi)', {'resampler.resampler_type': 'mlp'}),
    'resampler_transformer': ('Table 3 (vi)',
                              {'resampler.resampler_type': 'transformer'}),
    # Table 3 (vii): vision encoder.
    'vision_clip_vit_l14': ('Table 3 (vii)', {
        'vision': {'encoder': 'vit', 'variant': 'L/14', 'image_size': 224},
        'image_size': 224}),
    'vision_nfnet_f0': ('Table 3 (vii)', {'vision.variant': 'F0'}),
    # Table 10 (ii): attend to all previous images, not only the last one.
    'all_previous_images': ('Table 10 (ii)',
                            {'xattn.attend': 'all_previous_images'}),
    # Resampler size (small / medium; large is the default).
    'resampler_small': ('Resampler size', {'resampler': 'small'}),
    'resampler_medium': ('Resampler size', {'resampler': 'medium'}),
}


def _apply_override(model: dict, key: str, value) -> None:
  if key == 'resampler':  # A size from RESAMPLER_PARAMS.
    from flamingo_jax.models import resampler  # pylint: disable=g-import-not-at-top
    model['resampler'].update(resampler.RESAMPLER_PARAMS[value])
    return
  *sections, leaf = key.split('.')
  target = model
  for section in sections:
    target = target[section]
  if leaf not in target:
    raise KeyError(f'Ablation override {key!r} names no model field.')
  target[leaf] = value


def parse_arg(arg: str | None, default_size: str = '3B'):
  """'3B,vanilla_xattn' -> ('3B', ['vanilla_xattn'])."""
  parts = [p.strip() for p in (arg or '').split(',') if p.strip()]
  size = default_size
  if parts and parts[0] in flamingo.FLAMINGO_SIZES:
    size, parts = parts[0], parts[1:]
  unknown = [p for p in parts if p not in ABLATIONS]
  if unknown:
    raise ValueError(
        f'Unknown config arg(s) {unknown}: expected a size from '
        f'{sorted(flamingo.FLAMINGO_SIZES)} then ablations from '
        f'{sorted(ABLATIONS)}.')
  return size, parts


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  size, ablations = parse_arg(arg)
  model = flamingo.model_config(size)
  for name in ablations:
    for key, value in ABLATIONS[name][1].items():
      _apply_override(model, key, value)
  config = ml_collections.ConfigDict()
  config.size = size
  config.ablations = ','.join(ablations)
  config.model = model
  config.seed = 0
  return config
