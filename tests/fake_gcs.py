"""A fake Cloud Storage in one process, for gs:// workdirs without a network.

One in-memory bucket store, reached the two ways a pod reaches real GCS:
  HTTP     the GCS JSON API subset that tensorstore's `gcs` driver (orbax's
           array data) and google-cloud-storage (orbax's bucket lookup)
           speak, served on 127.0.0.1; `FakeGcs.environment()` points them
           at it (TENSORSTORE_GCS_HTTP_URL, STORAGE_EMULATOR_HOST) with a
           fixed token (GOOGLE_AUTH_TOKEN_FOR_TESTING).
  epath    an `etils.epath` backend with object-store semantics (no real
           directories, renames are copies, no append in place), put where
           epath keeps tf.io.gfile, the backend it uses for gs:// when
           TensorFlow is installed (`install_epath_backend`).
Every `gs://bucket/...` path string thus travels unchanged through
flamingo_jax.fs, orbax and tensorstore; only the transport under them is
fake. Not covered: TensorFlow's own C++ GCS client (TensorBoard's event
files, tf.data reading TFRecords), which would need TLS.
"""

import contextlib
import fnmatch
import http.server
import io
import json
import os
import posixpath
import threading
import time
from typing import Any, Iterator, Optional
from urllib import parse

from etils import epath
from etils.epath import backend as backend_lib
from etils.epath import stat_utils


class Store:
  """{(bucket, object name): (bytes, generation, mtime)}, thread-safe."""

  def __init__(self):
    self.objects: dict[tuple[str, str], tuple[bytes, int, float]] = {}
    self.lock = threading.Lock()
    self._generation = 0
    self.requests: list[str] = []  # 'METHOD path' of each HTTP request.

  def put(self, bucket: str, name: str, data: bytes) -> int:
    with self.lock:
      self._generation += 1
      self.objects[bucket, name] = (bytes(data), self._generation, time.time())
      return self._generation

  def get(self, bucket: str, name: str):
    with self.lock:
      return self.objects.get((bucket, name))

  def delete(self, bucket: str, name: str) -> bool:
    with self.lock:
      return self.objects.pop((bucket, name), None) is not None

  def names(self, bucket: str, prefix: str = '') -> list[str]:
    with self.lock:
      return sorted(n for b, n in self.objects if b == bucket
                    and n.startswith(prefix))


# -- HTTP: the JSON API ------------------------------------------------------


def _metadata(bucket: str, name: str, entry) -> dict[str, Any]:
  data, generation, mtime = entry
  updated = time.strftime('%Y-%m-%dT%H:%M:%S.000Z', time.gmtime(mtime))
  return {'kind': 'storage#object', 'bucket': bucket, 'name': name,
          'id': f'{bucket}/{name}/{generation}', 'size': str(len(data)),
          'generation': str(generation), 'metageneration': '1',
          'contentType': 'application/octet-stream', 'updated': updated,
          'timeCreated': updated}


