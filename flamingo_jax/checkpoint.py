"""Checkpoints: one wrapper around orbax's CheckpointManager.

Shared by training (periodic, asynchronous saves; save-and-exit on
preemption; resume from the workdir) and by inference (`flamingo_jax.load`,
which needs no trainer). A checkpoint holds two items:

  state   the train state pytree (step, parameters, optimizer state, rng),
          restored straight into sharded arrays when given shardings;
  data    a small JSON dict: the input pipeline's position, so that a resumed
          run reads exactly the batches an uninterrupted run would.

Layout: `<workdir>/checkpoints/<step>/{state,data}`.
"""

from collections.abc import Mapping
import os
import signal
import threading
from typing import Any, Optional

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp

PyTree = Any


class PreemptionFlag:
  """Set by SIGTERM (how Cloud TPU and most schedulers announce preemption)."""

  def __init__(self):
    self._event = threading.Event()
    self._previous = None

  def install(self) -> 'PreemptionFlag':
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame  # Unused.
    logging.warning('Received signal %d: will save a checkpoint and exit.',
                    signum)
    self._event.set()

  def uninstall(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def is_set(self) -> bool:
    return self._event.is_set()


class Checkpointer:
  """Saves and restores (state, data) under `directory`, keeping the last N."""

  def __init__(self, directory: str, *, save_every: int, keep: int = 3,
               async_save: bool = True):
    self.directory = os.path.abspath(directory)
    save_policy = ocp.checkpoint_managers.AnySavePolicy([
        ocp.checkpoint_managers.FixedIntervalPolicy(save_every),
        ocp.checkpoint_managers.PreemptionCheckpointingPolicy(),
    ])
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=save_policy,
        preservation_policy=ocp.checkpoint_managers.LatestN(keep),
        enable_async_checkpointing=async_save,
        create=True,
    )
    self._manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=('state', 'data'))

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: PyTree, data: Mapping[str, Any], *,
           force: bool = False) -> bool:
    """Saves if the policy (interval or preemption) or `force` says so."""
    saved = self._manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                data=ocp.args.JsonSave(dict(data))),
        force=force)
    if saved:
      logging.info('Saving checkpoint for step %d to %s.', step,
                   self.directory)
    return saved

  def reached_preemption(self, step: int) -> bool:
    return self._manager.reached_preemption(step)

  def restore(self, abstract_state: PyTree,
              step: Optional[int] = None) -> tuple[PyTree, dict[str, Any]]:
    """Restores `step` (default: latest) into the abstract state's shardings.

    `abstract_state` is a pytree of `jax.ShapeDtypeStruct` (with `sharding`
    set for sharded restores), e.g. from `jax.eval_shape`.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'No checkpoint in {self.directory}.')
    if step not in self.all_steps():
      raise FileNotFoundError(
          f'No checkpoint for step {step} in {self.directory}; available: '
          f'{self.all_steps()}.')
    restored = self._manager.restore(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                data=ocp.args.JsonRestore()))
    return restored['state'], dict(restored['data'] or {})

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_like(tree: PyTree) -> PyTree:
  """ShapeDtypeStructs (with shardings) describing a tree of arrays."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                     sharding=getattr(x, 'sharding', None)),
      tree)


def load_params(directory: str, step: Optional[int] = None
                ) -> dict[str, dict[str, Any]]:
  """All model parameters (trainable and frozen) of a training checkpoint.

  `directory` is a workdir or its `checkpoints/` folder; the arrays come back
  on the host, in their stored dtypes, as a Haiku parameter dict.
  """
  if os.path.isdir(os.path.join(directory, 'checkpoints')):
    directory = os.path.join(directory, 'checkpoints')
  if not os.path.isdir(directory):
    raise FileNotFoundError(f'No checkpoint directory at {directory!r}.')
  manager = ocp.CheckpointManager(
      os.path.abspath(directory),
      item_handlers={'state': ocp.StandardCheckpointHandler(),
                     'data': ocp.JsonCheckpointHandler()},
      options=ocp.CheckpointManagerOptions(read_only=True))
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f'No checkpoint in {directory!r}.')
  # Restore onto this host's first device, whatever topology saved it.
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
      manager.item_metadata(step)['state'].tree)
  restored = manager.restore(
      step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
  manager.close()
  state = restored['state']
  params = {}
  for part in ('trainable', 'frozen'):
    for module, leaves in state[part].items():
      params.setdefault(module, {}).update(
          {name: np.asarray(value) for name, value in leaves.items()})
  return params
