"""The training workdir's guards: one trainer at a time, config, finish mark.

  W/trainer.lock   held (flock) by the process training in W; a second
                   trainer on W stops with an error naming the holder's pid
                   and host. The kernel releases the lock when its holder
                   dies, so a killed run never blocks its own resume (the
                   file stays; its text is only information).
  W/config.json    the resolved config, written once the run has restored
                   its checkpoint (or started afresh): a run that cannot
                   resume leaves the previous run's config in place.
  W/finished.json  {"step": N}, written once the final step is saved: the
                   recipe counts a stage as done only with it.

Only process 0 writes or locks (the workdir may be shared by every host).
File access goes through the small helpers at the bottom, the one place to
change for other filesystems; URLs (gs://...) are not locked.
"""

import contextlib
import json
import os
import socket
import time
from typing import Any, Iterator, Optional

import jax
import ml_collections

LOCK_FILE = 'trainer.lock'
CONFIG_FILE = 'config.json'
FINISHED_FILE = 'finished.json'

# Locks this process holds: {lock path: [open file, depth]}, so that the
# recipe (which locks W) can run the main stage's loop (which locks W too).
_HELD: dict[str, list[Any]] = {}


class WorkdirLockedError(RuntimeError):
  pass


@contextlib.contextmanager
def lock(workdir: str) -> Iterator[None]:
  """Holds W/trainer.lock while the body runs (re-entrant in a process).

  Raises:
    WorkdirLockedError: another live process holds it.
  """
  if jax.process_index() != 0 or '://' in workdir:
    yield
    return
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(os.path.realpath(workdir), LOCK_FILE)
  if path in _HELD:
    _HELD[path][1] += 1
    try:
      yield
    finally:
      _HELD[path][1] -= 1
    return
  import fcntl  # pylint: disable=g-import-not-at-top  # POSIX only.
  f = open(path, 'a+')
  try:
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError:
    f.seek(0)
    holder = f.read().strip() or 'a process that has not said who it is'
    f.close()
    raise WorkdirLockedError(
        f'Another trainer is running in {workdir}: {holder} (it holds '
        f'{path}). Wait for it or stop it, or train in another '
        '--workdir.') from None
  f.seek(0)
  f.truncate()
  f.write(f'pid {os.getpid()} on host {socket.gethostname()}, since '
          f'{time.strftime("%Y-%m-%d %H:%M:%S")}\n')
  f.flush()
  _HELD[path] = [f, 1]
  try:
    yield
  finally:
    del _HELD[path]
    f.truncate(0)
    fcntl.flock(f, fcntl.LOCK_UN)
    f.close()


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """W/config.json (process 0), replaced atomically."""
  if jax.process_index() == 0:
    _write_text(os.path.join(workdir, CONFIG_FILE),
                config.to_json_best_effort(indent=2, sort_keys=True))


def saved_config(workdir: str) -> Optional[dict[str, Any]]:
  """W/config.json as a dict, or None if there is none (or it is damaged)."""
  text = _read_text(os.path.join(workdir, CONFIG_FILE))
  try:
    return json.loads(text) if text is not None else None
  except json.JSONDecodeError:
    return None


def _flatten(tree: Any, prefix: str = '') -> dict[str, Any]:
  if isinstance(tree, dict):
    out = {}
    for key, value in tree.items():
      out.update(_flatten(value, f'{prefix}{key}.'))
    return out
  return {prefix[:-1]: tree}


def config_differences(config: ml_collections.ConfigDict,
                       workdir: str) -> list[str]:
  """'key: saved -> now' for each field of `config` that differs from
  W/config.json (model fields first); [] if there is no saved config."""
  saved = saved_config(workdir)
  if saved is None:
    return []
  now = _flatten(json.loads(config.to_json_best_effort()))
  saved = _flatten(saved)
  keys = sorted(k for k in set(now) | set(saved)
                if now.get(k, '<absent>') != saved.get(k, '<absent>'))
  keys.sort(key=lambda k: not k.startswith(('model.', 'task')))
  return [f'{k}: {saved.get(k, "<absent>")!r} -> {now.get(k, "<absent>")!r}'
          for k in keys]


def mark_finished(workdir: str, step: int) -> None:
  """Records that the run in `workdir` saved its final step `step`."""
  if jax.process_index() == 0:
    _write_text(os.path.join(workdir, FINISHED_FILE),
                json.dumps({'step': int(step)}) + '\n')


def finished_step(workdir: str) -> Optional[int]:
  """The step W/finished.json records, or None."""
  text = _read_text(os.path.join(workdir, FINISHED_FILE))
  try:
    return int(json.loads(text)['step']) if text is not None else None
  except (json.JSONDecodeError, KeyError, TypeError, ValueError):
    return None


# -- File access (the one place to change for other filesystems) ------------


def _read_text(path: str) -> Optional[str]:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return f.read()


def _write_text(path: str, text: str) -> None:
  """Writes `path` through a temporary file, so that a kill leaves the old
  contents or the new, never half of them."""
  partial = f'{path}.partial'
  with open(partial, 'w') as f:
    f.write(text)
  os.replace(partial, path)