class _Handler(http.server.BaseHTTPRequestHandler):
  protocol_version = 'HTTP/1.1'
  store: Store

  def log_message(self, *args):  # Quiet.
    pass

  def _reply(self, code: int, body: bytes = b'',
             headers: Optional[dict[str, str]] = None,
             content_type: str = 'application/json') -> None:
    self.send_response(code)
    for key, value in (headers or {}).items():
      self.send_header(key, value)
    self.send_header('Content-Type', content_type)
    self.send_header('Content-Length', str(len(body)))
    self.end_headers()
    if self.command != 'HEAD':
      self.wfile.write(body)

  def _json(self, code: int, value: Any) -> None:
    self._reply(code, json.dumps(value).encode())

  def _route(self):
    url = parse.urlsplit(self.path)
    query = dict(parse.parse_qsl(url.query))
    parts = url.path.split('/')
    # ['', ('upload'), 'storage', 'v1', 'b', bucket, ('o', (name))]
    upload = parts[1] == 'upload'
    parts = parts[2:] if upload else parts[1:]
    if parts[:3] != ['storage', 'v1', 'b'] or len(parts) < 4:
      return None
    bucket = parts[3]
    rest = parts[4:]
    name = parse.unquote('/'.join(rest[1:])) if rest[:1] == ['o'] else None
    return upload, bucket, rest, name, query

  def _body(self) -> bytes:
    length = int(self.headers.get('Content-Length') or 0)
    return self.rfile.read(length) if length else b''

  def do_GET(self):  # pylint: disable=invalid-name
    self.store.requests.append(f'GET {self.path}')
    route = self._route()
    if route is None:
      return self._json(404, {'error': {'code': 404}})
    _, bucket, rest, name, query = route
    if not rest:  # Bucket metadata (google-cloud-storage's get_bucket).
      return self._json(200, {'kind': 'storage#bucket', 'name': bucket,
                              'id': bucket, 'metageneration': '1',
                              'hierarchicalNamespace': {'enabled': False}})
    if rest == ['o']:
      return self._list(bucket, query)
    entry = self.store.get(bucket, name)
    if 'ifGenerationMatch' in query:
      wanted = int(query['ifGenerationMatch'])
      if wanted == 0:
        return self._reply(412 if entry else 204)
      if entry is None or entry[1] != wanted:
        return self._reply(412)
    if entry is None:
      return self._json(404, {'error': {'code': 404, 'message': 'No such '
                                        f'object: {bucket}/{name}'}})
    if ('ifGenerationNotMatch' in query
        and int(query['ifGenerationNotMatch']) == entry[1]):
      return self._reply(304)
    if query.get('alt') != 'media':
      return self._json(200, _metadata(bucket, name, entry))
    data, generation = entry[0], entry[1]
    headers = {'x-goog-generation': str(generation),
               'x-goog-metageneration': '1'}
    spec = self.headers.get('Range')
    if spec and spec.startswith('bytes='):
      first, _, last = spec[len('bytes='):].partition('-')
      if not first:  # The last N bytes.
        start, stop = max(len(data) - int(last), 0), len(data)
      else:
        start = int(first)
        stop = min(int(last) + 1, len(data)) if last else len(data)
      if start >= len(data) and data:
        return self._reply(416)
      headers['Content-Range'] = f'bytes {start}-{stop - 1}/{len(data)}'
      return self._reply(206, data[start:stop], headers,
                         'application/octet-stream')
    return self._reply(200, data, headers, 'application/octet-stream')

  def _list(self, bucket: str, query: dict[str, str]) -> None:
    prefix = query.get('prefix', '')
    delimiter = query.get('delimiter')
    start = query.get('pageToken') or query.get('startOffset') or ''
    end = query.get('endOffset')
    items, prefixes = [], set()
    for name in self.store.names(bucket, prefix):
      if name < start or (query.get('pageToken') and name == start):
        continue
      if end is not None and name >= end:
        continue
      if delimiter and delimiter in name[len(prefix):]:
        head = name[len(prefix):].split(delimiter, 1)[0]
        prefixes.add(prefix + head + delimiter)
        continue
      entry = self.store.get(bucket, name)
      if entry is not None:
        items.append(_metadata(bucket, name, entry))
    result = {'kind': 'storage#objects', 'items': items}
    if prefixes:
      result['prefixes'] = sorted(prefixes)
    self._json(200, result)

  def do_POST(self):  # pylint: disable=invalid-name
    self.store.requests.append(f'POST {self.path}')
    route = self._route()
    body = self._body()
    if route is None or not route[0] or route[2] != ['o']:
      return self._json(404, {'error': {'code': 404}})
    _, bucket, _, _, query = route
    if query.get('uploadType') != 'media' or not query.get('name'):
      return self._json(400, {'error': {'code': 400, 'message':
                                        'only uploadType=media'}})
    name = query['name']
    entry = self.store.get(bucket, name)
    if 'ifGenerationMatch' in query:
      wanted = int(query['ifGenerationMatch'])
      if (wanted == 0 and entry) or (wanted and (entry is None
                                                 or entry[1] != wanted)):
        return self._reply(412)
    self.store.put(bucket, name, body)
    self._json(200, _metadata(bucket, name, self.store.get(bucket, name)))

  def do_DELETE(self):  # pylint: disable=invalid-name
    self.store.requests.append(f'DELETE {self.path}')
    route = self._route()
    if route is None or route[3] is None:
      return self._json(404, {'error': {'code': 404}})
    _, bucket, _, name, query = route
    entry = self.store.get(bucket, name)
    if entry is None:
      return self._json(404, {'error': {'code': 404}})
    if 'ifGenerationMatch' in query and int(
        query['ifGenerationMatch']) != entry[1]:
      return self._reply(412)
    self.store.delete(bucket, name)
    self._reply(204)


