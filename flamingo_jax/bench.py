r"""Benchmarks: generation, the train step and the input pipeline.

  python -m flamingo_jax.bench generate --config experiments/tiny.py
  python -m flamingo_jax.bench train --config experiments/tiny.py
  python -m flamingo_jax.bench data --config experiments/tiny.py
  python -m flamingo_jax.bench generate --config experiments/flamingo.py:3B \
      --batch 8 --prompt_len 256 --new_tokens 32      # on an accelerator

`generate` times cached greedy decoding against full recomputation of the
sequence for every new token (random parameters, random prompts with
`--images` images each) and prints both rates and their ratio. `train` times
the jitted train step on synthetic batches of the config's shapes and prints
steps/s, tokens/s and MFU (model FLOPs from XLA's cost analysis over the
device's peak; n/a where the peak is unknown, e.g. on CPUs). `data` times the
input pipeline per dataset (examples/s), building the embedded world first
if needed. Timings exclude compilation; every figure is a median of
`--repeats` runs.
"""

import statistics
import time
from typing import Any, Callable

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np

from flamingo_jax import cli

COMMANDS = ('generate', 'train', 'data')

_CONFIG = config_flags.DEFINE_config_file(
    'config', 'experiments/tiny.py', 'Config file (its model, data and '
    'optimiser sections are used).', lock_config=True)
_BATCH = flags.DEFINE_integer('batch', 4, 'generate: prompts per batch.')
_PROMPT_LEN = flags.DEFINE_integer('prompt_len', 64,
                                   'generate: prompt tokens.')
_NEW_TOKENS = flags.DEFINE_integer('new_tokens', 32,
                                   'generate: tokens generated per prompt.')
_IMAGES = flags.DEFINE_integer('images', 2, 'generate: images per prompt.')
_STEPS = flags.DEFINE_integer('steps', 10, 'train/data: steps per repeat.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed repeats (median).')


def _median_seconds(fn: Callable[[], Any], repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _random_prompts(model_config, batch: int, length: int, images: int,
                    seed: int = 0):
  """A left-padded-shape prompt batch (no padding) of random tokens."""
  from flamingo_jax.models import media_index  # pylint: disable=g-import-not-at-top
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


def bench_generate(config: ml_collections.ConfigDict) -> dict[str, float]:
  """Cached vs uncached greedy decoding; returns the figures printed."""
  from flamingo_jax.inference import generate  # pylint: disable=g-import-not-at-top
  from flamingo_jax.models import flamingo  # pylint: disable=g-import-not-at-top
  model_config = config.model.to_dict()
  params = jax.jit(flamingo.transform(model_config).init)(
      jax.random.PRNGKey(0), *flamingo.example_inputs(model_config))
  batch = _random_prompts(model_config, _BATCH.value, _PROMPT_LEN.value,
                          _IMAGES.value)
  decoder = generate.Decoder(
      model_config, compute_dtype=jnp.dtype(config.get('compute_dtype',
                                                       'bfloat16')))
  options = generate.Options(max_new_tokens=_NEW_TOKENS.value)
  cached = lambda: decoder.greedy(params, batch, options).tokens
  uncached = lambda: decoder.greedy_uncached(params, batch, options).tokens
  same = bool(np.array_equal(cached(), uncached()))  # Also compiles both.
  new_tokens = _BATCH.value * _NEW_TOKENS.value
  cached_s = _median_seconds(cached, _REPEATS.value)
  uncached_s = _median_seconds(uncached, _REPEATS.value)
  figures = {'cached_tokens_per_s': new_tokens / cached_s,
             'uncached_tokens_per_s': new_tokens / uncached_s,
             'speedup': uncached_s / cached_s, 'same_tokens': float(same)}
  print(f'generate: batch {_BATCH.value}, prompt {_PROMPT_LEN.value} tokens '
        f'+ {_IMAGES.value} images, {_NEW_TOKENS.value} new tokens, '
        f'{jax.devices()[0].device_kind}')
  print(f'  cached greedy:    {figures["cached_tokens_per_s"]:10.1f} tokens/s '
        f'({cached_s:.3f} s)')
  print(f'  uncached greedy:  {figures["uncached_tokens_per_s"]:10.1f} '
        f'tokens/s ({uncached_s:.3f} s)')
  print(f'  speed-up (cached / uncached): {figures["speedup"]:.1f}x; same '
        f'tokens: {same}')
  return figures


def _synthetic_batches(config: ml_collections.ConfigDict):
  """Random batches with the shapes of every dataset of `config.data`."""
  rng = np.random.default_rng(0)
  vocab = config.model.lm.vocab_size
  batches = {}
  for name, spec in config.data.datasets.items():
    b, length, n = spec.batch_size, spec.seq_len, spec.max_media
    size = spec.get('image_size', config.model.image_size)
    batches[name] = dict(
        tokens=rng.integers(5, vocab, size=(b, length)).astype(np.int32),
        targets=rng.integers(5, vocab, size=(b, length)).astype(np.int32),
        loss_mask=np.ones([b, length], np.float32),
        media=rng.integers(0, 255, size=(b, n, spec.frames, size, size, 3),
                           dtype=np.uint8),
        media_mask=np.ones([b, n], bool),
        media_index=np.minimum(np.arange(length) // max(length // n, 1) + 1,
                               n)[None].repeat(b, 0).astype(np.int32))
  return batches


def bench_train(config: ml_collections.ConfigDict) -> dict[str, float]:
  """Steps/s, tokens/s and MFU of the jitted train step."""
  # pylint: disable=g-import-not-at-top
  from flamingo_jax.training import loop
  from flamingo_jax.training import metrics as metrics_lib
  from flamingo_jax.training import sharding
  # pylint: enable=g-import-not-at-top
  mesh = sharding.make_mesh(config.mesh)
  model = loop.task_of(config).transform(config.model)
  optimizer = loop.make_optimizer(config)
  state, shardings = loop.create_train_state(config, mesh, model, optimizer)
  batch_sharding = sharding.batch_sharding(mesh)
  batches = jax.device_put(_synthetic_batches(config), batch_sharding)
  step = jax.jit(loop.make_step_fn(config, model, optimizer),
                 in_shardings=(shardings, batch_sharding),
                 out_shardings=(shardings, None), donate_argnums=0)
  compiled = step.lower(state, batches).compile()
  flops = metrics_lib.compiled_flops(compiled)
  peak = metrics_lib.peak_flops_per_device()
  holder = [state]

  def run():
    for _ in range(_STEPS.value):
      holder[0], out = compiled(holder[0], batches)
    return out

  run()  # Warm-up.
  seconds = _median_seconds(run, _REPEATS.value) / _STEPS.value
  tokens = sum(b['tokens'].size for b in batches.values())
  figures = {'steps_per_s': 1 / seconds, 'tokens_per_s': tokens / seconds}
  mfu = (flops / seconds / (peak * jax.device_count())
         if flops and peak else None)
  print(f'train: {sorted(config.data.datasets)}, {jax.device_count()} x '
        f'{jax.devices()[0].device_kind}')
  print(f'  {figures["steps_per_s"]:.2f} steps/s, '
        f'{figures["tokens_per_s"]:.0f} tokens/s, '
        f'{(flops or 0) / 1e9:.1f} GFLOPs/step, MFU '
        f'{f"{100 * mfu:.1f}%" if mfu is not None else "n/a (unknown peak)"}')
  if mfu is not None:
    figures['mfu'] = mfu
  return figures


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
  command(_CONFIG.value)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
