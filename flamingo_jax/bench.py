r"""Benchmarks: the train step, generation and the input pipeline.

  python -m flamingo_jax.bench train --config experiments/tiny.py
  python -m flamingo_jax.bench train --config experiments/flamingo.py:3B \
      --datasets m3w --batch 8 --seq 256 --images 5 --json /tmp/3b.json \
      --config.model.lm.remat_policy=dots           # one H200 holds this
  python -m flamingo_jax.bench generate --config experiments/flamingo.py:3B \
      --batch 8 --prompt_len 256 --images 5 --new_tokens 64 --json /tmp/g.json
  python -m flamingo_jax.bench data --config experiments/tiny.py

`train` times the jitted train step (the training loop's own: sharded state,
donation, the config's precision and remat) on random batches of the shapes
of `config.data.datasets`: the median over `--steps` steps after `--warmup`,
each step timed to completion; compilation is timed apart. It reports
tokens/s, the model FLOPs of a step (`flamingo_jax.training.flops`: counted
from the config, respecting freezing, not counting rematerialisation), the
achieved TFLOP/s, MFU against the device's dense bf16 peak
(`training/metrics.py`; n/a on CPUs unless `--peak_tflops` is given) and
peak device memory. `--datasets`, `--batch`, `--seq`, `--images` and
`--image_size` shrink the mixture to what one device holds; config fields
stay overridable (`--config.compute_dtype=bfloat16`,
`--config.model.lm.remat_policy=dots`). The config's mesh is used if it fits
the devices, else `--mesh` (e.g. `data:-1,model:2`), else all devices on
'data'. `--compile_only` stops after compiling on abstract inputs (no
memory is allocated for the state): a check that a big config lowers and
compiles, with XLA's memory estimate.

`generate` times cached greedy decoding against recomputing the whole
sequence for every new token (random parameters, random prompts with
`--images` images each), and reports both rates and their ratio.
`data` times the input pipeline per dataset (examples/s), building the
embedded world first if needed.

`--json PATH` writes every figure of `train` or `generate`, with the device,
the jax version, the config argument and its overrides, as one JSON object.
`train` and `generate` import neither TensorFlow nor TFDS (only `data`
does, when it runs).
"""

import json
import platform
import statistics
import sys
import time
from typing import Any, Callable, Optional

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import jaxlib
import ml_collections
from ml_collections import config_flags
import numpy as np

from flamingo_jax import bench_inputs
from flamingo_jax import cli
from flamingo_jax import fs
from flamingo_jax.data import media_index
from flamingo_jax.inference import generate
from flamingo_jax.models import flamingo
from flamingo_jax.training import flops as flops_lib
from flamingo_jax.training import loop
from flamingo_jax.training import memory as memory_lib
from flamingo_jax.training import metrics as metrics_lib
from flamingo_jax.training import optim
from flamingo_jax.training import sharding

COMMANDS = ('generate', 'train', 'data')

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file, default experiments/tiny.py (its model, '
    'data and optimiser sections are used).', lock_config=True)
_DATASETS = flags.DEFINE_list(
    'datasets', None, 'train: the datasets of config.data.datasets to use '
    '(default all), e.g. m3w.')
_BATCH = flags.DEFINE_integer(
    'batch', None, 'train: batch size of every dataset (default: the '
    "config's); generate: prompts per batch (default 4).")
_SEQ = flags.DEFINE_integer('seq', None, 'train: text tokens per example '
                            "of every dataset (default: the config's).")
_IMAGES = flags.DEFINE_integer(
    'images', None, 'train: media slots per example of every dataset '
    "(default: the config's); generate: images per prompt (default 2).")
_IMAGE_SIZE = flags.DEFINE_integer(
    'image_size', None, "Image side in pixels (default: the config's).")
_MESH = flags.DEFINE_string(
    'mesh', None, "train: mesh axes, e.g. 'data:-1,fsdp:1,model:2' (default: "
    "the config's if it fits the devices, else all devices on 'data').")
_PROMPT_LEN = flags.DEFINE_integer('prompt_len', 64,
                                   'generate: prompt tokens.')
