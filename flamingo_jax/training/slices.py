"""Accelerator slices: how many devices, on how many hosts, with what memory.

  parse_slice('v4-32')       16 v4 chips (32 TensorCores) on 4 hosts
  parse_slice('v5p-128')     64 v5p chips on 16 hosts
  parse_slice('2xv5p-128')   two such slices (multislice, over DCN)
  parse_slice('h100:16')     16 H100s (8 per host)
  parse_slice('h200:2x8')    2 hosts x 8 H200s

Cloud TPU v4 and v5p accelerator types count TensorCores, two per chip, and
JAX sees one device per chip (megacore); v5e (v5litepod-N) and v6e count
chips (cloud.google.com/tpu/docs/v4, /v5p, /v5e, /v6e). HBM per device is
HBM_GIB.
"""

import dataclasses
from typing import Any, Sequence

GiB = 2**30

# HBM per device (GiB). v4 and v5p chips are one JAX device each (megacore).
HBM_GIB = {
    'v4': 32, 'v5e': 16, 'v5p': 95, 'v6e': 32,
    'a100-40gb': 40, 'a100-80gb': 80, 'h100': 80, 'h200': 141,
}
TPU_KINDS = ('v4', 'v5e', 'v5p', 'v6e')
# Usable share of HBM: headroom for the TPU runtime and fragmentation; on
# GPUs, JAX preallocates 75% of the memory (XLA_PYTHON_CLIENT_MEM_FRACTION).
USABLE_FRACTION = {'tpu': 0.9, 'gpu': 0.75, 'cpu': 1.0}
_TPU_GENERATIONS = {  # Accelerator-type prefix: (kind, cores per chip).
    'v4': ('v4', 2), 'v5p': ('v5p', 2), 'v5litepod': ('v5e', 1),
    'v5e': ('v5e', 1), 'v6e': ('v6e', 1)}
_SLICE_FORMS = ("a Cloud TPU accelerator type ('v4-32', 'v5p-128', "
                "'v5litepod-16', 'v6e-64'; '2xv5p-128' for two slices) or "
                "KIND:COUNT / KIND:HOSTSxCOUNT with KIND one of "
                f"{sorted(HBM_GIB)} (e.g. 'h100:16', 'a100-80gb:2x8')")


@dataclasses.dataclass(frozen=True)
class Slice:
  """Accelerators to plan for."""
  name: str  # As given, e.g. 'v4-32'.
  kind: str  # A key of HBM_GIB; or a platform, for `local_slice`.
  devices: int  # JAX devices in all slices.
  hosts: int
  slices: int = 1  # TPU slices joined over the data-centre network.
  memory: int = 0  # Bytes per device, if not HBM_GIB[kind]'s.

  @property
  def platform(self) -> str:
    if self.kind in ('cpu', 'gpu', 'tpu'):  # A `local_slice`'s.
      return self.kind
    return 'tpu' if self.kind in TPU_KINDS else 'gpu'

  @property
  def hbm(self) -> int:
    return self.memory or int(HBM_GIB[self.kind] * GiB)


def parse_slice(text: str) -> Slice:
  """A Slice from e.g. 'v4-32', '2xv5p-128', 'h100:16' or 'h200:2x8'.

  Raises:
    ValueError: naming the accepted forms.
  """
  spec = text.strip().lower()
  error = ValueError(f'Slice {text!r}: expected {_SLICE_FORMS}.')
  if spec.startswith('a100') and spec.split(':')[0] not in HBM_GIB:
    raise ValueError(f'Slice {text!r}: say a100-40gb or a100-80gb.')
  copies = 1
  if ':' not in spec and 'x' in spec.split('-')[0]:  # '2xv5p-128'.
    count, _, spec = spec.partition('x')
    if not count.isdigit():
      raise error
    copies = int(count)
  if ':' in spec:  # KIND:COUNT or KIND:HOSTSxCOUNT.
    kind, _, count = spec.partition(':')
    kind = 'v5e' if kind == 'v5litepod' else kind
    hosts, _, per_host = count.rpartition('x')
    if kind not in HBM_GIB or not per_host.isdigit() or not (
        hosts.isdigit() or not hosts):
      raise error
    devices = int(per_host) * int(hosts or 1)
    default_per_host = 4 if kind in ('v4', 'v5p') else 8
    hosts = int(hosts) if hosts else -(-devices // default_per_host)
  else:  # An accelerator type, GENERATION-COUNT.
    generation, _, count = spec.rpartition('-')
    if generation not in _TPU_GENERATIONS or not count.isdigit():
      raise error
    kind, cores_per_chip = _TPU_GENERATIONS[generation]
    devices = int(count) // cores_per_chip
    hosts = -(-devices // (4 if cores_per_chip == 2 else 8))
  if devices < 1 or copies < 1:
    raise ValueError(f'Slice {text!r} has no device.')
  return Slice(text, kind, devices * copies, hosts * copies, copies)


def local_slice(devices: Sequence[Any], memory_gib: float = 0.0) -> Slice:
  """The devices a run sees, as a Slice to plan for.

  Memory per device: `memory_gib` if given, else what the runtime reports
  (`memory_stats()['bytes_limit']`: TPU and GPU; the CPU reports none).
  """
  first = devices[0]
  kind = first.platform if first.platform in ('tpu', 'gpu') else 'cpu'
  memory = int(memory_gib * GiB)
  if not memory:
    stats = first.memory_stats() if hasattr(first, 'memory_stats') else None
    memory = int((stats or {}).get('bytes_limit', 0))
  if not memory:
    raise ValueError(
        f'{first.device_kind} ({first.platform}) reports no memory size: '
        'give it as config.auto_mesh.hbm_gib.')
  hosts = len({d.process_index for d in devices})
  count = len({getattr(d, 'slice_index', 0) for d in devices})
  return Slice(f'{len(devices)} x {first.device_kind}', kind, len(devices),
               hosts, count, memory)
