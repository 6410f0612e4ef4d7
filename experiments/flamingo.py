r"""Flamingo training configs: the paper's sizes, hyperparameters and ablations.

`arg` is a comma-separated list: a size first (3B, 9B, 80B or tiny), then any
ablations from ABLATIONS below, e.g.

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

Each ablation changes only what its name says, on top of the chosen size;
the paper ran them on Flamingo-3B. Each row carries the paper's figures
(`Paper`: parameters, step time, overall score), which
`python -m flamingo_jax.ablate --collect` prints beside ours. Rows of the
paper not here: Table 10 (iv) (the LM pretrained on C4: a choice of
pretrained checkpoint, `init_from`) and (vii) (LAION with CLIP:
`laion_pairs,vision_clip_vit_l14`).

Where the paper contradicts itself, the default is the value that gives
Table 5's parameter counts and a name selects the other: `resampler_kv96`
(App. A.1.4's resampler key/value size 96: 175M, not 194M) and
`xattn_heads_32` (Table 4's 32 xattn heads at 9B: 1.80B, not 1.6B). See
flamingo_jax/models/flamingo.py and resampler.py.
"""

from collections.abc import Callable, Mapping, Sequence
import os
from typing import Any, NamedTuple, Optional

import ml_collections

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


class Paper(NamedTuple):
  """The paper's figures for one row (Flamingo-3B, DEV tasks at 4 shots).

  `overall` is the paper's overall score: the mean over COCO, OK-VQA,
  VQAv2, MSVD-QA and VATEX of the score divided by the fine-tuned state of
  the art of its Table 1 (arXiv v2 §3.3), in %. Rows marked * in the paper
  (the unfrozen vision encoder and co-trained LM) timed their step on
  other hardware.
  """
  params: float  # Total parameters, billions, as printed.
  step_time: float  # Seconds per training step.
  overall: float  # Overall score, %.


# The paper's Flamingo-3B row, against which each row below compares.
PAPER_BASELINE = Paper(3.2, 1.74, 70.7)


class Ablation(NamedTuple):
  """One row of the paper's ablation tables (or one of our named choices).

  Attributes:
    row: the paper's table and row, and the changed value.
    what: what changes (the README's table says the same).
    model: overrides of config.model as {'section.key': value}.
    train: changes the rest of the config: `train(config, substitutes)`,
      where `substitutes` holds the datasets the config file offers in place
      of the mixture's (see `apply_training_ablations`).
    paper: the paper's figures for the row; None for a choice that is not
      a row of the paper.
  """
  row: str
  what: str
  model: Mapping[str, Any] = {}
  train: Optional[Callable[[ml_collections.ConfigDict,
                            Mapping[str, Any]], None]] = None
  paper: Optional[Paper] = None


# ------------------------------------------------- training-side changes --


def _datasets_of_kind(config, kind: str) -> list[str]:
  return [name for name, spec in config.data.datasets.items()
          if spec.kind == kind]


def _remove_datasets(config, names: Sequence[str], why: str) -> None:
  if not names:
    raise ValueError(f'{why}: the config has no such dataset (datasets: '
                     f'{sorted(config.data.datasets)}).')
  for name in names:
    del config.data.datasets[name]
  if not config.data.datasets:
    raise ValueError(f'{why} leaves no dataset to train on.')


def _without(kind: str):
  def train(config, substitutes):
    del substitutes  # Unused.
    _remove_datasets(config, _datasets_of_kind(config, kind),
                     f'Removing the {kind!r} datasets')
  return train


def _substitute_pairs(config, substitutes):
  """The image-text pair datasets replaced by one other source."""
  _remove_datasets(config, _datasets_of_kind(config, 'pairs'),
                   'Replacing the image-text pairs')
  name, spec = substitutes['image_text']
  config.data.datasets[name] = spec


def _round_robin(config, substitutes):
  del substitutes  # Unused.
  config.optim.dataset_updates = 'round_robin'


def _p_next(value: float):
  def train(config, substitutes):
    del substitutes  # Unused.
    names = _datasets_of_kind(config, 'documents')
    if not names:
      raise ValueError('p_next applies to interleaved documents; the config '
                       'has none.')
    for name in names:
      config.data.datasets[name].p_next = value
  return train


def _referenced_stages(config) -> set[str]:
  """Stages some init_from (of the main config or a kept stage) reads."""
  stages = config.get('stages', None) or {}
  referenced, todo = set(), [('', config)]
  while todo:
    base, cfg = todo.pop()
    for source in cfg.get('init_from', None) or []:
      name = os.path.normpath(os.path.join(base, source['workdir']))
      if name in stages and name not in referenced:
        referenced.add(name)
        todo.append((name, stages[name]))
  return referenced


