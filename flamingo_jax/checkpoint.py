"""Checkpoints: one wrapper around orbax's CheckpointManager.

Shared by training (periodic, asynchronous saves; save-and-exit on
preemption; resume from the workdir) and by inference (`flamingo_jax.load`,
which needs no trainer). A checkpoint holds three items:

  state      the train state pytree (step, parameters, optimizer state, rng,
             non-finite counters), restored straight into sharded arrays
             when given shardings;
  data       a small JSON dict: the input pipeline's position, so that a
             resumed run reads exactly the batches an uninterrupted run would;
  checksums  a small JSON dict: one digest per array of `state` (and one of
             `data`), computed on device when saving.

Layout: `<workdir>/checkpoints/<step>/{state,data,checksums}`. The
converter writes the same layout a part of the state at a time
(`checkpoint_parts.py`).

Integrity. Every restore checks what it read against the checksums (orbax
itself restores flipped bytes silently), that every value is finite, and
that the metadata files are there (`checkpoint_integrity.py`); a step that
fails is damaged (`CheckpointDamagedError` names the step, the parameter or
file, and what is wrong). Without an explicit step, training
(`Checkpointer.restore_intact`) and `load_params` fall back to the newest
intact step with a warning; training also moves the damaged step, never
deleting it, to
`<workdir>/checkpoints.damaged/<step>`, so that orbax's keep-the-last-N
policy and the next save of that step number do not trip over it. Saving
refuses a state with a non-finite value (`NonFiniteStateError`): no
checkpoint is ever NaN.
"""

from collections.abc import Callable, Iterable, Mapping, Sequence
import contextlib
import functools
import os
from typing import Any, Optional

from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from flamingo_jax import checkpoint_integrity as integrity
from flamingo_jax import fs

PyTree = Any
DAMAGED_SUFFIX = '.damaged'  # <workdir>/checkpoints.damaged/<step>


CheckpointDamagedError = integrity.CheckpointDamagedError
CheckpointMismatchError = integrity.CheckpointMismatchError
NonFiniteStateError = integrity.NonFiniteStateError
NotATrainStateError = integrity.NotATrainStateError


def _handlers(state: Optional[ocp.CheckpointHandler] = None
              ) -> dict[str, ocp.CheckpointHandler]:
  """The items' handlers (given up front, so that metadata can be read
  before anything is saved)."""
  return {'state': state or ocp.StandardCheckpointHandler(),
          'data': ocp.JsonCheckpointHandler(),
          'checksums': ocp.JsonCheckpointHandler()}


