"""IDEFICS import: parity with transformers' IdeficsForVisionText2Text.

testdata/idefics*/ (make_idefics.py) hold what a user downloads, at a tiny
random size: the published folder (config.json, sharded BF16 safetensors
with model.safetensors.index.json, tokenizer.json) and IDEFICS's own fp32
logits on a prompt with two images and its greedy `generate` continuation.
Here the convert CLI turns a folder into a workdir, `flamingo_jax.load`
loads it, and its logits and `generate` are compared, without torch; with
torch, also against the live model.
"""

import json
import os
import shutil

import numpy as np
import pytest

from flamingo_jax.inference import prompts
from flamingo_jax.models import flamingo
from flamingo_jax.weights import convert
from flamingo_jax.weights import idefics
from flamingo_jax.weights import tensors as tensors_lib
from tests.weights import converted
from tests.weights import fixtures
from tests.weights import test_parity

pytest.importorskip('tokenizers')

DATA = fixtures.path('idefics')
NAMES = sorted(fixtures.IDEFICSES)


def _args(workdir, data=DATA):
  return ['idefics', data, '--workdir', str(workdir), '--max_len', '64']


@pytest.fixture(name='name', scope='module', params=NAMES)
def name_fixture(request):
  return request.param


@pytest.fixture(name='expected', scope='module')
def expected_fixture(name):
  return fixtures.load_expected(name)


@pytest.fixture(name='model', scope='module')
def model_fixture(tmp_path_factory, name):
  return converted.convert_and_load(
      tmp_path_factory, name, lambda w: _args(w, fixtures.path(name)))


@pytest.fixture(name='ours', scope='module')
def ours_fixture(model, expected):
  """Our fp32 logits [L, V + 1] on fixtures.IDEFICS_PROMPT, its encoding."""
  return converted.prompt_logits(model, fixtures.IDEFICS_PROMPT,
                                 expected['images'])


def test_config_is_idefics(model, name):
  config = model.model_config
  overrides, _ = fixtures.IDEFICSES[name]
  xattn, resampler = config['xattn'], config['resampler']
  assert (xattn['placement'], xattn['every'], xattn['norm'],
          xattn['ffw_activation'], xattn['visual_norm']) == (
              'interleaved', 2, 'rms_norm', 'swiglu', False)
  assert xattn['alpha_type'] == overrides['alpha_type']
  assert xattn['qk_norm'] == ('rms_norm' if overrides['qk_layer_norms']
                              else None)
  assert resampler['qk_norm'] == overrides['perceiver_qk_norms']
  assert resampler['ffw_activation'] == 'relu'
  gates = np.asarray(model.params['gated_xattn/block']['attn_gate'])
  width = fixtures.IDEFICS_CONFIG['hidden_size']
  assert gates.shape == ((2, width) if overrides['alpha_type'] == 'vector'
                         else (2,))
  assert np.all(gates != 0)  # Open: the images matter.
  vision = config['vision']
  assert (vision['tokens'], vision['keep_class_token']) == ('last_block',
                                                            True)
  tokenizer = model.tokenizer
  # 40 words, IDEFICS's 2 additional tokens, then <end_of_utterance> added.
  assert (tokenizer.image_id, tokenizer.eoc_id, tokenizer.pad_id,
          tokenizer.vocab_size) == (41, 42, 0, 43)
  assert tokenizer.encode(idefics.FAKE_IMAGE) == [40]
  assert config['lm']['vocab_size'] == 43


def test_logits_match_idefics(ours, expected):
  ours, encoded = ours
  np.testing.assert_array_equal(encoded.tokens, expected['prompt_ids'])
  # phi is the processor's image_attention_mask.
  mask = expected['image_attention_mask']  # [L, N]
  phi = np.where(mask.any(-1), mask.argmax(-1) + 1, 0)
  np.testing.assert_array_equal(encoded.media_index, phi)
  vocab = expected['logits'].shape[-1]
  assert test_parity.relative_difference(
      ours[:, :vocab], expected['logits']) <= test_parity.TOLERANCE


