"""A fake Cloud Storage in one process, for gs:// workdirs without a network.

One in-memory bucket store, reached the ways a pod reaches real GCS:
  HTTP     the GCS JSON API subset that tensorstore's `gcs` driver (orbax's
           array data), google-cloud-storage (orbax's bucket lookup) and
           google-cloud-cpp (ArrayRecord's reader: the datasets) speak,
           served on 127.0.0.1; `FakeGcs.environment()` points them at it
           (TENSORSTORE_GCS_HTTP_URL, STORAGE_EMULATOR_HOST,
           CLOUD_STORAGE_EMULATOR_ENDPOINT) with a fixed token
           (GOOGLE_AUTH_TOKEN_FOR_TESTING).
  HTTPS    TensorFlow's own client (tf.io.gfile in C++: TensorBoard's event
           files) has no endpoint variable; its libcurl takes `https_proxy`
           and `CURL_CA_BUNDLE`, so a CONNECT proxy here ends the tunnel
           itself and serves the same API over TLS, with a self-signed
           certificate for Google's storage hosts (`_Tunnel`).
  epath    an `etils.epath` backend with object-store semantics (no real
           directories, renames are copies, no append in place), put where
           epath keeps tf.io.gfile, the backend it uses for gs:// when
           TensorFlow is installed (`install_epath_backend`); in-process, so
           the many small files of a workdir cost no HTTP round trips.
Every `gs://bucket/...` path string thus travels unchanged through
flamingo_jax.fs, orbax, tensorstore, TFDS and TensorFlow; only the transport
under them is fake.
"""

import contextlib
import datetime
import fnmatch
import http.server
import io
import json
import os
import posixpath
import shutil
import socketserver
import ssl
import tempfile
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
    self.sessions: list[tuple[str, str]] = []  # Resumable uploads' targets.

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
    if self.headers.get('Host', '').startswith('storage.googleapis.com'):
      # TensorFlow reads object data from the XML host: /bucket/name.
      bucket, _, name = url.path[1:].partition('/')
      return False, bucket, ['o', name], parse.unquote(name), {
          **query, 'alt': 'media'}
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
    if self.headers.get('Transfer-Encoding', '').lower() == 'chunked':
      chunks = []  # TensorFlow's uploads: '<hex size>\r\n<data>\r\n'... '0'.
      while size := int(self.rfile.readline().split(b';')[0], 16):
        chunks.append(self.rfile.read(size))
        self.rfile.readline()
      while self.rfile.readline() not in (b'\r\n', b'\n', b''):
        pass  # Trailers.
      return b''.join(chunks)
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
    if query.get('uploadType') == 'resumable' and query.get('name'):
      return self._start_resumable(bucket, query['name'])
    if query.get('uploadType') != 'media' or not query.get('name'):
      return self._json(400, {'error': {'code': 400, 'message':
                                        'only uploadType=media|resumable'}})
    name = query['name']
    entry = self.store.get(bucket, name)
    if 'ifGenerationMatch' in query:
      wanted = int(query['ifGenerationMatch'])
      if (wanted == 0 and entry) or (wanted and (entry is None
                                                 or entry[1] != wanted)):
        return self._reply(412)
    self.store.put(bucket, name, body)
    self._json(200, _metadata(bucket, name, self.store.get(bucket, name)))

  # Resumable uploads (TensorFlow's client): POST opens a session at the
  # Location it is given, one PUT with the whole body completes it (TF
  # uploads a file whole at each flush), `Content-Range: bytes */N` asks.
  def _start_resumable(self, bucket: str, name: str) -> None:
    with self.store.lock:
      self.store.sessions.append((bucket, name))
      upload_id = len(self.store.sessions) - 1
    host = self.headers.get('Host', 'www.googleapis.com')
    self._reply(200, headers={
        'Location': f'https://{host}/upload/storage/v1/b/{bucket}/o'
                    f'?uploadType=resumable&upload_id={upload_id}'})

  def do_PUT(self):  # pylint: disable=invalid-name
    content_range = self.headers.get('Content-Range', '')
    self.store.requests.append(f'PUT {self.path} {content_range}')
    body = self._body()
    query = dict(parse.parse_qsl(parse.urlsplit(self.path).query))
    if 'upload_id' not in query:
      return self._json(404, {'error': {'code': 404}})
    bucket, name = self.store.sessions[int(query['upload_id'])]
    if content_range.startswith('bytes */'):  # A status query.
      if self.store.get(bucket, name) is None:
        return self._reply(308)  # Nothing received yet.
    elif content_range.rpartition('/')[2] != str(len(body)):
      return self._reply(400)  # Only whole-body uploads here.
    else:
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


# -- HTTPS: TensorFlow's own GCS client ---------------------------------------