def _drop_init_from(config, top: str) -> None:
  """Leaves `top/...` at its random initialisation (trained from scratch).

  Sources reading only `top/...` are removed, others exclude it; a stage of
  the recipe (`config.stages`) that only fed a removed source is dropped.
  """
  stages_before = _referenced_stages(config)
  kept = []
  for source in config.get('init_from', None) or []:
    source = dict(source)
    if all(p.startswith(f'{top}/') for p in source.get('include', ['.*'])):
      continue
    source['exclude'] = list(source.get('exclude', [])) + [f'{top}/.*']
    kept.append(source)
  config.init_from = kept
  for name in stages_before - _referenced_stages(config):
    del config.stages[name]


def _unfreeze(top: str, pretrained: bool):
  """Trains `top/...` (the LM or the vision encoder) instead of freezing it."""
  def train(config, substitutes):
    del substitutes  # Unused.
    config.freeze = [(f'{top}/.*', optim.TRAIN)] + [
        tuple(rule) for rule in config.freeze]
    if top == 'vision_encoder':
      config.model.stop_vision_gradient = False
    if not pretrained:
      _drop_init_from(config, top)
  return train


# arXiv v1 §4.4.3: the LM co-trained on text learns at a tenth of the rate.
# The <EOC> rows are Flamingo's own new parameters and keep the full rate.
COTRAIN_LM_MULTIPLIERS = (('lm/eoc_(un)?embedding', 1.0), ('lm/.*', 0.1))


def _cotrain_text(config, substitutes):
  """The LM unfrozen (from pretrained), at 0.1x the learning rate, and also
  trained on text alone (the config's 'text' substitute)."""
  _unfreeze('lm', pretrained=True)(config, substitutes)
  name, spec = substitutes['text']
  config.data.datasets[name] = spec
  config.optim.lr_multipliers = tuple(tuple(r) for r in COTRAIN_LM_MULTIPLIERS)