# -- epath: where tf.io.gfile serves gs:// -----------------------------------


def _parse(path) -> tuple[str, str]:
  """'gs://bucket/a/b' -> ('bucket', 'a/b')."""
  path = os.fspath(path)
  if not path.startswith('gs://'):
    raise ValueError(f'not a gs:// path: {path}')
  bucket, _, name = path[len('gs://'):].partition('/')
  return bucket, name.rstrip('/')


class _Upload(io.BytesIO):
  """A file being written: uploaded whole on flush and on close."""

  def __init__(self, store: Store, bucket: str, name: str, initial: bytes):
    super().__init__()
    self.write(initial)
    self._store, self._bucket, self._name = store, bucket, name

  def flush(self):
    super().flush()
    if not self.closed:
      self._store.put(self._bucket, self._name, self.getvalue())

  def close(self):
    if not self.closed:
      self._store.put(self._bucket, self._name, self.getvalue())
    super().close()


class Backend(backend_lib.Backend):
  """epath's view of the store, as tf.io.gfile shows GCS: a directory is a
  name prefix (or an empty 'dir/' marker object, as gfile.makedirs leaves)."""

  def __init__(self, store: Store):
    self.store = store

  # Helpers.
  def _is_object(self, bucket, name) -> bool:
    return bool(name) and self.store.get(bucket, name) is not None

  def _is_dir(self, bucket, name) -> bool:
    if not name:
      return True  # The bucket.
    return bool(self.store.names(bucket, name + '/'))

  # epath's Backend interface.
  def open(self, path, mode):
    bucket, name = _parse(path)
    if 'r' in mode:
      entry = self.store.get(bucket, name)
      if entry is None:
        raise FileNotFoundError(f'{path} not found')
      data = io.BytesIO(entry[0])
      return data if 'b' in mode else io.TextIOWrapper(data, encoding='utf-8')
    initial = b''
    if 'a' in mode:
      entry = self.store.get(bucket, name)
      initial = entry[0] if entry else b''
    raw = _Upload(self.store, bucket, name, initial)
    if 'b' in mode:
      return raw
    return io.TextIOWrapper(raw, encoding='utf-8', write_through=True)

  def exists(self, path) -> bool:
    bucket, name = _parse(path)
    return self._is_object(bucket, name) or self._is_dir(bucket, name)

  def isdir(self, path) -> bool:
    return self._is_dir(*_parse(path))

  def listdir(self, path) -> list[str]:
    bucket, name = _parse(path)
    if not self._is_dir(bucket, name):
      raise FileNotFoundError(f'{path} is not a directory')
    prefix = f'{name}/' if name else ''
    children = set()
    for child in self.store.names(bucket, prefix):
      head = child[len(prefix):].split('/', 1)[0]
      if head:
        children.add(head)
    return sorted(children)

  def glob(self, path) -> list[str]:
    bucket, pattern = _parse(path)
    found = set()
    depth = pattern.count('/')
    for name in self.store.names(bucket):
      parts = name.split('/')
      for i in range(len(parts)):
        candidate = '/'.join(parts[:i + 1])
        if candidate.count('/') == depth and fnmatch.fnmatchcase(
            candidate, pattern):
          found.add(f'gs://{bucket}/{candidate}')
    return sorted(found)

  def walk(self, top, *, top_down=True, on_error=None):
    del on_error
    dirs, files = [], []
    for child in self.listdir(top):
      (dirs if self.isdir(posixpath.join(os.fspath(top), child))
       else files).append(child)
    if top_down:
      yield os.fspath(top), dirs, files
    for child in dirs:
      yield from self.walk(posixpath.join(os.fspath(top), child),
                           top_down=top_down)
    if not top_down:
      yield os.fspath(top), dirs, files

  def makedirs(self, path, *, exist_ok=False, mode=None):
    del mode
    bucket, name = _parse(path)
    if self._is_object(bucket, name):
      raise FileExistsError(f'{path} is a file')
    if self._is_dir(bucket, name):
      if not exist_ok:
        raise FileExistsError(f'{path} exists')
      return
    self.store.put(bucket, name + '/', b'')  # gfile's directory marker.

  def mkdir(self, path, *, exist_ok=False, mode=None):
    self.makedirs(path, exist_ok=exist_ok, mode=mode)

  def rmtree(self, path) -> None:
    bucket, name = _parse(path)
    names = self.store.names(bucket, name + '/')
    if not names and not self._is_object(bucket, name):
      raise FileNotFoundError(f'{path} not found')
    for child in names:
      self.store.delete(bucket, child)

  def remove(self, path) -> None:
    bucket, name = _parse(path)
    if not self.store.delete(bucket, name):
      raise FileNotFoundError(f'{path} not found')

  def _move(self, path, dst, overwrite: bool) -> None:
    bucket, name = _parse(path)
    dst_bucket, dst_name = _parse(dst)
    if not overwrite and self.exists(dst):
      raise FileExistsError(f'{dst} exists')
    if self._is_object(bucket, name):  # A file: copy, then delete.
      self.store.put(dst_bucket, dst_name, self.store.get(bucket, name)[0])
      self.store.delete(bucket, name)
      return
    names = self.store.names(bucket, name + '/')
    if not names:
      raise FileNotFoundError(f'{path} not found')
    for child in names:  # A directory: each object in turn.
      target = dst_name + child[len(name):]
      self.store.put(dst_bucket, target, self.store.get(bucket, child)[0])
      self.store.delete(bucket, child)

  def rename(self, path, dst) -> None:
    self._move(path, dst, overwrite=False)

  def replace(self, path, dst) -> None:
    self._move(path, dst, overwrite=True)

  def copy(self, path, dst, overwrite) -> None:
    if not overwrite and self.exists(dst):
      raise FileExistsError(f'{dst} exists')
    bucket, name = _parse(path)
    entry = self.store.get(bucket, name)
    if entry is None:
      raise FileNotFoundError(f'{path} not found')
    self.store.put(*_parse(dst), entry[0])

  def stat(self, path) -> stat_utils.StatResult:
    bucket, name = _parse(path)
    entry = self.store.get(bucket, name) if name else None
    if entry is None:
      if not self._is_dir(bucket, name):
        raise FileNotFoundError(f'{path} not found')
      return stat_utils.StatResult(is_directory=True, length=0, mtime=0,
                                   owner=None, group=None, mode=None)
    return stat_utils.StatResult(is_directory=False, length=len(entry[0]),
                                 mtime=int(entry[2]), owner=None, group=None,
                                 mode=None)


