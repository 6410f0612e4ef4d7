r"""Benchmark: the cross-attention's per-image form against the dense one.

  python -m flamingo_jax.bench_xattn
  python -m flamingo_jax.bench_xattn --images 1,5,10 --seq 256 --width 1024

For 1, 5 and 10 images per sequence (`<image>` markers evenly spaced, phi
from `media_index.compute_media_index`), times the forward and backward
pass of one GATED XATTN-DENSE block (gates open) and of its attention alone
(queries, keys and values given), in the dense form (every token scores all
N * R visual tokens, a mask keeps its image's) and in the per-image form
(`xattn.route_by_image`: tokens packed by image, each group scoring its
image's R tokens), and prints the ratio dense / per-image. With one image
the two forms score the same pairs; the model then uses the dense form
(`xattn.attention_plan`). Medians of `--repeats` runs, compilation
excluded; random weights and inputs. `--clock cpu` times this process's CPU
seconds instead of wall seconds (steadier on a shared machine).
"""

import statistics
import time
from typing import Any, Callable, Sequence

from absl import app
from absl import flags
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from flamingo_jax.data import media_index as media_index_lib
from flamingo_jax.models import layers
from flamingo_jax.models import xattn

_IMAGES = flags.DEFINE_list('images', ['1', '5', '10'],
                            'Images per sequence, one row each.')
_BATCH = flags.DEFINE_integer('batch', 4, 'Sequences per batch.')
_SEQ = flags.DEFINE_integer('seq', 256, 'Text tokens per sequence (L).')
_WIDTH = flags.DEFINE_integer('width', 512, 'LM and visual width (D).')
_HEADS = flags.DEFINE_integer('heads', 8, 'Cross-attention heads (H).')
_HEAD_SIZE = flags.DEFINE_integer('head_size', 64, 'Key size (K).')
_TOKENS = flags.DEFINE_integer('visual_tokens', 64,
                               'Visual tokens per image (R).')
_GROUP = flags.DEFINE_integer('group_size', xattn.GROUP_SIZE,
                              'Slots per group of the per-image form (C).')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed repeats (median).')
_CLOCK = flags.DEFINE_enum(
    'clock', 'wall', ['wall', 'cpu'], "What to time: 'wall' seconds, or "
    "'cpu' seconds of this process (steadier on a shared machine).")

CLOCKS = {'wall': time.perf_counter, 'cpu': time.process_time}


def _median_seconds(fn: Callable[[], Any], repeats: int,
                    clock: str = 'wall') -> float:
  jax.block_until_ready(fn())  # Compiles.
  now = CLOCKS[clock]
  times = []
  for _ in range(repeats):
    start = now()
    jax.block_until_ready(fn())
    times.append(now() - start)
  return statistics.median(times)


def _phi(batch: int, length: int, images: int) -> np.ndarray:  # [B, L]
  is_marker = np.zeros([length], bool)
  is_marker[np.linspace(0, length - 1, images, endpoint=False).astype(int)] = (
      True)
  return np.broadcast_to(media_index_lib.compute_media_index(
      is_marker, images), (batch, length))


