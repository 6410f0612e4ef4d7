"""OpenFlamingo import: parity with open_flamingo 2.0.1 and the round trip.

testdata/open_flamingo/ (make_open_flamingo.py) holds what a user
downloads, at a tiny random size: checkpoint.pt as OpenFlamingo's training
saves it, the CLIP tower's and the LM's Hugging Face folders (MPT;
open_flamingo_neox/: GPT-NeoX; open_flamingo_mosaic_gpt/: OpenFlamingo-3B's
MosaicGPT, MPT-1B's layout, as a pytorch_model.bin), and
open_flamingo's own outputs: fp32 logits on a few-shot captioning prompt
and its greedy `Flamingo.generate` continuation. Here the convert CLI turns
them into a workdir, `flamingo_jax.load` loads it, and the notebook API's
`few_shot` captions the query image. No torch needed (checkpoint.pt is read
by our restricted unpickler when torch is absent).
"""

import importlib.util
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest

import flamingo_jax
from flamingo_jax.data import formatting
from flamingo_jax.data import world
from flamingo_jax.weights import convert
from flamingo_jax.weights import open_flamingo
from flamingo_jax.weights import tensors as tensors_lib
from flamingo_jax.weights import torch_file
from tests.weights import converted
from tests.weights import fixtures
from tests.weights import test_parity

pytest.importorskip('tokenizers')

DATA = fixtures.path('open_flamingo')
CHECKPOINT = os.path.join(DATA, 'checkpoint.pt')
NAMES = sorted(fixtures.OPEN_FLAMINGOS)


def _args(workdir, name='open_flamingo'):
  data = fixtures.path(name)
  lm_folder = fixtures.OPEN_FLAMINGOS[name][3]
  return ['open_flamingo', os.path.join(data, 'checkpoint.pt'),
          '--vision', os.path.join(data, 'clip'),
          '--lm', os.path.join(data, lm_folder), '--workdir', str(workdir),
          '--max_len', '64', '--torch_backend', 'builtin']  # As without torch.


@pytest.fixture(name='name', scope='module', params=NAMES)
def name_fixture(request):
  return request.param


@pytest.fixture(name='expected', scope='module')
def expected_fixture(name):
  return fixtures.load_expected(name)


@pytest.fixture(name='model', scope='module')
def model_fixture(tmp_path_factory, name):
  return converted.convert_and_load(tmp_path_factory, name,
                                    lambda w: _args(w, name))


def _prompt() -> str:
  return (''.join(formatting.caption_prompt(c) for c in fixtures.OF_CAPTIONS)
          + formatting.caption_prompt())


