"""Training metrics: TensorBoard, a JSONL mirror, and a console line with ETA.

Only process 0 writes (clu's writer logs elsewhere); scalars come in at log
steps only, after one `jax.device_get`, so the step loop never waits on them.
clu is imported when a `MetricLogger` is made: `clu.metric_writers` imports
TensorFlow, which the benchmark (`flamingo_jax.bench`) must not need.

MFU = model FLOPs per step (`flamingo_jax.training.flops`, the global batch)
x steps/s / (`peak_flops_per_device()` x device count).

A resumed run first drops the JSONL rows past the step it resumed from (a
killed run logged them after its last checkpoint; they come again), so the
file never repeats a step; a torn last line goes with them. `read_metrics`
reads the file back (for the plots, the report and tests).
"""

from collections.abc import Mapping
import json
import time
from typing import Any, Optional

from absl import logging
import jax
import numpy as np

from flamingo_jax import cli
from flamingo_jax import fs


# Dense bf16 peak FLOP/s per chip, for MFU, by `device_kind` prefix (the
# longest matching prefix wins). CPUs have no meaningful peak.
PEAK_FLOPS = {
    'TPU v4': 275e12,
    'TPU v5 lite': 197e12,  # v5e's device_kind.
    'TPU v5e': 197e12,
    'TPU v5': 459e12,  # v5p's device_kind.
    'TPU v5p': 459e12,
    'TPU v6 lite': 918e12,  # v6e (Trillium).
    'TPU v6e': 918e12,
    'NVIDIA H100': 989e12,  # SXM.
    'NVIDIA H100 PCIe': 756e12,
    'NVIDIA H200': 989e12,
    'NVIDIA GH200': 989e12,
    'NVIDIA A100': 312e12,
}


def peak_flops_per_device(
    device: Optional[jax.Device] = None) -> Optional[float]:
  """Dense bf16 peak FLOP/s of `device` (default: the first), or None."""
  kind = (device or jax.devices()[0]).device_kind
  # Longest matching prefix: 'TPU v5 lite' before 'TPU v5'.
  for name in sorted(PEAK_FLOPS, key=len, reverse=True):
    if kind.startswith(name):
      return PEAK_FLOPS[name]
  return None


def mfu(flops_per_step: Optional[float], steps_per_second: float,
        peak_per_device: Optional[float],
        num_devices: int) -> Optional[float]:
  """Model FLOPs utilisation, or None without a FLOP count or a peak.

  Args:
    flops_per_step: model FLOPs of one step over the GLOBAL batch (not per
      device), e.g. `flops.train_step_flops(config)`.
    steps_per_second: the measured rate.
    peak_per_device: `peak_flops_per_device()`.
    num_devices: devices the step runs on (`jax.device_count()`).
  """
  if not flops_per_step or not peak_per_device:
    return None
  return flops_per_step * steps_per_second / (peak_per_device * num_devices)


def compiled_flops(compiled) -> Optional[float]:
  """FLOPs of one call of a compiled function, from XLA's cost analysis.

  For reference only, not for MFU: it is per device for a sharded program,
  counts a scanned layer's body once whatever its iterations, and counts
  rematerialised and elementwise work.
  """
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except  # Not all backends have it.
    return None
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  flops = (analysis or {}).get('flops')
  return float(flops) if flops else None


def drop_rows_after(path: str, step: int) -> None:
  """Rewrites the JSONL file `path` without its rows past `step` and its
  unreadable lines (each dropped line counted in the log)."""
  if not fs.exists(path):
    return
  lines = fs.read_text(path).splitlines()
  kept, damaged = [], 0
  for line in lines:
    try:
      row = json.loads(line)
      row_step = row['step']
    except (json.JSONDecodeError, KeyError, TypeError):
      damaged += int(bool(line.strip()))
      continue
    if row_step <= step:
      kept.append(line)
  if len(kept) == len(lines):
    return
  logging.info('%s: dropped %d rows logged after step %d (they are logged '
               'again) and %d damaged lines.', path,
               len(lines) - len(kept) - damaged, step, damaged)
  fs.write_text(path, ''.join(line + '\n' for line in kept))


