r"""Plans a run's memory: python -m flamingo_jax.plan --config ... --slice ...

  python -m flamingo_jax.plan --config experiments/flamingo.py:3B \
      --slice v4-32 --batch_scale 0.125
  python -m flamingo_jax.plan --config experiments/flamingo.py:80B \
      --slice v4-2048 --mesh 64,1,16
  python -m flamingo_jax.plan --config experiments/tiny.py --slice h100:8

Chooses the (data, fsdp, model) mesh for the slice -- the config's model
degree, and the least FSDP (ZeRO-3) that makes the step fit -- and prints the
bytes per device of the parameters (trainable fp32, frozen bf16), optimizer
state, gradients, weight copies and activations (with the config's remat
policy), whether that fits the chip, and the overrides that train with it.
Nothing is allocated or compiled: the state comes from `jax.eval_shape`, the
temporaries from the config (flamingo_jax/training/memory.py says how).
`--mesh` plans one mesh instead of choosing. Config overrides work as for
training (`--config.data.datasets.m3w.batch_size=64`). Training makes the
same choice by itself with `--config.auto_mesh.enabled=True`
(`loop.resolve_mesh`, for the devices it runs on).
"""

import json
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from flamingo_jax import cli
from flamingo_jax.training import memory
from flamingo_jax.training import mesh_choice
from flamingo_jax.training import slices

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Training config file, e.g. experiments/flamingo.py:3B.',
    lock_config=True)
_SLICE = flags.DEFINE_string(
    'slice', None, 'Accelerators: a Cloud TPU type (v4-32, v5p-128, '
    'v5litepod-16, v6e-64; 2xv5p-128 for two slices) or KIND:COUNT / '
    'KIND:HOSTSxCOUNT for GPUs (h100:16, a100-80gb:2x8, h200:8).')
_MESH = flags.DEFINE_string(
    'mesh', None, 'DATA,FSDP,MODEL: plan this mesh instead of choosing one.')
_BATCH_SCALE = flags.DEFINE_float(
    'batch_scale', 1.0, 'Multiply every dataset\'s batch size by this '
    '(e.g. 0.125 for 1/8 of the paper\'s batch).')
_USABLE = flags.DEFINE_float(
    'usable_fraction', None, 'Share of each device\'s memory the step may '
    'use (default: 0.9 on TPU; 0.75 on GPU, JAX\'s preallocation).')
_JSON = flags.DEFINE_bool('json', False, 'Print the plan as JSON.')
flags.mark_flags_as_required(['config', 'slice'])


def _gib(num_bytes: float) -> str:
  return f'{num_bytes / slices.GiB:6.2f}'


def scale_batches(config, scale: float) -> None:
  """Multiplies every dataset's batch size by `scale` (in place)."""
  for name, spec in config.data.datasets.items():
    size = spec.batch_size * scale
    if size < 1 or size != int(size):
      raise app.UsageError(
          f'--batch_scale={scale} makes config.data.datasets.{name}.'
          f'batch_size {spec.batch_size} -> {size}, not a positive integer.')
    spec.batch_size = int(size)


def describe(plan: memory.Plan) -> list[str]:
  """The table of one plan, as lines."""
  lines = [f'{"":34s} GiB per device']
  lines += [f'  {label:32s} {_gib(size)}' for label, size in plan.rows()]
  verdict = 'fits' if plan.fits else 'does NOT fit'
  lines.append(f'  {"total":32s} {_gib(plan.total)}   {verdict} in '
               f'{_gib(plan.usable).strip()} usable of '
               f'{_gib(plan.hbm).strip()} GiB')
  return lines


def report(config, slice_: slices.Slice, chosen, tried) -> str:
  """The printed plan: the meshes tried, then the chosen one in detail."""
  kind = slice_.kind.upper() if slice_.platform == 'gpu' else (
      f'TPU {slice_.kind}')
  lines = [f'{slice_.name}: {slice_.devices} devices ({kind}, '
           f'{slices.HBM_GIB[slice_.kind]} GiB each) on {slice_.hosts} hosts'
           + (f', {slice_.slices} slices' if slice_.slices > 1 else '')]
  if not tried:
    lines.append(
        'No (data, fsdp, model) mesh of these devices divides every '
        'dataset\'s batch size ' + str({n: s.batch_size for n, s in
                                       config.data.datasets.items()})
        + ': change --batch_scale, the batch sizes or the slice.')
    return '\n'.join(lines)
  lines.append('Meshes tried (data, fsdp, model): state + temporaries = '
               'total GiB per device')
  for plan in tried:
    lines.append(f'  {str(plan.mesh):14s} {_gib(plan.state)} + '
                 f'{_gib(plan.temporaries)} = {_gib(plan.total)}  '
                 f'{"fits" if plan.fits else "too big"}')
  best = chosen or min(tried, key=lambda p: p.total)
  lines.append('')
  lines.append(('Chosen' if chosen else 'Nothing fits; the smallest')
               + f': mesh (data, fsdp, model) = {best.mesh}; per-device '
               'batch ' + ', '.join(f'{n} {b}' for n, b in
                                     best.per_device_batch.items()))
  lines += describe(best)
  overrides = mesh_choice.mesh_overrides(config, best.mesh)
  if chosen and overrides:
    lines.append('Train with: ' + ' '.join(overrides))
  if not chosen:
    lines.append('To fit: a larger slice, --config.optim.microbatches, '
                 '--config.model.lm.remat_policy=full and '
                 '--config.model.xattn.remat_policy=full, or smaller '
                 'batches.')
  return '\n'.join(lines)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  try:
    slice_ = slices.parse_slice(_SLICE.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  config = _CONFIG.value
  if _BATCH_SCALE.value != 1.0:
    scale_batches(config, _BATCH_SCALE.value)
  state = memory.StateModel(config)
  usable = _USABLE.value or slices.USABLE_FRACTION[slice_.platform]
  if _MESH.value:
    try:
      mesh = tuple(int(x) for x in _MESH.value.split(','))
    except ValueError as e:
      raise app.UsageError(f'--mesh={_MESH.value}: expected '
                           'DATA,FSDP,MODEL, e.g. 8,2,1.') from e
    if len(mesh) != 3 or mesh[0] * mesh[1] * mesh[2] != slice_.devices:
      raise app.UsageError(f'--mesh={_MESH.value} must be three sizes whose '
                           f'product is the {slice_.devices} devices of '
                           f'{slice_.name}.')
    try:
      tried = [memory.plan(state, mesh, slice_.hbm, usable, slice_.platform)]
    except ValueError as e:
      raise app.UsageError(str(e)) from e
    chosen = tried[0] if tried[0].fits else None
  else:
    chosen, tried = mesh_choice.choose_mesh(state, slice_, usable)
  if _JSON.value:
    best = chosen or (min(tried, key=lambda p: p.total) if tried else None)
    out = {'slice': slice_.name, 'devices': slice_.devices,
           'fits': chosen is not None}
    if best is not None:
      out.update(mesh=best.mesh, per_device_batch=best.per_device_batch,
                 total=best.total, usable=best.usable,
                 bytes=dict(best.rows()),
                 tried={str(p.mesh): p.total for p in tried})
    json.dump(out, sys.stdout, indent=1)
    print()
  else:
    print(report(config, slice_, chosen, tried))


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
