"""The mesh chooser: the (data, fsdp, model) mesh on which a step fits.

`choose_mesh(state, slice_)` walks the meshes the batch sizes allow (the
config's model degree first, then the least FSDP) and returns the first
whose `memory.plan` fits the slice's memory; `auto_mesh` does it at startup
for the devices a run has (`config.auto_mesh`). `python -m flamingo_jax.plan`
prints the same choice without allocating anything.
"""

from collections.abc import Sequence
import copy
from typing import Optional

import jax
import ml_collections

from flamingo_jax.training import memory
from flamingo_jax.training import slices


def _divisors(n: int) -> list[int]:
  return [k for k in range(1, n + 1) if n % k == 0]


def model_degrees(config: ml_collections.ConfigDict, devices: int) -> list[int]:
  """Model-parallel sizes to try: the config's first, then the others that
  split every head count evenly, smallest first."""
  model = config.model
  # Grouped-query attention: the key/value heads split too.
  heads = [model.lm.num_heads,
           model.lm.get('num_kv_heads', None) or model.lm.num_heads,
           model.xattn.num_heads]
  configured = dict(config.mesh).get('model', 1)
  options = [m for m in _divisors(devices)
             if all(h % m == 0 for h in heads)]
  return sorted(options, key=lambda m: (m != configured, m))


def candidate_meshes(config: ml_collections.ConfigDict,
                     slice_: slices.Slice) -> list[tuple[int, int, int]]:
  """(data, fsdp, model) meshes the batch sizes allow, in the order the
  chooser prefers them: the config's model degree, then the least fsdp."""
  batches = [spec.batch_size for spec in config.data.datasets.values()]
  microbatches = config.optim.get('microbatches', 1)
  meshes = []
  for model in model_degrees(config, slice_.devices):
    parallel = slice_.devices // model  # data * fsdp.
    if any(b % (parallel * microbatches) for b in batches):
      continue
    for fsdp in _divisors(parallel):
      if (parallel // fsdp) % slice_.slices == 0:  # 'data' spans slices.
        meshes.append((parallel // fsdp, fsdp, model))
  return meshes


def mesh_overrides(config: ml_collections.ConfigDict,
                   mesh: Sequence[int]) -> list[str]:
  """Shell-quoted `--config.mesh[i]` flags that train on `mesh`.

  'data' keeps its -1 (the rest of the devices).
  """
  wanted = dict(zip(memory.AXES, mesh))
  overrides = []
  for index, (name, size) in enumerate(config.mesh):
    if name in wanted and name != 'data' and size != wanted[name]:
      overrides.append(f"'--config.mesh[{index}]=(\"{name}\", "
                       f"{wanted[name]})'")
  return overrides


def choose_mesh(state: memory.StateModel, slice_: slices.Slice,
                usable_fraction: Optional[float] = None
                ) -> tuple[Optional[memory.Plan], list[memory.Plan]]:
  """The first candidate mesh whose plan fits, and every plan tried.

  FSDP (ZeRO-3) costs weight all-gathers every step, so it grows only until
  the step fits; a larger model degree than the config's is tried only when
  no amount of FSDP makes the config's fit. Returns (None, tried) when
  nothing fits (`tried` is empty when the batch sizes divide no mesh).
  """
  if usable_fraction is None:
    usable_fraction = slices.USABLE_FRACTION[slice_.platform]
  tried = []
  for mesh in candidate_meshes(state.config, slice_):
    tried.append(memory.plan(state, mesh, slice_.hbm, usable_fraction,
                             slice_.platform))
    if tried[-1].fits:
      return tried[-1], tried
  return None, tried


# ------------------------------------------------- the mesh, at startup --


def auto_mesh(config: ml_collections.ConfigDict,
              devices: Optional[Sequence[jax.Device]] = None
              ) -> tuple[memory.Plan, list[memory.Plan]]:
  """`choose_mesh` for the devices this run has (`config.auto_mesh`).

  Memory per device is `config.auto_mesh.hbm_gib` (the chip's HBM; the
  platform's USABLE_FRACTION of it is used), else the runtime's
  `bytes_limit` (already net of the runtime's own and, on GPU, of JAX's
  preallocation; 90% of it is used, for fragmentation).

  Raises:
    ValueError: no mesh of these devices fits the step.
  """
  devices = list(devices if devices is not None else jax.devices())
  hbm_gib = config.get('auto_mesh', {}).get('hbm_gib', 0.0) or 0.0
  slice_ = slices.local_slice(devices, hbm_gib)
  usable = slices.USABLE_FRACTION[slice_.platform] if hbm_gib else 0.9
  chosen, tried = choose_mesh(memory.StateModel(config), slice_, usable)
  if chosen is None:
    raise ValueError(
        f'No (data, fsdp, model) mesh of {slice_.name} fits the train step '
        f'in {usable * slice_.hbm / slices.GiB:.2f} GiB per device: '
        + '; '.join(f'{p.mesh} needs {p.total / slices.GiB:.2f} GiB'
                    for p in tried[:8])
        + ('' if tried else ' (no mesh divides the batch sizes)')
        + '. Shrink the batch, add devices or remat more.')
  return chosen, tried


def reasons(chosen: memory.Plan, tried: Sequence[memory.Plan]) -> list[str]:
  """Lines that say why the chooser took `chosen`: each plan tried, in
  order, with its bytes per device against the usable memory."""
  lines = [f'mesh {p.mesh} (data, fsdp, model): {p.total / slices.GiB:.3f} '
           f'GiB per device of {p.usable / slices.GiB:.3f} usable: '
           + ('fits' if p.fits else 'does not fit') for p in tried]
  lines.append(f'chose {chosen.mesh}: the config\'s model degree and the '
               'least FSDP (ZeRO-3 gathers weights every step) that fits.')
  return lines


def with_mesh(config: ml_collections.ConfigDict,
              mesh: Sequence[int]) -> ml_collections.ConfigDict:
  """A copy of `config` that trains on the (data, fsdp, model) `mesh`."""
  config = copy.deepcopy(config)
  with config.unlocked():
    config.mesh = [(axis, int(size))
                   for axis, size in zip(memory.AXES, mesh)]
  return config