class Checkpointer:
  """Saves and restores (state, data) under `directory`, keeping the last N."""

  def __init__(self, directory: str, *, save_every: int, keep: int = 3,
               async_save: bool = True):
    if keep < 1:
      raise ValueError(f'keep={keep}: must be >= 1 (the number of '
                       'checkpoints kept).')
    self.directory = fs.absolute(directory)
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
        self.directory, options=options, item_handlers=_handlers())

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def should_save(self, step: int) -> bool:
    """Whether the policy (interval or preemption) saves `step`."""
    return self._manager.should_save(step)

  def save(self, step: int, state: PyTree, data: Mapping[str, Any], *,
           force: bool = False) -> bool:
    """Saves if the policy (interval or preemption) or `force` says so.

    Raises:
      NonFiniteStateError: if an array of `state` holds a NaN or an inf
        (nothing is written).
    """
    if step in self.all_steps() or not (force or self.should_save(step)):
      return False
    digests, nonfinite = integrity.integrity(state)
    if nonfinite:
      raise NonFiniteStateError(
          f'Refusing to save step {step}: {len(nonfinite)} arrays hold NaN '
          f'or inf (e.g. {", ".join(nonfinite[:3])}). The last saved step is '
          f'{self.latest_step()} in {self.directory}.')
    sums = {'state': digests, 'data': integrity.data_digest(data)}
    saved = self._manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                data=ocp.args.JsonSave(dict(data)),
                                checksums=ocp.args.JsonSave(sums)),
        force=True)
    if saved:
      logging.info('Saving checkpoint for step %d to %s.', step,
                   self.directory)
    return saved

  def reached_preemption(self, step: int) -> bool:
    return self._manager.reached_preemption(step)

  def restore(self, abstract_state: PyTree, step: Optional[int] = None, *,
              zero_if_missing: Sequence[str] = ()
              ) -> tuple[PyTree, dict[str, Any]]:
    """Restores and verifies `step` (default: latest) into the abstract
    state's shardings.

    Args:
      abstract_state: a pytree (a dict or NamedTuple at the top) of
        `jax.ShapeDtypeStruct` (with `sharding` set for sharded restores),
        e.g. from `jax.eval_shape`.
      step: which step.
      zero_if_missing: top-level fields that a checkpoint from an older
        version may lack; they are restored as zeros.

    Raises:
      FileNotFoundError: no such step.
      CheckpointMismatchError: the step's arrays have other shapes.
      CheckpointDamagedError: the step cannot be read back as written.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'No checkpoint in {self.directory}.')
    if step not in self.all_steps():
      raise FileNotFoundError(
          f'No checkpoint for step {step} in {self.directory}; available: '
          f'{self.all_steps()}.')
    fields = (abstract_state._asdict() if hasattr(abstract_state, '_asdict')
              else dict(abstract_state))
    step_dir = fs.join(self.directory, str(step))

    def metadata():
      integrity.check_files(step_dir)
      with integrity.muted():
        tree = self._manager.item_metadata(step)['state']
      tree = getattr(tree, 'tree', tree)
      if tree is None:
        raise integrity.Damage(
            'its metadata file state/_METADATA is unreadable')
      return tree

    saved = integrity.read_guarded(self.directory, step, metadata)
    missing = [f for f in zero_if_missing if f in fields and f not in saved]
    present = {k: v for k, v in fields.items() if k not in missing}
    differences = integrity.shape_differences(saved, present,
                                                 first=PARAM_PARTS)
    if differences:
      raise CheckpointMismatchError(self.directory, step, differences)
    has_checksums = integrity.has_checksums(step_dir)

    def read():
      items = dict(state=ocp.args.StandardRestore(present),
                   data=ocp.args.JsonRestore())
      if has_checksums:
        items['checksums'] = ocp.args.JsonRestore()
      with integrity.muted():
        restored = self._manager.restore(step,
                                         args=ocp.args.Composite(**items))
      data = dict(restored['data'] or {})
      integrity.verify(restored['state'], data,
              restored['checksums'] if has_checksums else None)
      return restored['state'], data

    restored, data = integrity.read_guarded(self.directory, step, read)
    state = dict(restored)
    for field in missing:
      logging.warning('Checkpoint step %d predates %r: it starts at 0.', step,
                      field)
      state[field] = jax.device_put(jnp.zeros(fields[field].shape,
                                              fields[field].dtype),
                                    fields[field].sharding)
    if hasattr(abstract_state, '_asdict'):
      state = type(abstract_state)(**state)
    return state, data

  def restore_intact(self, abstract_state: PyTree, *,
                     zero_if_missing: Sequence[str] = ()
                     ) -> tuple[PyTree, dict[str, Any], int]:
    """The newest step that restores intact: (state, data, step).

    A damaged step is reported with a warning and moved to
    `<directory>.damaged/<step>` (kept, never deleted), once an older step
    has restored; if none does, nothing is moved.

    Raises:
      FileNotFoundError: no checkpoint.
      CheckpointMismatchError: the checkpoints have other shapes.
      CheckpointDamagedError: every step is damaged (all are named).
    """
    damaged = []
    for step in reversed(self.all_steps()):
      try:
        state, data = self.restore(abstract_state, step,
                                   zero_if_missing=zero_if_missing)
      except CheckpointDamagedError as e:
        logging.warning('%s', e)
        damaged.append(e)
        continue
      for error in damaged:
        self._set_aside(error.step)
      if damaged:
        logging.warning('Falling back to step %d, the newest intact one.',
                        step)
      return state, data, step
    if not damaged:
      raise FileNotFoundError(f'No checkpoint in {self.directory}.')
    raise CheckpointDamagedError(self.directory, None, '; '.join(
        f'step {e.step}: {e.problem}' for e in damaged))

  def _set_aside(self, step: int) -> None:
    """Moves a damaged step out of orbax's sight (process 0; all wait)."""
    target = fs.join(self.directory + DAMAGED_SUFFIX, str(step))
    if jax.process_index() == 0:
      fs.makedirs(fs.dirname(target))
      suffix = 1
      while integrity.exists(target):
        target = fs.join(self.directory + DAMAGED_SUFFIX, f'{step}-{suffix}')
        suffix += 1
      fs.replace(fs.join(self.directory, str(step)), target)
      logging.warning('Moved the damaged step %d to %s (kept for inspection: '
                      'delete it when done).', step, target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'set_aside_{step}')
    self._manager.reload()

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
  path = fs.absolute(path)
  if fs.isdir(fs.join(path, 'checkpoints')):
    path = fs.join(path, 'checkpoints')
  if not fs.isdir(path):
    raise FileNotFoundError(f'No checkpoint directory at {path!r}.')
  return path


def _directory(manager: ocp.CheckpointManager) -> str:
  """The manager's directory as a path string (a URL stays one)."""
  return os.fspath(manager.directory)