def test_config_is_open_flamingos(model, name):
  config = model.model_config
  every = fixtures.OPEN_FLAMINGOS[name][5]
  assert config['xattn']['every'] == every  # From the names.
  gates = np.asarray(model.params['gated_xattn/block']['attn_gate'])
  assert gates.shape == (config['lm']['num_layers'] // every,)
  assert np.all(gates != 0)  # Open: the images matter.
  assert config['xattn']['placement'] == 'openflamingo'
  assert config['resampler']['num_latents'] == 64
  assert config['resampler']['num_heads'] * config['resampler'][
      'head_size'] == 512
  assert config['lm']['vocab_size'] == 44  # 48 rows resized to the tokens.
  tokenizer = model.tokenizer
  # OpenFlamingo's ids: <|endofchunk|>, <image>, <PAD> after the 41 words.
  assert (tokenizer.eoc_id, tokenizer.image_id,
          tokenizer.pad_id) == (41, 42, 43)


def test_logits_match_open_flamingo(model, expected):
  logits, encoded = converted.prompt_logits(model, _prompt(),
                                            expected['images'])  # [L, V + 1]
  # The notebook API's prompt is the one open_flamingo was given.
  np.testing.assert_array_equal(encoded.tokens, expected['prompt_ids'])
  vocab = model.model_config['lm']['vocab_size']
  assert test_parity.relative_difference(
      logits[:, :vocab], expected['logits']) <= test_parity.TOLERANCE


def test_few_shot_captioning_gives_open_flamingos_tokens(model, expected):
  """The must-show round trip: convert, load, few-shot caption the query
  image; the same tokens as open_flamingo's greedy `generate`."""
  images = expected['images']
  support = list(zip(images[:2], fixtures.OF_CAPTIONS))
  caption = model.few_shot(support, images[2],
                           max_new_tokens=fixtures.OF_NEW_TOKENS)
  assert caption == str(expected['greedy_text']).strip()
  assert model.tokenizer.encode(caption) == expected['greedy'].tolist()


def test_builtin_unpickler_reads_the_checkpoint():
  """CI has no torch: checkpoint.pt through the restricted unpickler."""
  store = torch_file.read(CHECKPOINT, backend='builtin')
  resampler, lm, xattn = open_flamingo.split(store)
  assert sorted(xattn) == [1, 3]  # Blocks before LM layers 1 and 3.
  assert set(lm) == {'transformer.wte.weight', 'lm_head.weight'}
  assert 'perceiver.latents' in resampler
  assert store.info('perceiver.layers.0.0.to_kv.weight').shape == (1024, 16)


def _patched_read(monkeypatch, edit):
  """open_flamingo.read returns checkpoint.pt's tensors after `edit`."""
  store = torch_file.read(CHECKPOINT, backend='builtin')
  arrays = {name: np.asarray(store[name]) for name in store}
  edit(arrays)
  monkeypatch.setattr(open_flamingo, 'read',
                      lambda path, backend: tensors_lib.from_arrays(
                          arrays, source=path))


@pytest.mark.parametrize('edit, named', [
    (lambda a: a.update({'perceiver.layers.2.0.to_kv.weight': np.zeros(
        [1000, 16], np.float32)}),
     ['perceiver.layers.2.0.to_kv.weight', '(1000, 16)', '(16, 512)']),
    (lambda a: a.pop('lang_encoder.transformer.blocks.3.'
                     'gated_cross_attn_layer.ff.3.weight'),
     ['gated_xattn/block/ffw/output/w', 'layers [1]']),
    (lambda a: a.update({'perceiver.extra': np.zeros([3], np.float32)}),
     ['perceiver.extra', '(3,)', 'extra tensor']),
    (lambda a: a.update({'lang_encoder.transformer.wte.weight': np.zeros(
        [43, 24], np.float32)}),
     ['lang_encoder.transformer.wte.weight', '(43, 24)', '(44, 24)']),
    (lambda a: a.update({'lang_encoder.transformer.blocks.0.decoder_layer.'
                         'norm_1.weight': np.zeros([25], np.float32)}),
     ['blocks.0.decoder_layer.norm_1.weight', '(25,)', '(24,)']),
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


def test_misplaced_cross_attention_is_refused(monkeypatch, tmp_path, capsys):
  def move(arrays):
    for name in list(arrays):
      if '.blocks.3.gated' in name:
        arrays[name.replace('.blocks.3.', '.blocks.2.')] = arrays.pop(name)
  _patched_read(monkeypatch, move)
  assert convert.main(_args(tmp_path / 'w')) == 1
  assert 'LM layers [1, 2]' in capsys.readouterr().err


def test_an_open_clip_tower(tmp_path):
  """--vision may be an OpenCLIP state dict (the open_clip fixture: also
  16 wide, so it fits this checkpoint's resampler; 3 blocks, exact GELU)."""
  args = _args(tmp_path / 'w')
  args[args.index('--vision') + 1] = fixtures.path(
      'open_clip', 'open_clip_pytorch_model.bin')
  assert convert.main(args) == 0
  model = flamingo_jax.load(tmp_path / 'w', placement='device')
  vision = model.model_config['vision']
  assert (vision['depth'], vision['activation'], vision['tokens']) == (
      3, 'gelu', 'last_block')


def test_evaluate_takes_the_converted_workdir(tmp_path):
  """`flamingo_jax.evaluate` on a converted workdir (its eval section holds
  only max_len): the world's tasks, in --data_dir."""
  world.build_all(tmp_path / 'world', 'tiny', datasets=['world_captions'],
                  num_workers=1, log=lambda line: None)
  workdir = tmp_path / 'w'
  assert convert.main(_args(workdir)) == 0
  result = subprocess.run(
      [sys.executable, '-m', 'flamingo_jax.evaluate', '--workdir',
       str(workdir), '--data_dir', str(tmp_path / 'world'), '--sizes', 'tiny',
       '--tasks', 'captions', '--shots', '1', '--num_queries', '2'],
      capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  results = json.loads((workdir / 'eval' / 'results.json').read_text())
  assert set(results['scores']['captions']) == {'1'}
  assert results['metadata']['num_queries'] == {'captions': 2}


def test_list_and_missing_inputs(capsys, tmp_path):
  assert convert.main(['open_flamingo', CHECKPOINT, '--list']) == 0
  assert 'perceiver.latents\t[64, 16]' in capsys.readouterr().out
  assert convert.main(['open_flamingo', CHECKPOINT, '--workdir',
                       str(tmp_path / 'w')]) == 1
  assert '--vision' in capsys.readouterr().err
  assert not os.path.exists(tmp_path / 'w')


def test_help_names_the_inputs(capsys):
  with pytest.raises(SystemExit):
    convert.main(['open_flamingo', '--help'])
  out = capsys.readouterr().out
  for option in ('--vision', '--lm', '--xattn_heads', '--max_len'):
    assert option in out


def test_media_time_embs_are_imported(monkeypatch):
  """`perceiver.media_time_embs` [M, 1, D] (`max_num_media`) become the
  resampler's `media_time_embeddings` [M, D], with max_media = M."""
  rows = np.random.default_rng(0).normal(size=[3, 1, 16]).astype(np.float32)
  _patched_read(monkeypatch,
                lambda a: a.update({'perceiver.media_time_embs': rows}))
  data = fixtures.path('open_flamingo')
  converted = convert.convert(
      'open_flamingo', CHECKPOINT, vision=os.path.join(data, 'clip'),
      lm=os.path.join(data, 'mpt'))
  assert converted.model['resampler']['max_media'] == 3
  np.testing.assert_array_equal(
      converted.params['perceiver_resampler']['media_time_embeddings'],
      rows[:, 0])


def test_media_time_embs_against_open_flamingos_resampler(monkeypatch):
  """Live, where open_flamingo and torch are installed (make_open_flamingo.py
  says how): its PerceiverResampler with max_num_media and max_num_frames,
  imported by our rules, on 3 media of 2 frames."""
  torch = pytest.importorskip('torch')
  pytest.importorskip('einops_exts')
  if importlib.util.find_spec('open_flamingo') is None:
    pytest.skip('open_flamingo is not installed')
  if importlib.util.find_spec('open_clip') is None:  # Its factory's import.
    monkeypatch.setitem(sys.modules, 'open_clip', types.ModuleType('open_clip'))
  from open_flamingo.src import helpers  # pylint: disable=g-import-not-at-top
  import haiku as hk  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from flamingo_jax.models import resampler  # pylint: disable=g-import-not-at-top
  from flamingo_jax.weights import mapping  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  theirs = helpers.PerceiverResampler(dim=16, depth=2, num_latents=8,
                                      max_num_media=3, max_num_frames=2)
  with torch.no_grad():
    for param in theirs.parameters():
      param.add_(0.1 * torch.randn_like(param))
  features = np.random.default_rng(1).normal(
      size=[1, 3, 2, 5, 16]).astype(np.float32)  # [b, T media, F, v, D]
  with torch.no_grad():
    want = theirs(torch.from_numpy(features)).numpy()[0]  # [3, 8, 16]
  ours = hk.transform(lambda x, s: resampler.PerceiverResampler(
      num_layers=2, width=16, num_heads=8, head_size=64, num_latents=8,
      max_frames=2, ffw_activation='gelu_exact', max_media=3)(x, s))
  slots = np.arange(3)
  abstract = jax.eval_shape(ours.init, jax.random.key(0), features[0], slots)
  params = mapping.map_tensors(
      {f'perceiver.{k}': v.numpy() for k, v in theirs.state_dict().items()},
      open_flamingo.rules(), abstract)
  got = ours.apply(params, None, features[0], slots)  # [3, 8, 16]
  assert test_parity.relative_difference(got, want) <= test_parity.TOLERANCE