# name -> Ablation. One table for the architecture and the training rows.
# Sources of the figures (`Paper`): the Table 3 rows were read from a
# transcription of arXiv v2's Table 3 (its overall scores are the mean of
# score / Table 1's fine-tuned SotA: COCO 143.3, OK-VQA 54.4, VQAv2 80.2,
# MSVD-QA 47.9, VATEX 76.3, to within 0.2). The Table 10 rows (v1 Table 7
# for the resampler sizes) are not from a copy of the table: they are as we
# recall it, and each row's overall score agrees within 0.1 with the same
# mean over its five task scores as recalled, except (vi) (68.6 for the
# 67.6 given here). Check them against the paper before quoting them.
ABLATIONS = {
    # Table 3 (i): training data.
    'no_video_pairs': Ablation(
        'Table 3 (i) w/o Video-Text pairs',
        'drops the video-text pair datasets (VTP)',
        train=_without('video_pairs'), paper=Paper(3.2, 1.42, 67.3)),
    'no_image_pairs': Ablation(
        'Table 3 (i) w/o Image-Text pairs',
        'drops the image-text pair datasets (ALIGN, LTIP)',
        train=_without('pairs'), paper=Paper(3.2, 0.95, 60.9)),
    'laion_pairs': Ablation(
        'Table 3 (i) Image-Text pairs -> LAION',
        'ALIGN and LTIP replaced by one LAION-400M dataset (lambda 0.4, '
        'batch 1024: their sum; the paper gives neither)',
        train=_substitute_pairs, paper=Paper(3.2, 1.74, 66.4)),
    'no_m3w': Ablation(
        'Table 3 (i) w/o M3W',
        'drops the interleaved documents (M3W)',
        train=_without('documents'), paper=Paper(3.2, 1.02, 53.4)),
    # Table 3 (ii): optimisation.
    'round_robin': Ablation(
        'Table 3 (ii) Accumulation -> Round Robin',
        'one update per dataset in turn instead of one accumulated update',
        train=_round_robin, paper=Paper(3.2, 1.68, 62.9)),
    # Table 3 (iii): no 0-initialised tanh gating.
    'no_tanh_gating': Ablation(
        'Table 3 (iii) tanh gating -> none',
        'residuals added without the 0-initialised tanh gates',
        {'xattn.gating': 'none'}, paper=Paper(3.2, 1.74, 66.5)),
    # Table 3 (iv): cross-attention architecture.
    'vanilla_xattn': Ablation(
        'Table 3 (iv) GATED XATTN-DENSE -> VANILLA XATTN',
        'a plain cross-attention (no dense layer, tanh gate kept) inside '
        'each LM block, between its self-attention and feed-forward layer '
        '(arXiv v1 §4.4.2)',
        {'xattn.xattn_type': 'vanilla_xattn'},
        paper=Paper(2.4, 1.16, 66.9)),
    'grafting': Ablation(
        'Table 3 (iv) GATED XATTN-DENSE -> GRAFTING',
        'frozen LM unchanged; new self+cross-attention+dense layers on top '
        '(3.73B; the paper\'s 3.3B has no stated layout, see xattn.py)',
        {'xattn.xattn_type': 'grafting'}, paper=Paper(3.3, 1.74, 63.1)),
    # Table 3 (v): cross-attention frequency.
    'xattn_single_in_middle': Ablation(
        'Table 3 (v) every -> single in middle',
        'one cross-attention block, in the middle of the LM',
        {'xattn.placement': 'single_in_middle'},
        paper=Paper(2.0, 0.87, 59.8)),
    'xattn_every_4': Ablation(
        'Table 3 (v) every -> every 4th',
        'a cross-attention block before every 4th LM block',
        {'xattn.every': 4}, paper=Paper(2.3, 1.02, 68.8)),
    'xattn_every_2': Ablation(
        'Table 3 (v) every -> every 2nd',
        'a cross-attention block before every 2nd LM block',
        {'xattn.every': 2}, paper=Paper(2.6, 1.24, 68.2)),
    # Table 3 (vi): resampler.
    'resampler_mlp': Ablation(
        'Table 3 (vi) Perceiver -> MLP',
        'an MLP instead of the Perceiver Resampler',
        {'resampler.resampler_type': 'mlp'}, paper=Paper(3.2, 1.85, 66.6)),
    'resampler_transformer': Ablation(
        'Table 3 (vi) Perceiver -> Transformer',
        'a Transformer instead of the Perceiver Resampler',
        {'resampler.resampler_type': 'transformer'},
        paper=Paper(3.2, 1.81, 66.7)),
    # Table 3 (vii): vision encoder.
    'vision_clip_vit_l14': Ablation(
        'Table 3 (vii) NFNet-F6 -> CLIP ViT-L/14',
        'CLIP ViT-L/14 (224 px) vision encoder', {
            'vision': {'encoder': 'vit', 'variant': 'L/14',
                       'image_size': 224},
            'image_size': 224}, paper=Paper(3.1, 1.58, 64.9)),
    'vision_nfnet_f0': Ablation(
        'Table 3 (vii) NFNet-F6 -> NFNet-F0', 'NFNet-F0 vision encoder',
        {'vision.variant': 'F0'}, paper=Paper(2.9, 1.45, 62.7)),
    # Table 3 (viii): freezing the LM.
    'lm_unfrozen': Ablation(
        'Table 3 (viii) LM not frozen, pretrained',
        'the LM is trained too, from its pretrained weights',
        train=_unfreeze('lm', pretrained=True),
        paper=Paper(3.2, 2.42, 62.7)),
    'lm_from_scratch': Ablation(
        'Table 3 (viii) LM not frozen, random init',
        'the LM is trained too, from a random initialisation',
        train=_unfreeze('lm', pretrained=False),
        paper=Paper(3.2, 2.42, 57.8)),
    # Table 10 (i) (v1 Table 7): resampler size; 'medium' is the default.
    'resampler_small': Ablation(
        'Table 10 (i) resampler Medium -> Small',
        'a 2-layer Perceiver Resampler (3.10B in total; the paper gives '
        'only the total, 3.1B)', {'resampler': 'small'},
        paper=Paper(3.1, 1.58, 67.9)),
    'resampler_large': Ablation(
        'Table 10 (i) resampler Medium -> Large',
        'a 12-layer Perceiver Resampler (3.42B in total; the paper gives '
        'only the total, 3.4B)', {'resampler': 'large'},
        paper=Paper(3.4, 1.87, 69.0)),
    # Table 10 (ii): attend to all previous images, not only the last one.
    'all_previous_images': Ablation(
        'Table 10 (ii) only last -> all previous images',
        'text attends to all previous images, not only the last',
        {'xattn.attend': 'all_previous_images'},
        paper=Paper(3.2, 1.74, 63.5)),
    # Table 10 (iii): p_next (App. A.3.2).
    'p_next_0': Ablation(
        'Table 10 (iii) p_next 0.5 -> 0',
        'text always attends to the previous image (by default, per '
        'document, to the next one with p_next 0.5)',
        train=_p_next(0.0), paper=Paper(3.2, 1.74, 69.6)),
    'p_next_1': Ablation(
        'Table 10 (iii) p_next 0.5 -> 1',
        'text always attends to the next image (by default, per document, '
        'with p_next 0.5)',
        train=_p_next(1.0), paper=Paper(3.2, 1.74, 70.4)),
    # Table 10 (v): freezing the vision encoder.
    'vision_unfrozen': Ablation(
        'Table 10 (v) vision not frozen, pretrained',
        'the vision encoder is trained too (gradient through its features), '
        'from its pretrained weights',
        train=_unfreeze('vision_encoder', pretrained=True),
        paper=Paper(3.2, 4.70, 68.1)),
    'vision_from_scratch': Ablation(
        'Table 10 (v) vision not frozen, random init',
        'the vision encoder is trained too, from a random initialisation',
        train=_unfreeze('vision_encoder', pretrained=False),
        paper=Paper(3.2, 4.70, 61.4)),
    # Table 10 (vi): the LM co-trained on its text (arXiv v1 §4.4.3).
    'lm_cotrain_text': Ablation(
        'Table 10 (vi) LM co-trained on MassiveText, pretrained',
        'lm_unfrozen at 0.1x the learning rate on the LM, plus a text-only '
        'dataset of 2048-token sequences (kind text; lambda 1.0 and batch '
        '256 are ours)',
        train=_cotrain_text, paper=Paper(3.2, 5.34, 67.6)),
    # Where the paper contradicts itself: our default is the value that
    # gives Table 5's parameter counts; these are the other value.
    'resampler_kv96': Ablation(
        'Choice: App. A.1.4 resampler key/value size',
        'resampler key/value size 96 (App. A.1.4; 175M parameters) instead '
        'of 128 (194M, Table 5)', {'resampler.head_size': 96}),
    'xattn_heads_32': Ablation(
        'Choice: Table 4 9B xattn heads',
        '32 cross-attention heads (Table 4\'s 9B value; 1.80B of xattn at '
        '9B) instead of 16 (1.57B, Table 5\'s 1.6B)',
        {'xattn.num_heads': 32}),
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


def check_ablations(names: Sequence[str], what: str) -> None:
  unknown = [name for name in names if name not in ABLATIONS]
  if unknown:
    raise ValueError(f'Unknown config arg(s) {unknown}: expected {what} then '
                     f'ablations from {sorted(ABLATIONS)}.')


def apply_model_ablations(model: dict, names: Sequence[str],
                          overrides: Optional[Mapping[str, Mapping]] = None
                          ) -> dict:
  """`model` (a plain dict) with the architecture changes of `names`.

  Args:
    model: a model config, e.g. `flamingo.model_config(size)`.
    names: ablation names.
    overrides: per ablation name, overrides to use instead of the table's
      (e.g. tiny-scale stand-ins).

  Returns:
    `model`, changed in place.
  """
  for name in names:
    changes = (overrides or {}).get(name, ABLATIONS[name].model)
    for key, value in changes.items():
      _apply_override(model, key, value)
  return model


def apply_training_ablations(config: ml_collections.ConfigDict,
                             names: Sequence[str],
                             substitutes: Mapping[str, Any]
                             ) -> ml_collections.ConfigDict:
  """`config` with the data, optimisation and freezing changes of `names`.

  Args:
    config: a full training config (its model already ablated).
    names: ablation names, applied in order.
    substitutes: datasets the config offers, as (name, spec): 'image_text'
      (for laion_pairs) and 'text' (for lm_cotrain_text).

  Returns:
    `config`, changed in place.
  """
  for name in names:
    if ABLATIONS[name].train is not None:
      ABLATIONS[name].train(config, substitutes)
  return config


def parse_arg(arg: str | None, default_size: str = '3B'):
  """'3B,vanilla_xattn' -> ('3B', ['vanilla_xattn'])."""
  parts = [p.strip() for p in (arg or '').split(',') if p.strip()]
  size = default_size
  if parts and parts[0] in flamingo.FLAMINGO_SIZES:
    size, parts = parts[0], parts[1:]
  check_ablations(parts, f'a size from {sorted(flamingo.FLAMINGO_SIZES)}')
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
  size, ablations = parse_arg(arg)
  model = apply_model_ablations(flamingo.model_config(size), ablations)
  # Not the paper's: what each stack recomputes in the backward pass.
  model['lm']['remat_policy'], model['xattn']['remat_policy'] = REMAT[size]
  model['lm'].setdefault('vocab_size', lm.DecoderLM.vocab_size)  # 32k.
  image = model['image_size']

  config = ml_collections.ConfigDict()
  config.size = size
  config.ablations = ','.join(ablations)
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
  return apply_training_ablations(config, ablations, substitutes)
