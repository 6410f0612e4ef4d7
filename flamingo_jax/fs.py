"""Every path the package reads or writes: local, or a URL such as gs://.

One small layer, so that a workdir, data_dir, init_from source or load()
path on Cloud Storage is never taken for a local one (`os.path.abspath`
turns 'gs://b/w' into '<cwd>/gs:/b/w'). A local path goes to `os` and the
built-in `open`, exactly as before; a URL goes to `etils.epath`, the layer
orbax and TFDS use (gs:// through tf.io.gfile, or fsspec without
TensorFlow). Path strings stay strings: a URL is passed on unchanged to
orbax, tensorstore and TensorBoard, which read gs:// themselves.

Where an object store differs from a disk:
  atomic writes  `write_text`/`write_bytes` of a local path write
                 `<path>.partial` and rename it over `path` (a kill leaves
                 the old contents or the new); on a URL the whole object is
                 uploaded in one request, which Cloud Storage makes visible
                 whole or not at all (its renames are copies).
  appends        no object store appends in place: callers rewrite the
                 whole object (`training/metrics.py`).
  directories    exist as prefixes of object names; `makedirs` is cheap.
  locks          no flock: `training/workdir.py` keeps a best-effort lock
                 object instead.
"""

import contextlib
import io
import os
import posixpath
import shutil
from typing import IO, Iterator

from etils import epath

PathLike = str | os.PathLike


def is_url(path: PathLike) -> bool:
  """Whether `path` is a URL (gs://bucket/...) rather than a local path."""
  return '://' in os.fspath(path)


def _split(path: str) -> tuple[str, str]:
  """'gs://b/x/y' -> ('gs://', 'b/x/y')."""
  scheme, rest = path.split('://', 1)
  return f'{scheme}://', rest


def absolute(path: PathLike) -> str:
  """A local path made absolute (`os.path.abspath`); a URL as it is, less a
  trailing '/'."""
  path = os.fspath(path)
  if is_url(path):
    scheme, rest = _split(path)
    return scheme + rest.rstrip('/')
  return os.path.abspath(path)


def join(path: PathLike, *parts: str) -> str:
  """`os.path.join`; under a URL '/'-joined; a URL part starts afresh (as an
  absolute part does)."""
  path = os.fspath(path)
  for part in parts:
    if is_url(part):
      path = part
    elif is_url(path):
      path = posixpath.join(path, part)
    else:
      path = os.path.join(path, part)
  return path


def normpath(path: PathLike) -> str:
  path = os.fspath(path)
  if is_url(path):
    scheme, rest = _split(path)
    return scheme + posixpath.normpath(rest)
  return os.path.normpath(path)


def dirname(path: PathLike) -> str:
  path = os.fspath(path)
  if is_url(path):
    scheme, rest = _split(path.rstrip('/'))
    return scheme + posixpath.dirname(rest)
  return os.path.dirname(path)


def basename(path: PathLike) -> str:
  path = os.fspath(path)
  return (posixpath.basename(path.rstrip('/')) if is_url(path)
          else os.path.basename(path))


def relpath(path: PathLike, start: PathLike) -> str:
  path, start = os.fspath(path), os.fspath(start)
  if is_url(path) and is_url(start):
    (_, rest), (_, base) = _split(path), _split(start)
    return posixpath.relpath('/' + rest, '/' + base)
  return os.path.relpath(path, start)


def _epath(path: str) -> epath.Path:
  return epath.Path(path)


@contextlib.contextmanager
def _naming(path: str) -> Iterator[None]:
  """An ImportError of epath's backend (gs:// needs TensorFlow's tf.io.gfile,
  or fsspec) names the path that needed it."""
  try:
    yield
  except ImportError as e:
    raise ImportError(f'Reading or writing {path} needs TensorFlow '
                      f'(tf.io.gfile, through etils.epath): {e}') from e


def exists(path: PathLike) -> bool:
  path = os.fspath(path)
  if is_url(path):
    with _naming(path):
      return _epath(path).exists()
  return os.path.exists(path)


