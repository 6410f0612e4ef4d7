r"""Flamingo training configs: the paper's sizes, hyperparameters and ablations.

`arg` is a comma-separated list: a size first (3B, 9B, 80B or tiny), then any
ablations from experiments/ablations.py, e.g.

  python -m flamingo_jax.summarize --config experiments/flamingo.py:3B
  python -m flamingo_jax.train --config experiments/flamingo.py:3B \
      --workdir gs://BUCKET/runs/3b \
      --config.data.data_dir=gs://BUCKET/tfds \
      --config.data.tokenizer=gs://BUCKET/lm/tokenizer.model \
      '--config.init_from[0].workdir=/ckpt/lm_1.4b' \
      '--config.init_from[1].workdir=/ckpt/nfnet_f6'
  python -m flamingo_jax.train --config \
      experiments/flamingo.py:3B,round_robin,no_video_pairs --workdir ...

Expected (`summarize --config experiments/flamingo.py:3B`): LM 1.44B, vision
435M, xattn 1.16B, resampler 194M, total 3.22B (paper Table 5: 1.4B / 435M /
1.2B / 194M / 3.2B). `tiny` builds in seconds (shapes only: to train on a
CPU use experiments/tiny.py, which takes the same ablation names).

The data are the user's. Prepare each dataset once with
`python -m flamingo_jax.data.formats` (e.g. `--format interleaved_jsonl
--source 'gs://B/m3w/*.jsonl' --data_dir gs://B/tfds --name m3w`; video with
`--option num_frames=8 --option fps=1`) and point `builder` at it
('<format>/<name>'; the names below are placeholders) and `data_dir` (per
dataset, or `config.data.data_dir` for all) at the TFDS directory. Likewise
`init_from` names placeholder checkpoints of the pretrained LM and vision
encoder, and `data.tokenizer` the LM's SentencePiece model.

The paper's values (App. B.1.2 unless noted), each a config field:
  data.datasets: M3W, ALIGN, LTIP, VTP with lambda 1.0 / 0.2 / 0.2 / 0.03;
    batch sizes 256 / 512 / 512 / 64 (the small-scale setting of the
    ablations); M3W: a random window of 256 tokens of each page per step,
    up to the first 5 images in it, p_next = 0.5 (§2.4, A.3);
    pairs: 32 tokens; VTP: 8 frames at 1 FPS; images 320 x 320.
  optim: AdamW (b1 0.9, b2 0.999), lr warmed up linearly 0 -> 1e-4 over
    5,000 steps then constant, global-norm clipping 1.0, weight decay 0.1
    except on the Perceiver Resampler; gradients of all datasets accumulated
    into one update (`optim.dataset_updates`).
  total_steps 500k; trainable params and optimizer state fp32, compute
    bf16, frozen params bf16; ZeRO-1 optimizer-state sharding
    (`zero_axis`); 80B: 16-way Megatron model parallelism (`mesh`).
Not from the paper (our choices, say so if you report them): the 3B and 9B
model-parallel degrees, rematerialisation per stack (REMAT below:
`model.lm.remat_policy`, `model.xattn.remat_policy`), checkpoint interval,
and what the ablation table marks as ours.

The mesh here is (data, fsdp 1, model MODEL_PARALLEL[size]); which one fits a
given slice is for the planner to say, e.g.

  python -m flamingo_jax.plan --config experiments/flamingo.py:3B \
      --slice v4-32 --batch_scale 0.125

prints the mesh it chooses -- the least FSDP (ZeRO-3, the 'fsdp' axis:
weights, gradients and moments split over it) that fits -- and the
`--config.mesh[i]=...` overrides that train with it; or train with
`--config.auto_mesh.enabled=True` and the run makes that choice at startup
for the devices it has.

The ablations (ABLATIONS, the paper's Table 3 and Table 10 rows and our
named choices) are experiments/ablations.py's.
"""

from typing import Any

import ml_collections

from experiments import ablations
from flamingo_jax.models import flamingo
from flamingo_jax.models import lm
from flamingo_jax.training import optim
from flamingo_jax.training import sharding

# Placeholders: point these at your own data and checkpoints.
DATA_DIR = 'gs://YOUR_BUCKET/tfds'
TOKENIZER = 'gs://YOUR_BUCKET/lm/tokenizer.model'
PRETRAINED_LM = '/path/to/pretrained/lm'
PRETRAINED_VISION = '/path/to/pretrained/{encoder}_{variant}'

TOTAL_STEPS = 500_000
# Model-parallel degree per size: 16 for 80B is the paper's; 3B and 9B ours.
MODEL_PARALLEL = {'3B': 1, '9B': 4, '80B': 16, 'tiny': 1}

# Rematerialisation per size, (LM stack, xattn stack); stacking.py defines
# the policies. Ours, from the 3B LM + xattn forward and backward pass (xattn
# trainable, 4 x 256 tokens, 5 images, fp32 on a CPU: temporaries
# besides the 4.3 GiB of xattn gradients, and XLA's FLOPs per layer over
# 'none'):
#   (lm, xattn)      none    full,full  dots,full  full,dots  dots,dots
#   activations GiB  13.8    1.6        2.9        3.5        4.7
#   extra FLOPs      0       +23%       +14%       +10%       +1%
# The frozen LM needs no weight gradients, so 'dots' keeps few residuals
# there; the xattn's 'dots' also keeps the images' keys/values. 3B, the size
# that runs on one accelerator, takes dots,dots; 9B and 80B, model-parallel
# and short of memory, dots,full. Where memory is shorter still, full,full;
# where it is plentiful, none,none (`--config.model.lm.remat_policy=...`).
REMAT = {'3B': ('dots', 'dots'), '9B': ('dots', 'full'),
         '80B': ('dots', 'full'), 'tiny': ('none', 'none')}


