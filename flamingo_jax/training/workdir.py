"""The training workdir's guards: one trainer at a time, config, finish mark.

  W/trainer.lock   held by the process training in W; a second trainer on W
                   stops with an error naming the holder's pid and host.
                   Local: flock, which the kernel releases when its holder
                   dies, so a killed run never blocks its own resume (the
                   file stays; its text is only information). On an object
                   store (gs://), which has no locks: a best-effort lock
                   object, see `_ObjectLock`.
  W/config.json    the resolved config, written once the run has restored
                   its checkpoint (or started afresh): a run that cannot
                   resume leaves the previous run's config in place.
  W/finished.json  {"step": N}, written once the final step is saved: the
                   recipe counts a stage as done only with it.

Only process 0 writes or locks (the workdir may be shared by every host).
Files go through `flamingo_jax.fs` (local or gs://).
"""

import contextlib
import json
import os
import socket
import threading
import time
from typing import Any, Iterator, Optional
import uuid

from absl import logging
import jax
import ml_collections

from flamingo_jax import fs

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
  if jax.process_index() != 0:
    yield
    return
  remote = fs.is_url(workdir)
  fs.makedirs(workdir)
  path = fs.join(fs.absolute(workdir) if remote else os.path.realpath(workdir),
                 LOCK_FILE)
  if path in _HELD:
    _HELD[path][1] += 1
    try:
      yield
    finally:
      _HELD[path][1] -= 1
    return
  if remote:
    held = _ObjectLock(path, workdir)
    held.acquire()
    _HELD[path] = [held, 1]
    try:
      yield
    finally:
      del _HELD[path]
      held.release()
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
  f.write(f'{_holder()}\n')
  f.flush()
  _HELD[path] = [f, 1]
  try:
    yield
  finally:
    del _HELD[path]
    f.truncate(0)
    fcntl.flock(f, fcntl.LOCK_UN)
    f.close()


def _holder() -> str:
  return (f'pid {os.getpid()} on host {socket.gethostname()}, since '
          f'{time.strftime("%Y-%m-%d %H:%M:%S")}')


class _ObjectLock:
  """A lock object for a workdir on an object store (best effort).

  Cloud Storage has no flock and epath no conditional write, so two runs
  started within a second of each other can both take it; what it does
  catch is the common mistake, a second trainer started on a workdir in
  use. The object holds JSON {holder, host, pid, token, renewed}; the
  holder rewrites `renewed` every RENEW_SECONDS from a daemon thread and
  deletes the object when it stops. A new trainer takes the lock over when
  the object is absent, is its own (token), was not renewed for
  STALE_SECONDS (its holder died: a killed run blocks a resume on another
  host for at most that long), or names a dead pid on this very host.
  """

  RENEW_SECONDS = 60.0
  STALE_SECONDS = 300.0

  def __init__(self, path: str, workdir: str):
    self.path, self.workdir = path, workdir
    self.token = uuid.uuid4().hex
    self.description = _holder()
    self._stop = threading.Event()
    self._thread: Optional[threading.Thread] = None

  def _read(self) -> Optional[dict[str, Any]]:
    try:
      value = json.loads(fs.read_text(self.path))
    except (FileNotFoundError, json.JSONDecodeError):
      return None
    return value if isinstance(value, dict) else None

  def _write(self) -> None:
    fs.write_text(self.path, json.dumps({
        'holder': self.description, 'host': socket.gethostname(),
        'pid': os.getpid(), 'token': self.token, 'renewed': time.time()}))

  def _abandoned(self, held: dict[str, Any]) -> bool:
    age = time.time() - float(held.get('renewed', 0))
    if age > self.STALE_SECONDS:
      return True
    if held.get('host') == socket.gethostname():
      try:
        os.kill(int(held.get('pid', -1)), 0)
      except ProcessLookupError:
        return True  # Its holder died on this host.
      except (OSError, ValueError):
        return False
    return False

  def acquire(self) -> None:
    held = self._read()
    if held is not None and held.get('token') != self.token:
      if not self._abandoned(held):
        age = time.time() - float(held.get('renewed', 0))
        raise WorkdirLockedError(
            f'Another trainer is running in {self.workdir}: '
            f'{held.get("holder", "a process that has not said who it is")} '
            f'(it renewed {self.path} {age:.0f} s ago). Wait for it or stop '
            'it, or train in another --workdir; if it is dead, its lock '
            f'lapses {self.STALE_SECONDS:.0f} s after its last renewal (or '
            'delete the lock object).')
      logging.warning('Taking over the lock %s of a trainer that is gone: %s.',
                      self.path, held.get('holder'))
    self._write()
    self._thread = threading.Thread(target=self._renew, daemon=True,
                                    name='workdir-lock')
    self._thread.start()

  def _renew(self) -> None:
    while not self._stop.wait(self.RENEW_SECONDS):
      try:
        self._write()
      except Exception as e:  # pylint: disable=broad-except
        logging.warning('Could not renew the lock %s: %s', self.path, e)

  def release(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    held = self._read()
    if held is not None and held.get('token') == self.token:
      try:
        fs.remove(self.path)
      except FileNotFoundError:
        pass


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """W/config.json (process 0), replaced atomically."""
  if jax.process_index() == 0:
    fs.write_text(fs.join(workdir, CONFIG_FILE),
                config.to_json_best_effort(indent=2, sort_keys=True))


def saved_config(workdir: str) -> Optional[dict[str, Any]]:
  """W/config.json as a dict, or None if there is none (or it is damaged)."""
  text = _read_text(fs.join(workdir, CONFIG_FILE))
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
    fs.write_text(fs.join(workdir, FINISHED_FILE),
                json.dumps({'step': int(step)}) + '\n')


def finished_step(workdir: str) -> Optional[int]:
  """The step W/finished.json records, or None."""
  text = _read_text(fs.join(workdir, FINISHED_FILE))
  try:
    return int(json.loads(text)['step']) if text is not None else None
  except (json.JSONDecodeError, KeyError, TypeError, ValueError):
    return None


def _read_text(path: str) -> Optional[str]:
  return fs.read_text(path) if fs.exists(path) else None