# -- Together ----------------------------------------------------------------


class FakeGcs:
  """The store, its HTTP server (started) and its epath backend."""

  def __init__(self):
    self.store = Store()
    handler = type('Handler', (_Handler,), {'store': self.store})
    self.server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    self.server.daemon_threads = True
    self.url = f'http://127.0.0.1:{self.server.server_address[1]}'
    self._thread = threading.Thread(target=self.server.serve_forever,
                                    daemon=True)
    self._thread.start()
    self.backend = Backend(self.store)

  def environment(self) -> dict[str, str]:
    """The variables that send tensorstore and google-cloud-storage here."""
    return {'TENSORSTORE_GCS_HTTP_URL': self.url,
            'TENSORSTORE_GCS_HTTP_VERSION': '1',
            'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'fake-token',
            'STORAGE_EMULATOR_HOST': self.url,
            'GOOGLE_CLOUD_PROJECT': 'fake-project'}

  def files(self, url: str) -> list[str]:
    """The object names under gs://bucket/prefix, relative to it."""
    bucket, name = _parse(url)
    prefix = f'{name}/' if name else ''
    return [n[len(prefix):] for n in self.store.names(bucket, prefix)]

  def close(self) -> None:
    self.server.shutdown()
    self.server.server_close()


@contextlib.contextmanager
def install_epath_backend(backend: Backend) -> Iterator[None]:
  """gs:// paths of epath.Path go to `backend` (where tf.io.gfile was)."""
  original = backend_lib.tf_backend
  backend_lib.tf_backend = backend
  try:
    yield
  finally:
    backend_lib.tf_backend = original


def path(url: str) -> epath.Path:
  return epath.Path(url)