def parse_arg(arg: str | None, default_size: str = '3B'):
  """'3B,vanilla_xattn' -> ('3B', ['vanilla_xattn'])."""
  parts = [p.strip() for p in (arg or '').split(',') if p.strip()]
  size = default_size
  if parts and parts[0] in flamingo.FLAMINGO_SIZES:
    size, parts = parts[0], parts[1:]
  ablations.check(parts, f'a size from {sorted(flamingo.FLAMINGO_SIZES)}')
  return size, parts


def _dataset(builder: str, kind: str, weight: float, batch_size: int,
             seq_len: int, max_media: int, frames: int, image_size: int,
             p_next: float = 0.0, **extra) -> dict[str, Any]:
  return dict(
      builder=builder,  # '<format>/<name>' (flamingo_jax.data.formats).
      data_dir='',  # Its TFDS directory; '' = config.data.data_dir.
      split='train',
      kind=kind,  # documents | pairs | video_pairs | text
      weight=weight,  # lambda_m of the objective.
      batch_size=batch_size,  # Global.
      seq_len=seq_len,  # Text tokens per example.
      max_media=max_media,  # Media slots per example.
      frames=frames,  # Frames per medium (1 for images).
      image_size=image_size,  # Pixels (square).
      p_next=p_next,  # P(text before an image attends to it), documents.
      **extra)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The training config of `arg` = 'SIZE[,ABLATION...]'."""
  size, names = parse_arg(arg)
  model = ablations.apply_to_model(flamingo.model_config(size), names)
  # Not the paper's: what each stack recomputes in the backward pass.
  model['lm']['remat_policy'], model['xattn']['remat_policy'] = REMAT[size]
  model['lm'].setdefault('vocab_size', lm.DecoderLM.vocab_size)  # 32k.
  image = model['image_size']

  config = ml_collections.ConfigDict()
  config.size = size
  config.ablations = ','.join(names)
  config.task = 'flamingo'
  config.model = model
  config.seed = 0

  config.data = dict(
      data_dir=DATA_DIR,
      sizes='default',  # Only for the embedded world's builders.
      tokenizer=TOKENIZER,
      vocab_size=model['lm']['vocab_size'],
      datasets=dict(
          # A random 256-token window of each page per step (App. A.3).
          m3w=_dataset('interleaved_jsonl/m3w', 'documents', 1.0, 256, 256,
                       5, 1, image, p_next=0.5, random_window=True),
          align=_dataset('webdataset_pairs/align', 'pairs', 0.2, 512, 32, 1,
                         1, image),
          ltip=_dataset('webdataset_pairs/ltip', 'pairs', 0.2, 512, 32, 1, 1,
                        image),
          # fps: the rate the frames were sampled at when the dataset was
          # prepared (`--option fps=1 --option max_frames=64`: every frame
          # at 1 FPS); random_clip: 8 consecutive stored frames (8 s at
          # 1 FPS) from a random start, drawn anew at every step.
          vtp=_dataset('video_pairs/vtp', 'video_pairs', 0.03, 64, 32, 1, 8,
                       image, fps=1.0, random_clip=True),
      ))
  substitutes = dict(
      image_text=('laion', _dataset('webdataset_pairs/laion400m', 'pairs',
                                    0.4, 1024, 32, 1, 1, image)),
      # 2048-token sequences, as the paper's co-training (v1 §4.4.3).
      text=('massivetext', _dataset('interleaved_jsonl/massivetext', 'text',
                                    1.0, 256, 2048, 1, 1, image)),
  )

  config.optim = optim.default_optim_config()  # The paper's values.
  config.freeze = list(optim.FLAMINGO_FREEZE_RULES)
  config.init_from = [
      dict(workdir=PRETRAINED_LM, include=['lm/.*'], exclude=['lm/eoc_.*']),
      dict(workdir=PRETRAINED_VISION.format(
          encoder=model['vision']['encoder'],
          variant=model['vision']['variant'].lower().replace('/', '')),
           include=['vision_encoder/.*'], exclude=[]),
  ]
  # 'fsdp' > 1 is ZeRO-3; `python -m flamingo_jax.plan` says how much.
  config.mesh = [(axis, MODEL_PARALLEL[size] if axis == 'model' else n)
                 for axis, n in sharding.DEFAULT_MESH]
  # Or --config.auto_mesh.enabled=True: the planner's mesh, at startup.
  config.auto_mesh = dict(sharding.AUTO_MESH)
  config.param_rules = list(sharding.FLAMINGO_PARAM_RULES)
  config.zero_axis = 'data'  # ZeRO-1: Adam moments also split over 'data'.
  config.compute_dtype = 'bfloat16'

  config.total_steps = TOTAL_STEPS
  config.log_every = 100
  config.checkpoint = dict(every=2000, keep=3)
  # Non-finite steps are skipped; this many in a row stop the run.
  config.max_nonfinite_steps = 5
  # Tests: NaN loss masks in the batches of this step (1-based; 0 = off).
  config.debug = dict(poison_step=0)
  return ablations.apply_to_training(config, names, substitutes)