def isdir(path: PathLike) -> bool:
  path = os.fspath(path)
  if is_url(path):
    with _naming(path):
      return _epath(path).is_dir()
  return os.path.isdir(path)


def isfile(path: PathLike) -> bool:
  path = os.fspath(path)
  if is_url(path):
    with _naming(path):
      p = _epath(path)
      return p.exists() and not p.is_dir()
  return os.path.isfile(path)


def listdir(path: PathLike) -> list[str]:
  """The names in a directory (a URL: under its prefix), in no set order."""
  path = os.fspath(path)
  if is_url(path):
    with _naming(path):
      return [p.name for p in _epath(path).iterdir()]
  return os.listdir(path)


def makedirs(path: PathLike) -> None:
  """Creates `path` and its parents if missing (exist_ok)."""
  path = os.fspath(path)
  if is_url(path):
    with _naming(path):
      _epath(path).mkdir(parents=True, exist_ok=True)
  else:
    os.makedirs(path, exist_ok=True)


def getmtime(path: PathLike) -> float:
  path = os.fspath(path)
  return (float(_epath(path).stat().mtime) if is_url(path)
          else os.path.getmtime(path))


def remove(path: PathLike) -> None:
  path = os.fspath(path)
  if is_url(path):
    _epath(path).unlink()
  else:
    os.remove(path)


def replace(source: PathLike, target: PathLike) -> None:
  """Moves a file or directory over `target` (`os.replace`; on an object
  store a copy of each object, then its deletion: not atomic)."""
  source, target = os.fspath(source), os.fspath(target)
  if is_url(source) or is_url(target):
    _epath(source).replace(target)
  else:
    os.replace(source, target)


@contextlib.contextmanager
def open_file(path: PathLike, mode: str = 'r') -> Iterator[IO]:  # pylint: disable=redefined-builtin
  """`open(path, mode)`; on a URL an object written when the file closes."""
  path = os.fspath(path)
  if is_url(path):
    with contextlib.ExitStack() as stack:
      with _naming(path):  # tf.io.gfile is imported on entering.
        f = stack.enter_context(_epath(path).open(mode))
      yield f
  else:
    with open(path, mode) as f:
      yield f


def read_bytes(path: PathLike) -> bytes:
  with open_file(path, 'rb') as f:
    return f.read()


def read_text(path: PathLike) -> str:
  with open_file(path, 'r') as f:
    return f.read()


def write_bytes(path: PathLike, data: bytes) -> None:
  """Writes `path` whole: the old contents or the new, never half (see the
  module docstring)."""
  path = os.fspath(path)
  if is_url(path):
    with open_file(path, 'wb') as f:
      f.write(data)
    return
  partial = f'{path}.partial'
  with open(partial, 'wb') as f:
    f.write(data)
  os.replace(partial, path)


def write_text(path: PathLike, text: str) -> None:
  """`write_bytes` of UTF-8 text."""
  write_bytes(path, text.encode('utf-8'))


def copy_tree(source: PathLike, target: PathLike) -> list[str]:
  """Copies every file under the local directory `source` to the same
  relative path under `target` (local or URL); returns the targets.

  For writers that only reach a local disk (ArrayRecord's writer opens a
  file descriptor), which then build locally and upload the result.
  """
  source, copied = os.fspath(source), []
  for root, _, names in os.walk(source):
    for name in sorted(names):
      local = os.path.join(root, name)
      parts = os.path.relpath(local, source).split(os.sep)
      copied.append(join(target, *parts))
      makedirs(dirname(copied[-1]))
      with open(local, 'rb') as f, open_file(copied[-1], 'wb') as out:
        shutil.copyfileobj(f, out)  # Streamed: shards can be large.
  return copied


def save_figure(fig, path: PathLike) -> None:
  """`fig.savefig(path)` of a matplotlib figure, local or URL (a PNG at 100
  dpi); matplotlib itself is the caller's import."""
  path = os.fspath(path)
  if is_url(path):
    buffer = io.BytesIO()
    fig.savefig(buffer, format='png', dpi=100)
    write_bytes(path, buffer.getvalue())
  else:
    fig.savefig(path, dpi=100)