def test_plain_image_markers_get_the_processors_fake_tokens(model, expected):
  """`<image>` alone (flamingo_jax's prompts) is written as IDEFICS's
  processor writes it; two images in a row share a fake token."""
  plain = fixtures.IDEFICS_PROMPT.replace(idefics.FAKE_IMAGE, '')
  assert '<fake' not in plain
  encoded = prompts.encode(model.tokenizer, plain, list(expected['images']),
                           model.image_size)
  np.testing.assert_array_equal(encoded.tokens, expected['prompt_ids'])
  assert model.tokenizer.encode('a<image><image>b') == [5, 40, 41, 40, 41,
                                                         40, 0]


def test_load_generates_idefics_greedy_tokens(model, expected):
  """Convert, load, generate: the tokens of IDEFICS's greedy `generate`."""
  text = model.generate(list(expected['images']), fixtures.IDEFICS_PROMPT,
                        max_new_tokens=fixtures.IDEFICS_NEW_TOKENS)
  assert text == str(expected['greedy_text'])
  assert model.tokenizer.encode(text) == expected['greedy'].tolist()


def test_live_idefics_matches(ours, expected, name):
  """With torch: the live IdeficsForVisionText2Text on the same folder."""
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  reference = transformers.IdeficsForVisionText2Text.from_pretrained(
      fixtures.path(name), dtype=torch.float32).eval()
  images = expected['images']
  ours, encoded = ours
  pixels = (images.astype(np.float32) / 255.0 - np.asarray(
      flamingo.CLIP_MEAN, np.float32)) / np.asarray(flamingo.CLIP_STD,
                                                    np.float32)
  mask = (encoded.media_index[:, None]
          == np.arange(1, len(images) + 1)[None])  # [L, N]
  with torch.no_grad():
    theirs = reference(
        input_ids=torch.from_numpy(encoded.tokens.astype(np.int64))[None],
        pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2)[None],
        image_attention_mask=torch.from_numpy(mask.astype(np.int64))[None],
    ).logits[0].numpy()
  assert test_parity.relative_difference(
      ours[:, :theirs.shape[-1]], theirs) <= test_parity.TOLERANCE


def _patched_read(monkeypatch, edit):
  """idefics.read returns the fixture's tensors after `edit`."""
  store = tensors_lib.open_path(DATA)
  arrays = {name: np.asarray(store[name]) for name in store}
  store.close()
  edit(arrays)
  monkeypatch.setattr(idefics, 'read', lambda path: tensors_lib.from_arrays(
      arrays, source=path))


_XATTN = 'model.gated_cross_attn_layers.'


@pytest.mark.parametrize('edit, named', [
    (lambda a: a.update({f'{_XATTN}1.cross_attn.k_proj.weight': np.zeros(
        [32, 15], np.float32)}),
     [f'{_XATTN}1.cross_attn.k_proj.weight', '(15, 32)', '(16, 32)']),
    (lambda a: a.pop(f'{_XATTN}1.mlp.down_proj.weight'),
     ['gated_xattn/block/ffw/output/w', 'layers [1]']),
    (lambda a: a.pop('model.perceiver_resampler.blocks.1.0.q_layer_norm.'
                     'weight'),
     ['perceiver_resampler/layer_1/attention/query_norm']),
    (lambda a: a.update({'model.perceiver_resampler.extra': np.zeros(
        [3], np.float32)}),
     ['model.perceiver_resampler.extra', '(3,)', 'extra tensor']),
    (lambda a: a.update({'model.embed_tokens.additional_embedding.weight':
                         np.zeros([2, 31], np.float32)}),
     ['model.embed_tokens.additional_embedding.weight', '(2, 31)',
      '(40, 32)']),
    (lambda a: a.update({'model.layers.0.post_attention_layernorm.weight':
                         np.zeros([33], np.float32)}),
     ['model.layers.0.post_attention_layernorm.weight', '(33,)', '(32,)']),
])
def test_a_mismatch_names_the_tensor_and_writes_nothing(
    monkeypatch, tmp_path, capsys, edit, named):
  _patched_read(monkeypatch, edit)
  workdir = tmp_path / 'workdir'
  assert convert.main(_args(workdir)) == 1
  message = capsys.readouterr().err
  for text in named:
    assert text in message, message
  assert not os.path.exists(workdir)
  assert os.listdir(tmp_path) == []  # No partial directory left either.


