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

from collections.abc import Callable, Mapping
import logging as py_logging
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


PARAM_PARTS = ('trainable', 'frozen')  # The train state's parameter items.


def checkpoints_dir(path: str) -> str:
  """A workdir or its `checkpoints/` folder -> the `checkpoints/` folder."""
  path = os.path.abspath(os.fspath(path))
  if os.path.isdir(os.path.join(path, 'checkpoints')):
    path = os.path.join(path, 'checkpoints')
  if not os.path.isdir(path):
    raise FileNotFoundError(f'No checkpoint directory at {path!r}.')
  return path


def _reader(directory: str) -> ocp.CheckpointManager:
  """A read-only manager of `directory`; orbax's read-only warning muted."""
  absl_logger = logging.get_absl_logger()
  level = absl_logger.level
  absl_logger.setLevel(py_logging.ERROR)
  try:
    return ocp.CheckpointManager(
        directory,
        item_handlers={'state': ocp.PyTreeCheckpointHandler(),
                       'data': ocp.JsonCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(
            read_only=True, create=False, save_interval_steps=0))
  finally:
    absl_logger.setLevel(level)


def saved_steps(path: str) -> list[int]:
  """The steps saved under a workdir or its `checkpoints/` folder."""
  manager = _reader(checkpoints_dir(path))
  try:
    return sorted(manager.all_steps())
  finally:
    manager.close()


def _pick_step(steps: list[int], step: Optional[int], directory: str) -> int:
  if not steps:
    raise FileNotFoundError(f'No checkpoint in {directory!r}.')
  if step is None:
    return steps[-1]
  if step not in steps:
    raise FileNotFoundError(f'No checkpoint for step {step} in '
                            f'{directory}; available: {steps}.')
  return step


def resolve_step(path: str, step: Optional[int] = None) -> int:
  """`step` (default: the latest) if it is saved under a workdir or its
  `checkpoints/` folder; else a FileNotFoundError that lists what is."""
  return _pick_step(saved_steps(path), step, checkpoints_dir(path))


def latest_step(path: str) -> int:
  """The last step saved under a workdir or its `checkpoints/` folder."""
  return resolve_step(path)


def merge_parts(state: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
  """{'trainable': {m: {p: x}}, 'frozen': ...} -> {m: {p: x}}."""
  params: dict[str, dict[str, Any]] = {}
  for part in PARAM_PARTS:
    for module, leaves in state.get(part, {}).items():
      params.setdefault(module, {}).update(leaves)
  return params


def _split_like(params: PyTree, state: Mapping[str, Any]) -> dict:
  """The inverse of `merge_parts`, shaped as `state`'s parameter items."""
  return {part: {module: {name: params[module][name] for name in leaves}
                 for module, leaves in state[part].items()}
          for part in PARAM_PARTS if part in state}


def _state_metadata(manager: ocp.CheckpointManager, step: int) -> Mapping:
  tree = manager.item_metadata(step)['state']
  tree = getattr(tree, 'tree', tree)
  missing = [part for part in PARAM_PARTS if part not in tree]
  if missing:
    raise ValueError(f'Checkpoint {manager.directory}/{step} has no '
                     f'{missing} parameters: not a train state (it has '
                     f'{sorted(tree)}).')
  return tree


def _checked_step(manager: ocp.CheckpointManager, step: Optional[int]) -> int:
  return _pick_step(sorted(manager.all_steps()), step, str(manager.directory))


def _abstract(tree: Mapping[str, Any]) -> PyTree:
  """The merged parameters' ShapeDtypeStructs from a state's metadata."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                      merge_parts({part: tree[part] for part in PARAM_PARTS}))


def abstract_params(path: str, step: Optional[int] = None) -> PyTree:
  """The parameters' shapes and dtypes (ShapeDtypeStructs), read from the
  checkpoint's metadata without loading an array."""
  manager = _reader(checkpoints_dir(path))
  try:
    tree = _state_metadata(manager, _checked_step(manager, step))
  finally:
    manager.close()
  return _abstract(tree)


def load_params(path: str, step: Optional[int] = None,
                shardings: Optional[Callable[[PyTree], PyTree]] = None
                ) -> dict[str, dict[str, Any]]:
  """All model parameters (trainable and frozen) of a training checkpoint.

  Only the parameter items are read, not the optimizer state.

  Args:
    path: a workdir or its `checkpoints/` folder.
    step: which checkpoint; default the latest.
    shardings: abstract params -> their shardings, to restore straight into
      sharded arrays; default: numpy arrays on the host, whatever topology
      saved them.

  Returns:
    A Haiku parameter dict, in the stored dtypes.
  """
  manager = _reader(checkpoints_dir(path))
  try:
    step = _checked_step(manager, step)
    tree = _state_metadata(manager, step)
    abstract = _abstract(tree)
    if shardings is None:
      device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
      placement = jax.tree.map(lambda _: device, abstract)
    else:
      placement = shardings(abstract)
    placed = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        abstract, placement)
    target = _split_like(placed, tree)
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
            item=target,
            restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True)))
  finally:
    manager.close()
  params = merge_parts(restored['state'])
  if shardings is None:
    params = jax.tree.map(np.asarray, params)
  return params
