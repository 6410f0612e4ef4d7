"""Rule tables: a checkpoint that does not fit stops, naming what and why."""

import re

import numpy as np
import pytest

from flamingo_jax.weights import hf_clip
from flamingo_jax.weights import mapping
from flamingo_jax.weights import tensors as tensors_lib
from flamingo_jax.weights import timm_nfnet
from tests.weights import fixtures


@pytest.fixture(name='arrays', scope='module')
def _arrays() -> dict[str, np.ndarray]:
  store = hf_clip.read(fixtures.path('hf_clip'))
  return {name: np.asarray(store[name]) for name in store}


@pytest.fixture(name='config', scope='module')
def _config() -> dict:
  return hf_clip.config_from(fixtures.path('hf_clip'))


def _convert(arrays, config):
  store = tensors_lib.from_arrays(arrays, source='edited.safetensors')
  return hf_clip.to_params(store, config), store


def test_fitting_checkpoint_fills_every_parameter_once(arrays, config):
  params, store = _convert(arrays, config)
  assert all(count == 1 for count in store.reads.values())
  # The one ignored tensor (none here) aside, every tensor was read.
  assert set(store.reads) == set(arrays)
  q = params['vision_encoder/transformer/attention/query']['w']
  np.testing.assert_array_equal(
      q[1], arrays['vision_model.encoder.layers.1.self_attn.q_proj.weight'].T)


def test_missing_tensor(arrays, config):
  edited = dict(arrays)
  del edited['vision_model.encoder.layers.2.mlp.fc1.bias']
  with pytest.raises(mapping.CheckpointMismatchError) as error:
    _convert(edited, config)
  assert re.search(r'parameter vision_encoder/transformer/mlp/hidden/b '
                   r'\(3, 32\): no tensor fills layers \[2\]',
                   str(error.value))
  assert 'nothing was written' in str(error.value)


def test_extra_tensor(arrays, config):
  edited = dict(arrays, **{'vision_model.encoder.layers.0.extra.weight':
                           np.zeros((4, 4), np.float32)})
  with pytest.raises(mapping.CheckpointMismatchError,
                     match=r'tensor vision_model\.encoder\.layers\.0\.extra'
                     r'\.weight \(4, 4\): no parameter'):
    _convert(edited, config)


def test_wrong_shape_names_both_shapes(arrays, config):
  edited = dict(arrays)
  name = 'vision_model.encoder.layers.1.self_attn.k_proj.weight'
  edited[name] = np.zeros((16, 12), np.float32)
  with pytest.raises(mapping.CheckpointMismatchError) as error:
    _convert(edited, config)
  message = str(error.value)
  assert (f'tensor {name} has shape (16, 12) (-> (12, 16)) but '
          'vision_encoder/transformer/attention/key/w needs (16, 16) per '
          'layer') in message


def test_extra_layer(arrays, config):
  edited = dict(arrays, **{
      'vision_model.encoder.layers.3.layer_norm1.weight':
          np.ones(16, np.float32)})
  with pytest.raises(mapping.CheckpointMismatchError,
                     match='is layer 3 but .*ln_1/scale .* has 3 layers'):
    _convert(edited, config)


def test_wrong_family(arrays):
  timm = timm_nfnet.read(fixtures.path('timm_nfnet', 'model.safetensors'))
  with pytest.raises(ValueError, match='Hugging Face CLIP vision tower'):
    hf_clip.to_params(timm, hf_clip.config_from(fixtures.path('hf_clip')))
  # NFNet rules over CLIP tensors: every tensor and parameter is named.
  store = tensors_lib.from_arrays(arrays, source='clip.safetensors')
  config = timm_nfnet.config_from(
      fixtures.path('timm_nfnet', 'model.safetensors'))
  with pytest.raises(mapping.CheckpointMismatchError,
                     match=r'clip\.safetensors does not fit .* as a timm '
                     r'NFNet \(\d+ problems') as error:
    timm_nfnet.to_params(store, config)
  assert '... and' in str(error.value)  # Long lists are cut.


def test_nothing_is_read_before_the_plan_passes(arrays, config):
  edited = dict(arrays)
  del edited['vision_model.post_layernorm.bias']
  store = tensors_lib.from_arrays(edited)
  with pytest.raises(mapping.CheckpointMismatchError):
    hf_clip.to_params(store, config)
  assert not store.reads


def test_two_tensors_for_one_parameter():
  rules = [mapping.Rule(r'a', 'm/w'), mapping.Rule(r'b', 'm/w')]
  abstract = {'m': {'w': np.zeros(2)}}
  with pytest.raises(mapping.CheckpointMismatchError,
                     match=r"m/w is filled by 2 tensors: \['a', 'b'\]"):
    mapping.map_tensors({'a': np.ones(2), 'b': np.ones(2)}, rules, abstract)


def test_ambiguous_rules_are_an_importer_bug():
  rules = [mapping.Rule(r'a.*', 'm/w'), mapping.Rule(r'.*b', 'm/v')]
  abstract = {'m': {'w': np.zeros(2), 'v': np.zeros(2)}}
  with pytest.raises(mapping.CheckpointMismatchError, match='importer bug'):
    mapping.map_tensors({'ab': np.ones(2)}, rules, abstract)


def test_output_dtype_and_split():
  rules = [mapping.Rule(r'qkv', ('m/q', 'm/k', 'm/v'),
                        mapping.split_rows(3, mapping.transpose))]
  abstract = {'m': {n: np.zeros((2, 1)) for n in 'qkv'}}
  fused = np.arange(6, dtype=np.float16).reshape(3, 2) / 8
  params = mapping.map_tensors({'qkv': fused}, rules, abstract,
                               dtype=np.float32)
  assert params['m']['k'].dtype == np.float32
  np.testing.assert_array_equal(params['m']['k'], fused[1:2].T)