def test_another_family_is_refused(tmp_path, capsys):
  folder = tmp_path / 'llama'
  shutil.copytree(DATA, folder)
  with open(folder / 'config.json') as f:
    config = json.load(f)
  with open(folder / 'config.json', 'w') as f:
    json.dump(dict(config, model_type='llama'), f)
  assert convert.main(_args(tmp_path / 'w', str(folder))) == 1
  assert "model_type 'llama'" in capsys.readouterr().err
  assert not os.path.exists(tmp_path / 'w')


def test_help_and_list(capsys):
  with pytest.raises(SystemExit):
    convert.main(['idefics', '--help'])
  out = capsys.readouterr().out
  assert '--max_len' in out and 'IDEFICS' in out
  assert convert.main(['idefics', DATA, '--list']) == 0
  assert 'model.perceiver_resampler.latents\t[4, 16]' in capsys.readouterr(
  ).out


def test_idefics_9b_sizes_by_eval_shape():
  """idefics-9b's config.json and tensor shapes give the 'idefics' variant
  of LLaMA-7B + ViT-H/14 (shapes only): 8 cross-attention layers, 8.93B."""
  from flamingo_jax.models import lm_layout  # pylint: disable=g-import-not-at-top
  from flamingo_jax.weights import vision  # pylint: disable=g-import-not-at-top
  config = dict(model_type='idefics', cross_layer_interval=4,
                intermediate_size=11008, rms_norm_eps=1e-6,
                alpha_type='float', qk_layer_norms=False,
                perceiver_config=dict(resampler_n_heads=16,
                                      resampler_head_dim=96))
  shapes = {'model.perceiver_resampler.latents': (64, 1280)}
  shapes.update({f'model.perceiver_resampler.blocks.{i}.1.fc.weight':
                 (5120, 1280) for i in range(6)})
  shapes.update({f'{_XATTN}{l}.alpha_dense': (1,) for l in range(8)})
  own = tensors_lib.TensorStore(
      {n: tensors_lib.TensorInfo(s, np.dtype(np.float32), 'shard')
       for n, s in shapes.items()}, None, source='idefics-9b')
  tower = vision.vit_config(
      patch_size=14, width=1280, depth=32, num_heads=16, mlp_dim=5120,
      embed_dim=None, image_size=224, activation='gelu',
      tokens='last_block', keep_class_token=True)
  lm = lm_layout.family_config(
      'llama', num_layers=32, width=4096, num_heads=32, head_size=128,
      num_kv_heads=None, ffw_hidden=11008, norm_eps=1e-6,
      rotary_base=10000.0, use_bias=False, tied_embeddings=False)
  lm['vocab_size'] = 32002
  model = idefics.model_config(config, tower, lm, own)
  assert tower['variant'] == 'H/14'
  counts = {}
  for path, leaves in flamingo.abstract_params(model).items():
    part = path.split('/')[0]
    counts[part] = counts.get(part, 0) + sum(
        int(np.prod(x.shape)) for x in leaves.values())
  assert flamingo.xattn_positions(32, 4, 'interleaved', 'gated_xattn_dense'
                                  ) == (0, 4, 8, 12, 16, 20, 24, 28)
  assert round(counts['gated_xattn'] / 1e9, 3) == 1.435
  assert round(counts['perceiver_resampler'] / 1e9, 3) == 0.126
  assert round(sum(counts.values()) / 1e9, 2) == 8.93