def _self_signed(directory: str) -> tuple[str, str]:
  """A certificate for Google's storage hosts, and its key (PEM files)."""
  # pylint: disable=g-import-not-at-top
  from cryptography import x509
  from cryptography.hazmat.primitives import hashes
  from cryptography.hazmat.primitives import serialization
  from cryptography.hazmat.primitives.asymmetric import ec
  from cryptography.x509.oid import NameOID
  # pylint: enable=g-import-not-at-top
  key = ec.generate_private_key(ec.SECP256R1())
  name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, 'fake gcs')])
  now = datetime.datetime.now(datetime.timezone.utc)
  cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
          .public_key(key.public_key())
          .serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(days=1))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.SubjectAlternativeName(
              [x509.DNSName(h) for h in TLS_HOSTS]), critical=False)
          .add_extension(x509.BasicConstraints(ca=True, path_length=None),
                         critical=True)
          .sign(key, hashes.SHA256()))
  cert_path = os.path.join(directory, 'cert.pem')
  key_path = os.path.join(directory, 'key.pem')
  with open(cert_path, 'wb') as f:
    f.write(cert.public_bytes(serialization.Encoding.PEM))
  with open(key_path, 'wb') as f:
    f.write(key.private_bytes(serialization.Encoding.PEM,
                              serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))
  return cert_path, key_path


TLS_HOSTS = ('www.googleapis.com', 'storage.googleapis.com')


class _Tunnel(socketserver.StreamRequestHandler):
  """An HTTPS proxy that is its own far end: TensorFlow's GCS client has its
  endpoints built in (https://www.googleapis.com, storage.googleapis.com),
  but its libcurl honours `https_proxy` and `CURL_CA_BUNDLE`; so the CONNECT
  is accepted and the tunnel served here, over TLS with `_self_signed`."""

  def handle(self):
    request = self.rfile.readline()
    while self.rfile.readline() not in (b'\r\n', b'\n', b''):
      pass
    if not request.startswith(b'CONNECT '):
      self.wfile.write(b'HTTP/1.1 405 Method Not Allowed\r\n'
                       b'Content-Length: 0\r\n\r\n')
      return
    self.wfile.write(b'HTTP/1.1 200 Connection established\r\n\r\n')
    self.wfile.flush()  # Curl sends its TLS hello only after this.
    tls = self.server.context.wrap_socket(self.connection, server_side=True)
    self.server.handler(tls, self.client_address, self.server)


# -- Together ----------------------------------------------------------------


class FakeGcs:
  """The store, its HTTP server (started) and its epath backend."""

  def __init__(self):
    self.store = Store()
    handler = type('Handler', (_Handler,), {'store': self.store})
    self.server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    self.server.daemon_threads = True
    self.url = f'http://127.0.0.1:{self.server.server_address[1]}'
    self._certs = tempfile.mkdtemp(prefix='fake_gcs_')
    self.cert, key = _self_signed(self._certs)
    self.proxy = socketserver.ThreadingTCPServer(('127.0.0.1', 0), _Tunnel)
    self.proxy.daemon_threads = True
    self.proxy.handler = handler
    self.proxy.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    self.proxy.context.load_cert_chain(self.cert, key)
    self._threads = [threading.Thread(target=s.serve_forever, daemon=True)
                     for s in (self.server, self.proxy)]
    for thread in self._threads:
      thread.start()
    self.backend = Backend(self.store)

  def environment(self) -> dict[str, str]:
    """The variables that send each GCS client here: tensorstore (orbax's
    arrays), google-cloud-storage (orbax's bucket lookup), google-cloud-cpp
    (ArrayRecord's reader), TensorFlow's own (tf.io.gfile: TensorBoard's
    event files; through the HTTPS proxy)."""
    return {'TENSORSTORE_GCS_HTTP_URL': self.url,
            'TENSORSTORE_GCS_HTTP_VERSION': '1',
            'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'fake-token',
            'STORAGE_EMULATOR_HOST': self.url,
            'CLOUD_STORAGE_EMULATOR_ENDPOINT': self.url,
            'GOOGLE_CLOUD_PROJECT': 'fake-project',
            'https_proxy': f'http://127.0.0.1:{self.proxy.server_address[1]}',
            'no_proxy': '127.0.0.1,localhost',
            'CURL_CA_BUNDLE': self.cert}

  def files(self, url: str) -> list[str]:
    """The object names under gs://bucket/prefix, relative to it."""
    bucket, name = _parse(url)
    prefix = f'{name}/' if name else ''
    return [n[len(prefix):] for n in self.store.names(bucket, prefix)]

  def close(self) -> None:
    for server in (self.server, self.proxy):
      server.shutdown()
      server.server_close()
    shutil.rmtree(self._certs, ignore_errors=True)


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
