"""Checkpoint readers: formats, dtypes, damaged files, laziness, and
pickles that must never run code."""

import json
import os
import pickle
import struct
import zipfile

import ml_dtypes
import numpy as np
import pytest

from flamingo_jax.weights import haiku_pickle
from flamingo_jax.weights import safe_pickle
from flamingo_jax.weights import safetensors_file
from flamingo_jax.weights import tensors as tensors_lib
from flamingo_jax.weights import torch_file
from tests.weights import fixtures


def _arrays() -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  x = rng.standard_normal((3, 5)).astype(np.float32)
  return {
      'f32': x, 'f16': x.astype(np.float16),
      'bf16': x.astype(ml_dtypes.bfloat16),
      'i64': np.arange(6, dtype=np.int64).reshape(2, 3),
      'mask': np.array([True, False]), 'scalar': np.array(2.5, np.float32),
      'empty': np.zeros((0, 4), np.float32),
  }


def test_safetensors_round_trip(tmp_path):
  path = str(tmp_path / 'a.safetensors')
  arrays = _arrays()
  safetensors_file.write(path, arrays, metadata={'format': 'pt'})
  store = safetensors_file.read(path)
  assert list(store) == list(arrays)  # File order.
  for name, array in arrays.items():
    assert store.info(name).dtype == array.dtype
    assert store.info(name).shape == array.shape
    np.testing.assert_array_equal(np.asarray(store[name]), array)


def test_safetensors_matches_the_reference_library(tmp_path):
  safetensors_numpy = pytest.importorskip('safetensors.numpy')
  path = str(tmp_path / 'ref.safetensors')
  arrays = {k: v for k, v in _arrays().items() if k != 'bf16'}
  safetensors_numpy.save_file(arrays, path)
  store = safetensors_file.read(path)
  for name, array in arrays.items():
    np.testing.assert_array_equal(np.asarray(store[name]), array)


def _write_raw(path, header: bytes, data: bytes = b'', length=None) -> None:
  with open(path, 'wb') as f:
    f.write(struct.pack('<Q', len(header) if length is None else length))
    f.write(header)
    f.write(data)


@pytest.mark.parametrize('header,data,length,message', [
    (b'', b'', 0, 'not JSON'),
    (b'{"a": 1', b'', None, 'not JSON'),
    (b'[]', b'', None, 'not a JSON object'),
    (b'{}', b'', 10 ** 9, 'does not fit the file'),
    (b'{"w": {"dtype": "F7", "shape": [1], "data_offsets": [0, 4]}}',
     b'\0' * 4, None, "'w' has unknown dtype 'F7'"),
    (b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}',
     b'\0' * 4, None, "'w' has data_offsets"),
    (b'{"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}',
     b'\0' * 8, None, "'w' .*needs 12 bytes"),
    (b'{"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}',
     b'\0' * 4, None, "'w' has a bad shape"),
    (b'{"w": {"shape": [1]}}', b'', None, "'w' must have dtype"),
])
def test_damaged_safetensors_header(tmp_path, header, data, length, message):
  path = str(tmp_path / 'bad.safetensors')
  _write_raw(path, header, data, length)
  with pytest.raises(ValueError, match='damaged safetensors header: .*' +
                     message):
    safetensors_file.read(path)


def test_too_short_safetensors(tmp_path):
  path = tmp_path / 'short.safetensors'
  path.write_bytes(b'\x01\x02')
  with pytest.raises(ValueError, match='fewer than the 8-byte'):
    safetensors_file.read(str(path))


def _rss_mb() -> float:
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith('VmRSS:'):
        return int(line.split()[1]) / 1024
  return 0.0


