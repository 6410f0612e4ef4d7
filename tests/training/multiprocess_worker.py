r"""One process of a multi-process training run on localhost (for the tests).

  python -m tests.training.multiprocess_worker --num_processes 2 \
      --process_id I --coordinator 127.0.0.1:PORT --workdir W

Set JAX_PLATFORMS=cpu and JAX_NUM_CPU_DEVICES (this process's devices) in the
environment. With --num_processes > 1 the process joins a `jax.distributed`
cluster whose CPU collectives run over gloo; with 1 it runs alone (the
single-process reference). It trains `config()` with
`loop.train_and_evaluate` on `ShareData` (this process's rows of every global
batch) and writes the final trainable parameters, gathered from all
processes, to `W/params_<I>.npz`.

`config` and `global_batches` are shared with `test_sharded_training.py`.
"""

import argparse
from collections.abc import Sequence
import os

import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from experiments import tiny

GLOBAL_BATCH = 8
TOTAL_STEPS = 4
CHECKPOINT_EVERY = 2


def config() -> ml_collections.ConfigDict:
  """The tiny smoke config, on one dataset, data-parallel over all devices."""
  cfg = tiny.get_config('smoke')
  cfg.stages, cfg.init_from = {}, []  # The loop alone, no LM stage.
  cfg.data.datasets = {'pairs': cfg.data.datasets.pairs}  # One compile.
  cfg.data.datasets.pairs.batch_size = GLOBAL_BATCH
  cfg.total_steps = TOTAL_STEPS
  cfg.log_every = 1
  cfg.checkpoint.every = CHECKPOINT_EVERY
  cfg.optim.warmup_steps = 0
  cfg.mesh = [('data', -1), ('fsdp', 1), ('model', 1)]
  return cfg


def global_batches(cfg: ml_collections.ConfigDict,
                   step: int) -> dict[str, dict[str, np.ndarray]]:
  """All rows of step `step`'s batches: a pure function of the step."""
  batches = {}
  for index, (name, spec) in enumerate(sorted(cfg.data.datasets.items())):
    rng = np.random.default_rng([step, index])
    b, l, n = spec.batch_size, spec.seq_len, spec.max_media
    tokens = rng.integers(0, cfg.data.vocab_size, [b, l]).astype(np.int32)
    batches[name] = dict(
        tokens=tokens,
        targets=np.roll(tokens, -1, axis=1),
        loss_mask=(rng.random([b, l]) < 0.8).astype(np.float32),
        media=rng.integers(0, 256, [b, n, spec.frames, spec.image_size,
                                    spec.image_size, 3]).astype(np.uint8),
        media_mask=np.ones([b, n], bool),
        media_index=rng.integers(0, n + 1, [b, l]).astype(np.int32))
  return batches


class ShareData:
  """This process's rows [p * B/P, (p+1) * B/P) of every global batch."""

  def __init__(self, cfg: ml_collections.ConfigDict, start_step: int):
    self.config, self.next_step = cfg, start_step

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, dict[str, np.ndarray]]:
    processes, index = jax.process_count(), jax.process_index()
    local = {}
    for name, batch in global_batches(self.config, self.next_step).items():
      rows = self.config.data.datasets[name].batch_size // processes
      local[name] = {key: value[index * rows:(index + 1) * rows]
                     for key, value in batch.items()}
    self.next_step += 1
    return local


def _parse(argv: Sequence[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--coordinator', default=None,
                      help='host:port of process 0 (a loopback address); '
                      'needed when --num_processes > 1.')
  parser.add_argument('--num_processes', type=int, required=True)
  parser.add_argument('--process_id', type=int, required=True)
  parser.add_argument('--workdir', required=True)
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
  args = _parse(argv)
  distributed = args.num_processes > 1
  if distributed:
    # Cross-process collectives on CPU (gloo is also jax 0.10's default).
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(coordinator_address=args.coordinator,
                               num_processes=args.num_processes,
                               process_id=args.process_id,
                               initialization_timeout=120)
  # pylint: disable=g-import-not-at-top
  from flamingo_jax.training import loop
  # pylint: enable=g-import-not-at-top
  state = loop.train_and_evaluate(config(), args.workdir, make_data=ShareData)
  params = multihost_utils.process_allgather(state.trainable, tiled=True)
  flat = {'/'.join(str(k.key) for k in path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
  flat['_step'] = np.asarray(
      multihost_utils.process_allgather(state.step, tiled=True))
  flat['_process_count'] = np.asarray(jax.process_count())
  flat['_device_count'] = np.asarray(jax.device_count())
  np.savez(os.path.join(args.workdir, f'params_{jax.process_index()}.npz'),
           **flat)
  if distributed:
    jax.distributed.shutdown()


if __name__ == '__main__':
  main()