def read_metrics(workdir: str) -> list[dict[str, float]]:
  """The rows of `<workdir>/metrics.jsonl`, in order.

  A damaged line (e.g. torn by a kill mid-write) is skipped with a warning
  that names it, rather than failing every later reader.
  """
  path = fs.join(workdir, 'metrics.jsonl')
  if not fs.exists(path):
    raise FileNotFoundError(f'No metrics in {workdir!r}: {path} is missing.')
  rows, damaged = [], []
  with fs.open_file(path) as f:
    for number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        row = None
      if isinstance(row, dict) and isinstance(row.get('step'), int):
        rows.append(row)
      else:
        damaged.append(number)
  if damaged:
    logging.warning('%s: skipped %d damaged line(s): %s.', path, len(damaged),
                    ', '.join(map(str, damaged[:10])))
  return rows


class _ObjectLines:
  """metrics.jsonl on an object store, which cannot append: the lines are
  kept here and the whole object is uploaded (one atomic write, so never a
  torn line) at most every UPLOAD_SECONDS, at each checkpoint and at the
  end."""

  UPLOAD_SECONDS = 30.0

  def __init__(self, path: str):
    self.path = path
    text = fs.read_text(path) if fs.exists(path) else ''
    self._lines = [line + '\n' for line in text.splitlines()]
    self._uploaded, self._pending = time.monotonic(), False

  def write(self, text: str) -> None:
    self._lines.append(text)
    self._pending = True

  def flush(self) -> None:
    if time.monotonic() - self._uploaded >= self.UPLOAD_SECONDS:
      self.upload()

  def upload(self) -> None:
    if self._pending:
      fs.write_text(self.path, ''.join(self._lines))
      self._uploaded, self._pending = time.monotonic(), False

  def close(self) -> None:
    self.upload()


class MetricLogger:
  """Writes scalars to TensorBoard and `metrics.jsonl`, prints progress."""

  def __init__(self, workdir: str, total_steps: int, first_step: int = 0):
    from clu import metric_writers  # pylint: disable=g-import-not-at-top
    self.is_main = jax.process_index() == 0
    self.total_steps = total_steps
    # TensorFlow writes the events itself (gs:// included).
    self._writer = metric_writers.create_default_writer(
        fs.join(workdir, 'tensorboard'), just_logging=not self.is_main)
    path = fs.join(workdir, 'metrics.jsonl')
    self._jsonl = None
    if self.is_main:
      drop_rows_after(path, first_step)
      self._jsonl = _ObjectLines(path) if fs.is_url(path) else open(path, 'a')
    self._last_step, self._last_time = first_step, time.time()

  def timing(self, step: int) -> dict[str, float]:
    """steps/s since the last call (excluding compilation of the first)."""
    now = time.time()
    elapsed = max(now - self._last_time, 1e-9)
    rate = (step - self._last_step) / elapsed
    self._last_step, self._last_time = step, now
    return {'steps_per_sec': rate}

  def write(self, step: int, scalars: Mapping[str, Any]) -> None:
    scalars = {k: float(np.asarray(v)) for k, v in scalars.items()}
    self._writer.write_scalars(step, scalars)
    if self._jsonl is not None:
      self._jsonl.write(json.dumps({'step': step, **scalars}) + '\n')
      self._jsonl.flush()
    self._print(step, scalars)

  def _print(self, step: int, scalars: Mapping[str, float]) -> None:
    if 'steps_per_sec' not in scalars:  # Not a training row: a probe's.
      logging.info('step %d/%d: %s', step, self.total_steps, ', '.join(
          f'{k} {v:.4g}' for k, v in sorted(scalars.items())))
      return
    rate = scalars.get('steps_per_sec', 0.0)
    eta = (self.total_steps - step) / rate if rate > 0 else float('nan')
    fraction = 100.0 * step / max(self.total_steps, 1)
    eta_text = cli.format_duration(eta) if np.isfinite(eta) else '?'
    logging.info('step %d/%d (%.0f%%) loss %.4f | %.2f steps/s | ETA %s',
                 step, self.total_steps, fraction, scalars.get('loss', np.nan),
                 rate, eta_text)

  def flush(self) -> None:
    """Makes every row written so far durable (e.g. at a checkpoint)."""
    if isinstance(self._jsonl, _ObjectLines):
      self._jsonl.upload()
    elif self._jsonl is not None:
      self._jsonl.flush()

  def write_text(self, step: int, texts: Mapping[str, str]) -> None:
    self._writer.write_texts(step, dict(texts))

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    self._writer.write_hparams(dict(hparams))

  def close(self) -> None:
    self._writer.flush()
    self._writer.close()
    if self._jsonl is not None:
      self._jsonl.close()
