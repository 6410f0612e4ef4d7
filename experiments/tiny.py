r"""The tiny CPU recipe: Flamingo end to end on the embedded world, in minutes.

  python -m flamingo_jax.train --config experiments/tiny.py --workdir /tmp/w

Builds the embedded world datasets and trains their tokenizer the first time
(in `config.data.data_dir`). Stage 1 (`config.stages.lm`, in W/lm) trains the
LM alone on the world's text; stage 2 (in W) loads it (`config.init_from`),
freezes it with the (random, for now) vision encoder and trains Flamingo on
the paper's mixture (interleaved documents, image-text pairs, video-text
pairs, weighted 1.0 / 0.2 / 0.03). Each stage leaves checkpoints,
`metrics.jsonl`, TensorBoard events and plots in its workdir.

`get_config('smoke')` is a seconds-long variant for tests.
"""

import os

import ml_collections

from flamingo_jax.models import flamingo
from flamingo_jax.training import optim
from flamingo_jax.training import sharding


def _dataset(builder, kind, weight, batch_size, seq_len, max_media, frames,
             p_next=0.0, split='train'):
  return dict(builder=builder, split=split, kind=kind, weight=weight,
              batch_size=batch_size, seq_len=seq_len, max_media=max_media,
              frames=frames, image_size=64, p_next=p_next)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or 'default'
  if variant not in ('default', 'smoke'):
    raise ValueError(f"Unknown tiny variant {variant!r}: 'default' or "
                     "'smoke'.")
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.model = flamingo.model_config('tiny')

  data_dir = os.path.join(os.path.expanduser('~'), '.cache', 'flamingo_jax',
                          'world')
  config.data = dict(
      data_dir=data_dir,
      sizes='default',  # Of the embedded world's splits: 'default' | 'tiny'.
      tokenizer=os.path.join(data_dir, 'tokenizer.model'),
      vocab_size=config.model.lm.vocab_size,
      datasets=dict(
          documents=_dataset('world_documents', 'documents', 1.0, 4, 256, 5, 1,
                             p_next=0.5),
          pairs=_dataset('world_pairs', 'pairs', 0.2, 16, 32, 1, 1),
          video_pairs=_dataset('world_video_pairs', 'video_pairs', 0.03, 4,
                               32, 1, 4),
      ))

  config.optim = optim.default_optim_config()
  config.optim.learning_rate = 1e-3  # Tiny models take a larger step.
  config.optim.warmup_steps = 50
  config.freeze = list(optim.FLAMINGO_FREEZE_RULES)
  config.mesh = list(sharding.DEFAULT_MESH)
  config.param_rules = list(sharding.FLAMINGO_PARAM_RULES)
  config.compute_dtype = 'float32'  # bf16 buys nothing on a CPU.

  config.total_steps = 800
  config.log_every = 10
  config.checkpoint = dict(every=100, keep=3)

  if variant == 'smoke':
    config.data.sizes = 'tiny'
    config.total_steps = 6
    config.log_every = 2
    config.checkpoint.every = 2
    for spec in config.data.datasets.values():
      spec.batch_size = min(spec.batch_size, 8)

  # Stage 1 (in W/lm): the LM alone, on the world's text. Its weights then
  # initialise Flamingo's frozen LM (stage 2, in W). The vision encoder stays
  # at its random initialisation until contrastive pretraining lands.
  lm_stage = ml_collections.ConfigDict(config.to_dict())
  lm_stage.data.datasets = dict(text=_dataset(
      'world_documents', 'text', 1.0, 16, 128, 1, 1))
  lm_stage.freeze = [('lm/.*', optim.TRAIN), ('.*', optim.FROZEN)]
  lm_stage.total_steps = 6 if variant == 'smoke' else 300
  config.stages = dict(lm=lm_stage)
  config.init_from = [dict(workdir='lm', include=['lm/.*'], exclude=[])]
  return config
