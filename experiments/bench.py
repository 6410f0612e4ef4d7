r"""Benchmark configs: fixed shapes for timing the train step, not recipes.

  python -m flamingo_jax.bench train --config experiments/bench.py:matched

'matched' is the configuration at which we time our train step against
OpenFlamingo's own `Flamingo` class on a CPU (issue 17): an LM of 4 layers x
256 wide (4 heads of 64, vocab 2048), 64 tokens and 2 images of 64 px per
row, 8 rows per step, a frozen NFNet-F0, a Perceiver Resampler 1536 wide with
6 layers of 8 heads x 64 and 64 latents, and a GATED XATTN-DENSE block (8
heads x 64) before every LM block: about 145M trainable parameters, 99% of
them in the resampler, whose feed-forward layers take ~85% of the step's
FLOPs at this size. Compute in fp32 (a CPU's fast path), frozen weights
stored in bf16 as in every run; no rematerialisation (memory is plentiful).

The data section holds one dataset of the right shapes (the embedded
world's interleaved documents), so the same config also trains
(`python -m flamingo_jax.train --config experiments/bench.py:matched`); the
benchmark itself feeds random batches of those shapes.

'tiny' is the same layout at the tiny sizes, for tests of the bench.
"""


import ml_collections

from flamingo_jax.data import prepare
from flamingo_jax.models import flamingo
from flamingo_jax.training import optim
from flamingo_jax.training import sharding

VARIANTS = ('matched', 'tiny')


def matched_model() -> dict:
  """The model section of 'matched' (a plain dict)."""
  model = flamingo.model_config('tiny')
  model.update(
      vision=dict(encoder='nfnet', variant='F0'),
      image_size=64,
      resampler=dict(num_layers=6, width=1536, num_heads=8, head_size=64,
                     num_latents=64, max_frames=8, ffw_multiplier=4,
                     resampler_type='perceiver'),
      lm=dict(num_layers=4, width=256, num_heads=4, head_size=64,
              vocab_size=2048, remat_policy='none'),
  )
  model['xattn'].update(every=1, num_heads=8, head_size=64,
                        remat_policy='none')
  return model


def tiny_model() -> dict:
  model = flamingo.model_config('tiny')
  model['lm']['remat_policy'] = 'none'
  model['xattn']['remat_policy'] = 'none'
  return model


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The bench config `arg` (one of VARIANTS; default 'matched')."""
  variant = (arg or 'matched').strip()
  if variant not in VARIANTS:
    raise ValueError(f'Unknown bench config {variant!r}; expected one of '
                     f'{VARIANTS}.')
  model = matched_model() if variant == 'matched' else tiny_model()
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.task = 'flamingo'
  config.model = model
  data_dir = prepare.default_world_dir()
  config.data = dict(
      data_dir=data_dir,
      sizes='default',
      tokenizer=prepare.world_tokenizer_path(data_dir),
      vocab_size=model['lm']['vocab_size'],
      datasets=dict(documents=dict(
          builder='world_documents', split='train', kind='documents',
          weight=1.0, batch_size=8, seq_len=64, max_media=2, frames=1,
          image_size=model['image_size'], p_next=0.0)))
  config.optim = optim.default_optim_config()
  config.optim.warmup_steps = 10
  config.freeze = list(optim.FLAMINGO_FREEZE_RULES)
  config.mesh = list(sharding.DEFAULT_MESH)
  config.auto_mesh = dict(sharding.AUTO_MESH)
  config.param_rules = list(sharding.FLAMINGO_PARAM_RULES)
  config.compute_dtype = 'float32'
  config.total_steps = 100
  config.log_every = 10
  config.checkpoint = dict(every=100, keep=1)
  config.init_from = []
  return config