def test_safetensors_reads_only_what_is_touched(tmp_path):
  """A 4 GiB tensor (a sparse file) costs nothing until read."""
  path = str(tmp_path / 'big.safetensors')
  big = 4 << 30
  header = json.dumps({
      'small': {'dtype': 'F32', 'shape': [4], 'data_offsets': [0, 16]},
      'big': {'dtype': 'F32', 'shape': [big // 4],
              'data_offsets': [16, 16 + big]}}).encode()
  small = np.arange(4, dtype=np.float32)
  _write_raw(path, header, small.tobytes())
  with open(path, 'r+b') as f:
    f.truncate(8 + len(header) + 16 + big)  # Sparse: no blocks written.
  before = _rss_mb()
  store = safetensors_file.read(path)
  assert store.info('big').shape == (big // 4,) and 'big' in store
  np.testing.assert_array_equal(store['small'], small)
  assert _rss_mb() - before < 100
  assert dict(store.reads) == {'small': 1}


def test_sharded_index_must_agree_with_its_shards(tmp_path):
  safetensors_file.write(str(tmp_path / 's1.safetensors'),
                         {'a': np.zeros(2, np.float32)})
  safetensors_file.write(str(tmp_path / 's2.safetensors'),
                         {'b': np.zeros(2, np.float32)})
  index = tmp_path / 'model.safetensors.index.json'
  index.write_text(json.dumps({'weight_map': {'a': 's2.safetensors',
                                              'b': 's2.safetensors'}}))
  with pytest.raises(ValueError, match='disagree'):
    safetensors_file.read(str(index))
  index.write_text(json.dumps({'weight_map': {'a': 's1.safetensors',
                                              'b': 's3.safetensors'}}))
  with pytest.raises(FileNotFoundError, match='s3.safetensors'):
    safetensors_file.read(str(index))


# -- PyTorch files -------------------------------------------------------------


def test_torch_zip_and_legacy_formats_agree():
  zipped = torch_file.read(
      fixtures.path('open_clip', 'open_clip_pytorch_model.bin'),
      backend='builtin')
  legacy = torch_file.read(fixtures.path('open_clip', 'legacy.pt'),
                           backend='builtin')
  assert list(zipped) == list(legacy)
  assert 'visual.transformer.resblocks.2.attn.in_proj_weight' in zipped
  for name in zipped:
    assert zipped.info(name).dtype == np.float16
    np.testing.assert_array_equal(zipped[name], legacy[name])


def test_torch_backend_agrees_with_builtin():
  pytest.importorskip('torch')
  for file in ('open_clip_pytorch_model.bin', 'legacy.pt'):
    path = fixtures.path('open_clip', file)
    ours = torch_file.read(path, backend='builtin')
    theirs = torch_file.read(path, backend='torch')
    assert list(ours) == list(theirs)
    for name in ours:
      np.testing.assert_array_equal(ours[name], theirs[name])


@pytest.mark.parametrize('backend', ['builtin', 'auto'])
def test_torchscript_archive_reads_as_its_state_dict(backend):
  """OpenAI's CLIP `.pt` layout: the tensors under the state dict's names,
  by the builtin reader whatever the backend (no TorchScript code runs)."""
  path = fixtures.path('open_clip', fixtures.OPENAI_TORCHSCRIPT)
  assert torch_file.is_torchscript(path)
  script = torch_file.read(path, backend=backend)
  plain = torch_file.read(
      fixtures.path('open_clip', 'open_clip_pytorch_model.bin'),
      backend='builtin')
  assert sorted(script) == sorted(plain)
  for name in plain:
    assert script.info(name).dtype == np.float16
    np.testing.assert_array_equal(script[name], plain[name])


def test_torchscript_archive_equals_torch_jit_load():
  torch = pytest.importorskip('torch')
  path = fixtures.path('open_clip', fixtures.OPENAI_TORCHSCRIPT)
  theirs = torch.jit.load(path, map_location='cpu').state_dict()
  ours = torch_file.read(path, backend='torch')
  assert sorted(ours) == sorted(theirs)
  for name, tensor in theirs.items():
    np.testing.assert_array_equal(ours[name], tensor.numpy())


def test_malicious_torchscript_is_refused_and_runs_nothing(tmp_path):
  marker = tmp_path / 'pwned'
  path = str(tmp_path / 'ViT-L-14.pt')
  _torch_zip(path, pickle.dumps({'w': _Exploit(str(marker))}, protocol=2))
  with zipfile.ZipFile(path, 'a') as archive:
    archive.writestr('archive/code/__torch__.py', 'class M: ...\n')
  assert torch_file.is_torchscript(path)
  for backend in ('builtin', 'auto'):
    with pytest.raises(safe_pickle.RefusedGlobalError,
                       match=r'global (posix|os|nt)\.system'):
      torch_file.read(path, backend=backend)
  assert not marker.exists()


def test_torch_zip_maps_only_touched_storages(monkeypatch):
  path = fixtures.path('open_clip', 'open_clip_pytorch_model.bin')
  store = torch_file.read(path, backend='builtin')
  mapped = []
  original = np.memmap

  def recording_memmap(*args, **kwargs):
    mapped.append(kwargs['offset'])
    return original(*args, **kwargs)

  monkeypatch.setattr(np, 'memmap', recording_memmap)
  name = 'visual.conv1.weight'
  assert store[name].shape == store.info(name).shape
  assert len(mapped) == 1 and len(store) > 50
  assert dict(store.reads) == {name: 1}


def _torch_zip(path: str, payload: bytes) -> None:
  """A file laid out as torch.save's zip, with `payload` as data.pkl."""
  with zipfile.ZipFile(path, 'w') as archive:
    archive.writestr('archive/data.pkl', payload)
    archive.writestr('archive/version', '3\n')


class _Exploit:
  """Pickles as a call to os.system: what a malicious checkpoint holds."""

  def __init__(self, marker: str):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f'touch {self.marker}',))