def _reader(directory: str) -> ocp.CheckpointManager:
  """A read-only manager of `directory`; orbax's read-only warning muted."""
  with integrity.muted():
    return ocp.CheckpointManager(
        directory,
        item_handlers=_handlers(ocp.PyTreeCheckpointHandler()),
        options=ocp.CheckpointManagerOptions(
            read_only=True, create=False, save_interval_steps=0))


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
  """The state's metadata tree (integrity.Damage if a file is missing)."""
  integrity.check_files(fs.join(_directory(manager), str(step)))
  with integrity.muted():
    tree = manager.item_metadata(step)['state']
  tree = getattr(tree, 'tree', tree)
  if tree is None:
    raise integrity.Damage('its metadata file state/_METADATA is unreadable')
  missing = [part for part in PARAM_PARTS if part not in tree]
  if missing:
    raise NotATrainStateError(
        f'Checkpoint {manager.directory}/{step} has no {missing} parameters: '
        f'not a train state (it has {sorted(tree)}).')
  return tree


def _abstract(tree: Mapping[str, Any]) -> PyTree:
  """The merged parameters' ShapeDtypeStructs from a state's metadata."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                      merge_parts({part: tree[part] for part in PARAM_PARTS}))


def _newest_intact(path: str, step: Optional[int],
                   read: Callable[[ocp.CheckpointManager, int], Any]
                   ) -> tuple[Any, int]:
  """`read(manager, step)` of `step`, or of the newest step it succeeds on.

  With an explicit `step` a damaged one raises CheckpointDamagedError; else
  each damaged step is skipped with a warning naming what is wrong.
  """
  directory = checkpoints_dir(path)
  manager = _reader(directory)
  try:
    steps = sorted(manager.all_steps())
    candidates = ([_pick_step(steps, step, directory)] if step is not None
                  else list(reversed(steps)))
    if not candidates:
      raise FileNotFoundError(f'No checkpoint in {directory!r}.')
    problems = []
    for candidate in candidates:
      try:
        return (integrity.read_guarded(directory, candidate,
                              functools.partial(read, manager, candidate)),
                candidate)
      except CheckpointDamagedError as e:
        if step is not None:
          raise
        logging.warning('%s Trying the step before it.', e)
        problems.append(f'step {candidate}: {e.problem}')
    raise CheckpointDamagedError(directory, None, '; '.join(problems))
  finally:
    manager.close()


def abstract_params(path: str, step: Optional[int] = None) -> PyTree:
  """The parameters' shapes and dtypes (ShapeDtypeStructs), read from the
  checkpoint's metadata without loading an array (default: the newest step
  whose metadata is intact)."""
  tree, _ = _newest_intact(path, step, _state_metadata)
  return _abstract(tree)


def load_params_and_step(
    path: str, step: Optional[int] = None,
    shardings: Optional[Callable[[PyTree], PyTree]] = None
) -> tuple[dict[str, dict[str, Any]], int]:
  """`load_params`, and the step it loaded (see there)."""

  def read(manager, step):
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
    has_checksums = integrity.has_checksums(
        fs.join(_directory(manager), str(step)))
    items = dict(state=ocp.args.PyTreeRestore(
        item=target,
        restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True))
    if has_checksums:
      items['checksums'] = ocp.args.JsonRestore()
    with integrity.muted():
      restored = manager.restore(step, args=ocp.args.Composite(**items))
    integrity.verify(restored['state'], None,
            restored['checksums'] if has_checksums else None)
    return restored['state']

  # Host-bound reads place arrays on one device: a caller's mesh (the loop
  # reads `init_from` inside its own) would make jit reject them.
  with (jax.set_mesh(None) if shardings is None
        else contextlib.nullcontext()):
    state, step = _newest_intact(path, step, read)
  params = merge_parts(state)
  if shardings is None:
    params = jax.tree.map(np.asarray, params)
  return params, step


def load_params(path: str, step: Optional[int] = None,
                shardings: Optional[Callable[[PyTree], PyTree]] = None
                ) -> dict[str, dict[str, Any]]:
  """All model parameters (trainable and frozen) of a training checkpoint.

  Only the parameter items are read, not the optimizer state, and they are
  checked against the step's checksums.

  Args:
    path: a workdir or its `checkpoints/` folder.
    step: which checkpoint; default the newest intact one (a damaged newer
      one is skipped with a warning that says what is wrong with it).
    shardings: abstract params -> their shardings, to restore straight into
      sharded arrays; default: numpy arrays on the host, whatever topology
      saved them.

  Returns:
    A Haiku parameter dict, in the stored dtypes.

  Raises:
    CheckpointDamagedError: `step` (or, by default, every step) is damaged.
  """
  return load_params_and_step(path, step, shardings)[0]