_NEW_TOKENS = flags.DEFINE_integer('new_tokens', 64,
                                   'generate: tokens generated per prompt.')
_WARMUP = flags.DEFINE_integer('warmup', 2, 'train: untimed steps after '
                               'compilation.')
_STEPS = flags.DEFINE_integer('steps', 20, 'train: timed steps (median); '
                              'data: steps per repeat.')
_REPEATS = flags.DEFINE_integer('repeats', 3,
                                'generate/data: timed repeats (median).')
_PEAK_TFLOPS = flags.DEFINE_float(
    'peak_tflops', None, "Peak TFLOP/s per device for MFU (default: the "
    "device's dense bf16 peak; none on CPUs).")
_COMPILE_ONLY = flags.DEFINE_bool(
    'compile_only', False, 'train: lower and compile on abstract inputs, '
    'then stop (no state is allocated).')
_JSON = flags.DEFINE_string('json', None, 'Write the figures to this JSON '
                            'file.')

DEFAULT_GENERATE_BATCH = 4
DEFAULT_GENERATE_IMAGES = 2


def _median_seconds(fn: Callable[[], Any], repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _environment() -> dict[str, Any]:
  """The device, software and command line a figure was taken with."""
  flag = flags.FLAGS['config']
  try:
    overrides = {k: _jsonable(v) for k, v in
                 config_flags.get_override_values(flag).items()}
  except Exception:  # pylint: disable=broad-except  # Best effort.
    overrides = {}
  device = jax.devices()[0]
  return dict(
      config=config_flags.get_config_filename(flag),
      overrides=overrides,
      argv=sys.argv[1:],
      device_kind=device.device_kind,
      platform=device.platform,
      device_count=jax.device_count(),
      process_count=jax.process_count(),
      jax_version=jax.__version__,
      jaxlib_version=getattr(jaxlib, '__version__', None),
      python_version=platform.python_version(),
      hostname=platform.node())


def _jsonable(value: Any) -> Any:
  try:
    json.dumps(value)
    return value
  except TypeError:
    return str(value)


def _peak_memory() -> dict[str, Optional[int]]:
  """Peak and limit of device memory in bytes, where the backend tells."""
  peaks, limits = [], []
  for device in jax.local_devices():
    try:
      stats = device.memory_stats() or {}
    except Exception:  # pylint: disable=broad-except  # CPUs may not say.
      stats = {}
    if 'peak_bytes_in_use' in stats:
      peaks.append(int(stats['peak_bytes_in_use']))
    if 'bytes_limit' in stats:
      limits.append(int(stats['bytes_limit']))
  return dict(peak_bytes_in_use=max(peaks) if peaks else None,
              bytes_limit=min(limits) if limits else None)


def _compiled_memory(compiled) -> dict[str, int]:
  """XLA's memory estimate of a compiled program (per device)."""
  try:
    analysis = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except  # Not all backends.
    return {}
  fields = ('argument_size_in_bytes', 'output_size_in_bytes',
            'alias_size_in_bytes', 'temp_size_in_bytes',
            'generated_code_size_in_bytes')
  return {f: int(getattr(analysis, f)) for f in fields
          if getattr(analysis, f, None) is not None}


def _write_json(figures: dict[str, Any]) -> None:
  if not _JSON.value:
    return
  fs.makedirs(fs.dirname(fs.absolute(_JSON.value)))
  with fs.open_file(_JSON.value, 'w') as f:
    json.dump(figures, f, indent=2, sort_keys=True, default=_jsonable)
  print(f'  wrote {_JSON.value}')


def _gib(num_bytes: Optional[float]) -> str:
  return 'n/a' if num_bytes is None else f'{num_bytes / 2**30:.2f} GiB'


# ------------------------------------------------------------ generate --


def _random_prompts(model_config, batch: int, length: int, images: int,
                    seed: int = 0):
  """A left-padded-shape prompt batch (no padding) of random tokens."""
  rng = np.random.default_rng(seed)
  vocab = model_config['lm']['vocab_size']
  tokens = rng.integers(5, vocab, size=(batch, length)).astype(np.int32)
  tokens[:, 0] = 2
  marks = np.linspace(1, length - 2, images).astype(int) if images else []
  tokens[:, marks] = 4
  size = model_config['image_size']
  return dict(
      tokens=tokens,
      valid=np.ones([batch, length], bool),
      media_index=media_index.compute_media_index(tokens == 4, images),
      media=rng.integers(0, 255, size=(batch, max(images, 1), 1, size, size,
                                       3), dtype=np.uint8),
      media_mask=np.full([batch, max(images, 1)], images > 0))


def bench_generate(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Cached vs uncached greedy decoding; returns the figures printed."""
  model_config = config.model.to_dict()
  if _IMAGE_SIZE.value:
    model_config['image_size'] = _IMAGE_SIZE.value
  batch_size = _BATCH.value or DEFAULT_GENERATE_BATCH
  images = (_IMAGES.value if _IMAGES.value is not None
            else DEFAULT_GENERATE_IMAGES)
  params = jax.jit(flamingo.transform(model_config).init)(
      jax.random.PRNGKey(0), *flamingo.example_inputs(model_config))
  batch = _random_prompts(model_config, batch_size, _PROMPT_LEN.value,
                          images)
  compute_dtype = config.get('compute_dtype', 'bfloat16')
  decoder = generate.Decoder(model_config,
                             compute_dtype=jnp.dtype(compute_dtype))
  options = generate.Options(max_new_tokens=_NEW_TOKENS.value)
  cached = lambda: decoder.greedy(params, batch, options).tokens
  uncached = lambda: decoder.greedy_uncached(params, batch, options).tokens
  first_cached = _median_seconds(cached, 1)  # Includes compilation.
  first_uncached = _median_seconds(uncached, 1)
  same = bool(np.array_equal(cached(), uncached()))
  new_tokens = batch_size * _NEW_TOKENS.value
  cached_s = _median_seconds(cached, _REPEATS.value)
  uncached_s = _median_seconds(uncached, _REPEATS.value)
  figures = dict(
      command='generate', **_environment(), batch=batch_size,
      prompt_len=_PROMPT_LEN.value, images=images,
      image_size=model_config['image_size'], new_tokens=_NEW_TOKENS.value,
      compute_dtype=compute_dtype, repeats=_REPEATS.value,
      cached_s=cached_s, uncached_s=uncached_s,
      cached_first_call_s=first_cached, uncached_first_call_s=first_uncached,
      cached_tokens_per_s=new_tokens / cached_s,
      uncached_tokens_per_s=new_tokens / uncached_s,
      speedup=uncached_s / cached_s, same_tokens=same, **_peak_memory())
  print(f'generate: batch {batch_size}, prompt {_PROMPT_LEN.value} tokens '
        f'+ {images} images, {_NEW_TOKENS.value} new tokens, '
        f'{jax.devices()[0].device_kind}')
  print(f'  cached greedy:    {figures["cached_tokens_per_s"]:10.1f} tokens/s '
        f'({cached_s:.3f} s; first call {first_cached:.1f} s)')
  print(f'  uncached greedy:  {figures["uncached_tokens_per_s"]:10.1f} '
        f'tokens/s ({uncached_s:.3f} s; first call {first_uncached:.1f} s)')
  print(f'  speed-up (cached / uncached): {figures["speedup"]:.1f}x; same '
        f'tokens: {same}')
  _write_json(figures)
  return figures


# --------------------------------------------------------------- train --


def _flops_table(counts) -> dict[str, dict[str, dict[str, float]]]:
  return {name: {part: dict(forward=f.forward / 1e12,
                            input_grads=f.input_grads / 1e12,
                            weight_grads=f.weight_grads / 1e12)
                 for part, f in parts.items()}
          for name, parts in counts.items()}


def _compile_train_step(config, mesh):
  """(compiled step, its inputs or None with --compile_only, figures)."""
  model = loop.task_of(config).transform(config.model)
  optimizer = loop.make_optimizer(config)
  batch_sharding = sharding.batch_sharding(mesh)
  host_batches = bench_inputs.synthetic_batches(config)
  if _COMPILE_ONLY.value:
    state = loop.abstract_train_state(config, model, optimizer)
    shardings = loop.state_shardings(state, config, mesh)
    batches = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                       sharding=batch_sharding), host_batches)
  else:
    state, shardings = loop.create_train_state(config, mesh, model, optimizer)
    batches = jax.device_put(host_batches, batch_sharding)
  step = jax.jit(loop.make_step_fn(config, model, optimizer),
                 in_shardings=(shardings, batch_sharding),
                 out_shardings=(shardings, None), donate_argnums=0)
  start = time.perf_counter()
  lowered = step.lower(state, batches)
  lower_s = time.perf_counter() - start
  start = time.perf_counter()
  compiled = lowered.compile()
  figures = dict(lower_s=lower_s, compile_s=time.perf_counter() - start)
  return compiled, state, batches, figures


def _time_steps(compiled, state, batches) -> tuple[list[float], float]:
  """Per-step seconds of `--steps` steps after `--warmup`; the last loss."""
  out = None
  for _ in range(_WARMUP.value):
    state, out = compiled(state, batches)
  jax.block_until_ready((state, out))
  times = []
  for _ in range(_STEPS.value):
    start = time.perf_counter()
    state, out = compiled(state, batches)
    jax.block_until_ready((state, out))
    times.append(time.perf_counter() - start)
  loss = float(jax.device_get(out['loss'])) if out is not None else None
  return times, loss


def bench_train(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Step time, tokens/s, FLOPs, MFU and memory of the jitted train step."""
  config = bench_inputs.shaped_config(config, _DATASETS.value, _BATCH.value, _SEQ.value,
                         _IMAGES.value, _IMAGE_SIZE.value)
  axes, mesh_source = bench_inputs.choose_mesh(config, _MESH.value, jax.device_count())
  mesh = sharding.make_mesh(axes)
  bench_inputs.check_batches(config, mesh)
  with jax.set_mesh(mesh):
    compiled, state, batches, figures = _compile_train_step(config, mesh)
    params = optim.merge(state.trainable, state.frozen)
    counts = flops_lib.step_flops(config, params)
    flops = flops_lib.total(counts).total if counts is not None else None
    times, loss = ([], None) if _COMPILE_ONLY.value else _time_steps(
        compiled, state, batches)
  step_s = statistics.median(times) if times else None
  tokens = sum(s.batch_size * s.seq_len
               for s in config.data.datasets.values())
  examples = sum(s.batch_size for s in config.data.datasets.values())
  peak = (_PEAK_TFLOPS.value * 1e12 if _PEAK_TFLOPS.value
          else metrics_lib.peak_flops_per_device())
  devices = jax.device_count()
  rate = 1 / step_s if step_s else None
  figures.update(
      command='train', **_environment(),
      mesh=dict(mesh.shape), mesh_source=mesh_source,
      datasets={name: {k: spec.get(k) for k in (
          'batch_size', 'seq_len', 'max_media', 'frames', 'image_size')}
                for name, spec in config.data.datasets.items()},
      compute_dtype=config.get('compute_dtype', None),
      # Each stack's own (memory.remat_policies: xattn defaults to the LM's).
      remat_policy=memory_lib.remat_policies(config)[0],
      xattn_remat_policy=memory_lib.remat_policies(config)[1],
      compile_only=_COMPILE_ONLY.value, warmup_steps=_WARMUP.value,
      timed_steps=len(times), step_times_s=times, step_s=step_s,
      step_s_min=min(times) if times else None,
      step_s_max=max(times) if times else None,
      steps_per_s=rate, tokens_per_step=tokens, examples_per_step=examples,
      tokens_per_s=tokens * rate if rate else None,
      examples_per_s=examples * rate if rate else None,
      model_tflop_per_step=flops / 1e12 if flops else None,
      model_tflop_by_component=_flops_table(counts) if counts else None,
      achieved_tflop_per_s=flops * rate / 1e12 if flops and rate else None,
      achieved_tflop_per_s_per_device=(flops * rate / 1e12 / devices
                                       if flops and rate else None),
      peak_tflop_per_s_per_device=peak / 1e12 if peak else None,
      peak_source=('--peak_tflops' if _PEAK_TFLOPS.value
                   else 'device table' if peak else None),
      mfu=metrics_lib.mfu(flops, rate, peak, devices) if rate else None,
      xla_tflop_per_step_per_device=(
          (metrics_lib.compiled_flops(compiled) or 0) / 1e12),
      compiled_memory=_compiled_memory(compiled), loss=loss,
      **_peak_memory())
  _print_train(figures)
  _write_json(figures)
  return figures


def _print_train(f: dict[str, Any]) -> None:
  shapes = ', '.join(
      f'{name} {s["batch_size"]}x{s["seq_len"]} +{s["max_media"]}x'
      f'{s["frames"]} media {s["image_size"]}px'
      for name, s in f['datasets'].items())
  print(f'train: {shapes}; {f["device_count"]} x {f["device_kind"]}, mesh '
        f'{f["mesh"]}; {f["compute_dtype"]}, remat lm {f["remat_policy"]} '
        f'xattn {f["xattn_remat_policy"]}')
  print(f'  lower {f["lower_s"]:.1f} s, compile {f["compile_s"]:.1f} s')
  if f['model_tflop_per_step'] is not None:
    print(f'  model FLOPs: {f["model_tflop_per_step"]:.4g} TFLOP/step '
          '(analytic, freezing-aware, remat not counted)')
  memory = f['compiled_memory']
  if memory:
    print(f'  XLA memory estimate per device: arguments '
          f'{_gib(memory.get("argument_size_in_bytes"))}, temporaries '
          f'{_gib(memory.get("temp_size_in_bytes"))}')
  if f['step_s'] is None:
    return
  mfu = f['mfu']
  print(f'  step {1e3 * f["step_s"]:.1f} ms median of {f["timed_steps"]} '
        f'(min {1e3 * f["step_s_min"]:.1f}, max {1e3 * f["step_s_max"]:.1f})'
        f', {f["steps_per_s"]:.2f} steps/s, {f["tokens_per_s"]:.0f} '
        'tokens/s')
  if f['achieved_tflop_per_s'] is not None:
    print(f'  achieved {1e3 * f["achieved_tflop_per_s"]:.1f} GFLOP/s, MFU '
          f'{f"{100 * mfu:.1f}%" if mfu is not None else "n/a (unknown peak)"}'
          f'; peak memory {_gib(f["peak_bytes_in_use"])}; loss '
          f'{f["loss"]:.3f}')


# ---------------------------------------------------------------- data --


def bench_data(config: ml_collections.ConfigDict) -> dict[str, float]:
  """Examples/s of the input pipeline, per dataset."""
  # pylint: disable=g-import-not-at-top
  from flamingo_jax.data import pipeline
  from flamingo_jax.data import prepare
  # pylint: enable=g-import-not-at-top
  prepare.ensure_data(config)
  figures = {}
  print(f'data: {_STEPS.value} steps per repeat')
  for name in sorted(config.data.datasets):
    single = ml_collections.ConfigDict(config.to_dict())
    single.data.datasets = {name: config.data.datasets[name].to_dict()}
    data = pipeline.make_train_data(single, 0)
    try:
      next(data)  # Warm-up: opens the source, starts the threads.
      seconds = _median_seconds(
          lambda: [next(data) for _ in range(_STEPS.value)], _REPEATS.value)
    finally:
      data.close()
    rate = config.data.datasets[name].batch_size * _STEPS.value / seconds
    figures[name] = rate
    print(f'  {name:14s} {rate:10.1f} examples/s')
  return figures


def main(argv: list[str]) -> None:
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise app.UsageError(f'Usage: python -m flamingo_jax.bench '
                         f'{{{"|".join(COMMANDS)}}} [--config ...]')
  command = {'generate': bench_generate, 'train': bench_train,
             'data': bench_data}[argv[1]]
  try:
    command(_CONFIG.value)
  except bench_inputs.BenchFlagError as e:
    sys.exit(f'bench {argv[1]}: {e}')


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags_with_default_config(
      'experiments/tiny.py'))