@pytest.mark.parametrize('layout', ['zip', 'legacy', 'haiku'])
def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path, layout):
  marker = tmp_path / 'pwned'
  payload = pickle.dumps({'weight': _Exploit(str(marker))}, protocol=2)
  path = str(tmp_path / ('model.npz' if layout == 'haiku' else 'model.bin'))
  if layout == 'zip':
    _torch_zip(path, payload)
  else:
    with open(path, 'wb') as f:
      f.write(payload)
  reader = (haiku_pickle.read if layout == 'haiku'
            else lambda p: torch_file.read(p, backend='builtin'))
  with pytest.raises(safe_pickle.RefusedGlobalError,
                     match=r'global (posix|os|nt)\.system'):
    reader(path)
  assert not marker.exists()


def test_malicious_zip_is_refused_by_torch_too(tmp_path):
  pytest.importorskip('torch')
  marker = tmp_path / 'pwned'
  path = str(tmp_path / 'model.bin')
  _torch_zip(path, pickle.dumps({'w': _Exploit(str(marker))}, protocol=2))
  with pytest.raises(safe_pickle.RefusedGlobalError, match='refused'):
    torch_file.read(path, backend='torch')
  assert not marker.exists()


def test_object_arrays_are_refused(tmp_path):
  path = str(tmp_path / 'objects.npz')
  with open(path, 'wb') as f:
    pickle.dump({'m': {'w': np.array([{'a': 1}], dtype=object)}}, f)
  with pytest.raises(ValueError, match='object dtype'):
    haiku_pickle.read(path)


def test_haiku_pickle_with_old_containers(tmp_path):
  """Old Haiku pickles hold FlatMapping(dict); they read as plain dicts."""
  params = {'NFNet/~/stem_conv0': {'w': np.ones((3, 3, 3, 16), np.float32),
                                   'gain': np.float32(2.0)}}
  body = pickle.dumps(params, protocol=2)[2:-1]  # Without PROTO and STOP.
  # FlatMapping(params), spelt by hand: pickle would import the real class.
  payload = (b'\x80\x02' + b'chaiku._src.data_structures\nFlatMapping\n' +
             body + pickle.TUPLE1 + pickle.REDUCE + pickle.STOP)
  path = tmp_path / 'F0_haiku.npz'
  path.write_bytes(payload)
  store = tensors_lib.open_path(str(path))
  assert sorted(store) == ['NFNet/~/stem_conv0/gain', 'NFNet/~/stem_conv0/w']
  assert store['NFNet/~/stem_conv0/gain'] == 2.0
  np.testing.assert_array_equal(store['NFNet/~/stem_conv0/w'],
                                params['NFNet/~/stem_conv0']['w'])


def test_true_npz_is_read_lazily(tmp_path):
  path = str(tmp_path / 'flat.npz')
  np.savez(path, **{'a/w': np.ones(3, np.float32), 'b/w': np.zeros(2)})
  store = haiku_pickle.read(path)
  assert store.info('a/w').shape == (3,) and not store.reads
  np.testing.assert_array_equal(store['a/w'], np.ones(3))
  assert dict(store.reads) == {'a/w': 1}


def test_open_path_rejects_unknown_formats(tmp_path):
  path = tmp_path / 'weights.h5'
  path.write_bytes(b'junk')
  with pytest.raises(ValueError, match='Cannot tell the format'):
    tensors_lib.open_path(str(path))
  with pytest.raises(FileNotFoundError, match='holds none of'):
    tensors_lib.open_path(str(tmp_path))