def bench_one(images: int, *, batch: int, length: int, width: int,
              heads: int, head_size: int, visual_tokens: int,
              group_size: int, repeats: int,
              clock: str = 'wall') -> dict[str, float]:
  """Seconds per forward + backward pass of both forms, their ratios, and
  the largest difference between the two forms' block outputs."""
  keys = jax.random.split(jax.random.PRNGKey(images), 3)
  y = jax.random.normal(keys[0], [batch, length, width])  # [B, L, D]
  visual = jax.random.normal(
      keys[1], [batch, images * visual_tokens, width])  # [B, M, D]
  positions = jnp.broadcast_to(jnp.arange(length), (batch, length))  # [B, L]
  phi = jnp.asarray(_phi(batch, length, images))  # [B, L]
  media_mask = jnp.ones([batch, images], bool)  # [B, N]
  forms = {
      'dense': xattn.cross_attention_mask(phi, media_mask, visual_tokens),
      'per_image': xattn.route_by_image(phi, media_mask, group_size),
  }

  def block(y, visual, routing):
    return xattn.GatedXAttnDense(heads, head_size, gating='none',
                                 name='block')(y, visual, routing, positions)

  model = hk.without_apply_rng(hk.transform(block))
  params = model.init(keys[2], y, visual, forms['dense'])

  def block_loss(params, y, visual, routing):
    return jnp.sum(model.apply(params, y, visual, routing) ** 2)

  q = jax.random.normal(keys[0], [batch, length, heads, head_size])  # [B, L, H, K]
  kv = jax.random.normal(
      keys[1], [batch, images * visual_tokens, heads, head_size])  # [B, M, H, K]

  def attention_loss(q, k, v, routing):
    if isinstance(routing, xattn.ImageRouting):
      out = xattn.attend_per_image(q, k, v, routing)  # [B, L, H, K]
    else:
      out = layers.dot_product_attention(q, k, v, routing[:, None])  # [B, L, H, K]
    return jnp.sum(out ** 2)

  apply = jax.jit(model.apply)
  outputs = [apply(params, y, visual, routing)
             for routing in forms.values()]  # [B, L, D] each
  block_grad = jax.jit(jax.grad(block_loss, argnums=(0, 1, 2)))
  attention_grad = jax.jit(jax.grad(attention_loss, argnums=(0, 1, 2)))
  # Both forms compute the same function (tests/models/test_xattn.py).
  figures = {'max_difference': float(jnp.abs(outputs[0] - outputs[1]).max())}
  for name, routing in forms.items():
    figures[f'block_{name}_s'] = _median_seconds(
        lambda r=routing: block_grad(params, y, visual, r), repeats, clock)
    figures[f'attention_{name}_s'] = _median_seconds(
        lambda r=routing: attention_grad(q, kv, kv, r), repeats, clock)
  for part in ('block', 'attention'):
    figures[f'{part}_ratio'] = (figures[f'{part}_dense_s']
                                / figures[f'{part}_per_image_s'])
  return figures


def bench_xattn(images: Sequence[int] = (1, 5, 10),
                **shapes: Any) -> dict[int, dict[str, float]]:
  """Prints and returns `bench_one`'s figures for each number of images."""
  print(f'xattn: batch {shapes["batch"]} x {shapes["length"]} tokens, width '
        f'{shapes["width"]}, {shapes["heads"]} heads x {shapes["head_size"]}, '
        f'R={shapes["visual_tokens"]}, C={shapes["group_size"]}; forward + '
        f'backward, median of {shapes["repeats"]} ('
        f'{shapes.get("clock", "wall")} time), {jax.devices()[0].device_kind}')
  print(f'  {"images":>6}  {"block dense":>11}  {"per image":>9}  '
        f'{"ratio":>5}  {"attn dense":>10}  {"per image":>9}  {"ratio":>5}')
  results = {}
  for n in images:
    f = bench_one(n, **shapes)
    results[n] = f
    print(f'  {n:6d}  {1e3 * f["block_dense_s"]:9.1f}ms  '
          f'{1e3 * f["block_per_image_s"]:7.1f}ms  {f["block_ratio"]:5.2f}  '
          f'{1e3 * f["attention_dense_s"]:8.1f}ms  '
          f'{1e3 * f["attention_per_image_s"]:7.1f}ms  '
          f'{f["attention_ratio"]:5.2f}')
  return results


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  bench_xattn(
      [int(n) for n in _IMAGES.value], batch=_BATCH.value, length=_SEQ.value,
      width=_WIDTH.value, heads=_HEADS.value, head_size=_HEAD_SIZE.value,
      visual_tokens=_TOKENS.value, group_size=_GROUP.value,
      repeats=_REPEATS.value, clock=_CLOCK.value)


if __name__ == '__main__':
  app.run(main)
