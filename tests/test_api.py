"""flamingo_jax.load and the Model's generate / score / few_shot.

The smoke workdir (tests/conftest.py) holds random weights: these tests
check plumbing (loading, media forms, prompt formats, errors), not quality.
Every call that compiles uses one of a few batch shapes and decodings, so
the whole module compiles greedy decoding three times, beam search three
times and scoring once.
"""

import json
import shutil
import subprocess
import sys

import jax
import ml_collections
import numpy as np
from PIL import Image
import pytest

import flamingo_jax
from flamingo_jax import api
from flamingo_jax import checkpoint as checkpoint_lib
from flamingo_jax import loading
from flamingo_jax.inference import generate as generate_lib

STEPS = 4  # max_new_tokens everywhere: one compiled decoder per shape.


@pytest.fixture(scope='module')
def model(smoke_workdir):
  return flamingo_jax.load(smoke_workdir)


@pytest.fixture(scope='module')
def image():
  """A 48x64 (h x w) image: not square, so it is resized and padded."""
  rng = np.random.default_rng(1)
  return rng.integers(0, 256, [48, 64, 3], dtype=np.uint8)


def _forms(image, tmp_path):
  """The same image as numpy, PIL, str path, pathlib path and RGBA PIL."""
  path = tmp_path / 'image.png'
  Image.fromarray(image).save(path)
  return [image, Image.fromarray(image), str(path), path,
          Image.fromarray(image).convert('RGBA')]


def test_import_is_light_and_exports_load():
  assert flamingo_jax.load is api.load
  assert 'load' in dir(flamingo_jax)
  subprocess.run([sys.executable, '-c', 'import sys, flamingo_jax; '
                  'assert "jax" not in sys.modules, "import is heavy"'],
                 check=True)


def test_load_from_workdir_and_checkpoint_dirs_agree(model, smoke_workdir):
  reference = checkpoint_lib.load_params(str(smoke_workdir))
  for path in (smoke_workdir / 'checkpoints',
               smoke_workdir / 'checkpoints' / '1'):
    other = api.load(str(path))
    assert other.step == model.step == 1
    jax.tree.map(np.testing.assert_array_equal, other.params, model.params)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b),
               model.params, reference)
  assert model.mesh is None  # Tiny parameters, a data-only mesh: one device.
  assert model.max_len == 256
  assert model.max_len_source == 'config.data.datasets.documents.seq_len'
  assert 'step=1' in repr(model)


def test_mesh_placement_shards_the_parameters(model, smoke_workdir, image):
  config = json.loads((smoke_workdir / 'config.json').read_text())
  config['mesh'] = [['data', 2], ['fsdp', 2], ['model', 2]]
  sharded = api.load(smoke_workdir, config=config)  # 'auto': it splits.
  assert dict(sharded.mesh.shape) == {'data': 2, 'fsdp': 2, 'model': 2}
  specs = {tuple(x.sharding.spec) for x in jax.tree.leaves(sharded.params)}
  assert any(spec and any(spec) for spec in specs), specs
  jax.tree.map(np.testing.assert_array_equal, sharded.params, model.params)
  # Sharded generation agrees with one device.
  images = [image, 255 - image]
  prompts = ['<image>Output:', '<image>Question: what is it? Answer:']
  assert (sharded.generate(images, prompts, max_new_tokens=STEPS,
                          beam_size=1) ==
          model.generate(images, prompts, max_new_tokens=STEPS, beam_size=1))
  # Parameters too big for one device, under a mesh that only replicates:
  # the devices go to 'fsdp'.
  mesh = loading.inference_mesh(model.config, fits=False)
  assert dict(mesh.shape) == {'data': 1, 'fsdp': jax.device_count(),
                              'model': 1}


def test_generate_accepts_pil_numpy_and_paths_in_a_batch(model, image,
                                                        tmp_path):
  forms = _forms(image, tmp_path)
  gray = Image.fromarray(image).convert('L')  # Converted to RGB.
  outputs = model.generate(forms + [gray], ['<image>Output:'] * 6,
                           max_new_tokens=STEPS)
  assert isinstance(outputs, list) and len(outputs) == 6
  assert all(isinstance(text, str) for text in outputs)
  assert outputs[:5] == [outputs[0]] * 5
  assert '<EOC>' not in outputs[0]


def test_score_accepts_pil_numpy_and_paths(model, image, tmp_path):
  candidates = [' a red circle.<EOC>', ' two blue squares.<EOC>']
  forms = _forms(image, tmp_path) + [255 - image]
  scores = model.score(forms, ['<image>Output:'] * 6, candidates)
  assert scores.shape == (6, 2) and np.all(scores < 0)
  for row in scores[1:5]:
    np.testing.assert_array_equal(row, scores[0])
  # The image matters (the smoke weights' gates are open).
  assert not np.array_equal(scores[5], scores[0])


def test_few_shot_on_videos_is_generate_with_the_papers_prompt(model,
                                                               tmp_path):
  """Videos as arrays, lists of PIL frames and lists of frame paths."""
  rng = np.random.default_rng(2)
  # [2, T, H, W, 3]: two videos of four frames.
  videos = rng.integers(0, 256, [2, 4, 64, 64, 3], dtype=np.uint8)
  as_pil = [[Image.fromarray(frame) for frame in video] for video in videos]
  as_paths = []
  for v, video in enumerate(videos):
    as_paths.append([])
    for t, frame in enumerate(video):
      as_paths[-1].append(tmp_path / f'{v}_{t}.png')
      Image.fromarray(frame).save(as_paths[-1][-1])
  expected = model.generate(list(videos),
                            '<image>Output: a cat.<EOC><image>Output:',
                            max_new_tokens=STEPS)
  assert isinstance(expected, str)
  for support, query in ((videos[0], as_pil[1]), (as_pil[0], as_paths[1]),
                         (as_paths[0], videos[1])):
    assert model.few_shot([(support, 'a cat.')], query,
                          max_new_tokens=STEPS) == expected.strip()


def test_few_shot_prompt_formats(model, image, monkeypatch):
  calls, kwargs = [], []
  monkeypatch.setattr(model, 'generate',
                      lambda media, prompt, **kw: calls.append(
                          (len(media), prompt)) or kwargs.append(kw) or
                      ' out ')
  assert model.few_shot([(image, 'Q1?', 'a1'), (image, 'Q2?', 'a2')],
                        (image, 'Q3?'), task='vqa') == 'out'
  model.few_shot([(image, 'This is a dax.')], image, task='plain')
  model.few_shot([(image, 'a cat.')], image, task='caption')
  model.few_shot([(image, 'a cat.')], image, max_new_tokens=3, beam_size=2,
                 length_penalty=0.5, min_new_tokens=2)
  assert kwargs[0] == dict.fromkeys(  # None: the run's decoding.
      ('max_new_tokens', 'beam_size', 'length_penalty', 'min_new_tokens'))
  assert kwargs[-1] == dict(max_new_tokens=3, beam_size=2,
                            length_penalty=0.5, min_new_tokens=2)
  assert calls[:3] == [
      (3, '<image>Question: Q1? Answer: a1<EOC><image>Question: Q2? Answer: '
          'a2<EOC><image>Question: Q3? Answer:'),
      (2, '<image>This is a dax.<EOC><image>'),
      (2, '<image>Output: a cat.<EOC><image>Output:')]


def test_beam_size_selects_beam_search(model, image, monkeypatch):
  seen = []

  def fake(params, batch, options):
    del params  # Unused.
    seen.append(options)
    rows = batch['tokens'].shape[0]
    eoc = model.tokenizer.eoc_id
    tokens = np.array([[model.tokenizer.encode(' hi')[0], eoc, 0, 0]] * rows)
    return generate_lib.Result(tokens, np.full([rows], 2), np.zeros([rows]))

  monkeypatch.setattr(model.decoder, 'beam_search', fake)
  assert model.generate(image, '<image>Output:', beam_size=3,
                        max_new_tokens=STEPS) == model.tokenizer.decode(
                            model.tokenizer.encode(' hi')[:1])
  assert seen[0].beam_size == 3
  assert model.tokenizer.eoc_id in seen[0].stop_ids


def _eoc_first(params: dict, token: int) -> dict:
  """`params` changed so that <EOC> is always the likeliest next token and
  `token` the likeliest other one.

  Every input embedding carries 1e4 on feature 0, which the residual stream
  keeps (the blocks add O(1)); the final RMSNorm turns that into about
  sqrt(D) e_0, so the logits are about sqrt(D) times row 0 of the
  unembedding: 4 for <EOC>, 2 for `token`, 0 for every other token.
  """
  params = {name: dict(leaves) for name, leaves in params.items()}
  lm, embed = params['lm'], params['lm/embed']
  unembed = params['lm/unembed']
  embeddings = np.asarray(embed['embeddings'], np.float32).copy()
  embeddings[:, 0] = 1e4
  embed['embeddings'] = jax.numpy.asarray(embeddings,
                                          embed['embeddings'].dtype)
  lm['eoc_embedding'] = lm['eoc_embedding'].at[0].set(1e4)
  w = np.zeros(unembed['w'].shape, np.float32)  # [D, V]
  w[0, token] = 2.0
  unembed['w'] = jax.numpy.asarray(w, unembed['w'].dtype)
  lm['eoc_unembedding'] = jax.numpy.zeros_like(
      lm['eoc_unembedding']).at[0].set(4.0)
  return params


def test_decoding_defaults_are_the_runs_so_eoc_first_still_answers(
    smoke_workdir, image):
  config = json.loads((smoke_workdir / 'config.json').read_text())
  runs = api.load(smoke_workdir)
  assert runs.decoding == config['eval']['decoding']
  assert runs.decoding_source == 'config.eval.decoding'
  assert runs.decoding['min_new_tokens'] == 1  # As the evaluation's.
  del config['eval']
  fallback = api.Model(config=ml_collections.ConfigDict(config),
                       params=runs.params, tokenizer=runs.tokenizer, step=1)
  assert fallback.decoding == api.FALLBACK_DECODING
  assert fallback.decoding_source == 'FALLBACK_DECODING'
  red = runs.tokenizer.encode(' red')[0]
  answer = runs.tokenizer.decode([red])
  assert answer.strip()  # Text, not a control piece.
  runs.params = _eoc_first(runs.params, red)
  # <EOC> comes first: with min_new_tokens=0 the answer would be empty.
  assert runs.generate(image, '<image>Output:', min_new_tokens=0,
                       beam_size=1) == ''
  # The run's decoding (3 beams, min_new_tokens=1) answers all the same.
  assert runs.generate(image, '<image>Output:') == answer
  # The fallback's decoding, as built for the decoder (not run, to save a
  # compilation: it is greedy with min_new_tokens=1, as above).
  seen = []
  fallback.decoder.greedy = lambda params, batch, options: seen.append(
      options) or generate_lib.Result(np.zeros([1, 1], np.int32),
                                      np.ones([1]), np.zeros([1]))
  fallback.generate(image, '<image>Output:')
  assert seen == [generate_lib.Options(
      max_new_tokens=20, beam_size=1, length_penalty=0.0, min_new_tokens=1,
      stop_ids=fallback.stop_ids, banned_ids=fallback.banned_ids)]


def test_max_new_tokens_must_fit_the_context(model, image, monkeypatch):
  seen = []

  def fake(params, batch, options):
    del params  # Unused.
    seen.append(options)
    rows = batch['tokens'].shape[0]
    tokens = np.full([rows, options.max_new_tokens], model.tokenizer.eoc_id)
    return generate_lib.Result(tokens, np.ones([rows]), np.zeros([rows]))

  monkeypatch.setattr(model.decoder, 'greedy', fake)
  prompt = '<image>Output:'
  length = len(model.tokenizer.encode(prompt)) + 1  # <BOS> first.
  with pytest.raises(ValueError, match=(
      rf'The prompt has {length} tokens and max_new_tokens is 100000: '
      rf'{length + 100000} in all, more than the model\'s context of 256 '
      r'\(config\.data\.datasets\.documents\.seq_len\)\. Lower '
      rf'max_new_tokens \(at most {256 - length} for this prompt\)')):
    model.generate(image, prompt, max_new_tokens=100000, beam_size=1)
  assert model.generate(image, prompt, max_new_tokens=256 - length,
                        beam_size=1) == ''
  assert seen[-1].max_new_tokens == 256 - length
  with pytest.raises(ValueError, match='Prompt 1 has'):  # The longest.
    model.generate([image, image], [prompt, prompt + ' a b c d e'],
                   max_new_tokens=256 - length, beam_size=1)
  with pytest.raises(ValueError, match='max_new_tokens is 300'):
    model.few_shot([(image, 'a cat.')], image, max_new_tokens=300)
  assert len(seen) == 1


def test_load_errors(smoke_workdir, tmp_path):
  with pytest.raises(FileNotFoundError, match='does not exist'):
    api.load(tmp_path / 'nowhere')
  shutil.copy(smoke_workdir / 'config.json', tmp_path / 'config.json')
  with pytest.raises(FileNotFoundError, match='No checkpoint'):
    api.load(tmp_path)
  (tmp_path / 'checkpoints').mkdir()
  with pytest.raises(FileNotFoundError, match='No checkpoint'):
    api.load(tmp_path)
  with pytest.raises(FileNotFoundError, match='step 7'):
    api.load(smoke_workdir, step=7)
  config = json.loads((smoke_workdir / 'config.json').read_text())
  config['data']['tokenizer'] = str(tmp_path / 'missing.model')
  with pytest.raises(FileNotFoundError,
                     match=r'missing\.model \(config\.data\.tokenizer\)'):
    api.load(smoke_workdir, config=config)
  config = json.loads((smoke_workdir / 'config.json').read_text())
  config['task'] = 'contrastive'
  with pytest.raises(ValueError, match="'contrastive' run"):
    api.load(smoke_workdir, config=config)
  with pytest.raises(ValueError, match='placement'):
    api.load(smoke_workdir, placement='gpu')


def test_media_and_prompt_errors(model, image):
  with pytest.raises(ValueError, match='1 <image> markers but 2 media'):
    model.generate([image, image], '<image>Output:')
  with pytest.raises(ValueError, match=r'list of its own: \[frames\]'):
    model.generate(list(np.stack([image] * 3)), '<image>Output:')
  with pytest.raises(ValueError, match='0 <image> markers but 1 media'):
    model.generate(image, 'Output:')
  with pytest.raises(ValueError, match='uint8'):
    model.generate(image.astype(np.float32), '<image>Output:')
  with pytest.raises(ValueError, match='RGB'):
    model.generate(image[..., 0], '<image>Output:')  # Grayscale array.
  with pytest.raises(FileNotFoundError, match='no image file'):
    model.generate('/no/such/image.png', '<image>Output:')
  with pytest.raises(TypeError, match='PIL image'):
    model.generate(3, '<image>Output:')
  long_prompt = '<image>' + 'a red circle. ' * 200
  with pytest.raises(ValueError, match=r'context of 256 \(config\.data\.'
                     r'datasets\.documents\.seq_len\)'):
    model.generate(image, long_prompt)
  with pytest.raises(ValueError, match='longest candidate'):
    model.score(image, '<image>' + 'a red circle. ' * 30,
                [' a red circle.' * 40])
  with pytest.raises(ValueError, match='2 prompts need a list of 2'):
    model.generate(image, ['<image>', '<image>'])
  with pytest.raises(ValueError, match='at least one candidate'):
    model.score(image, '<image>Output:', [])
  with pytest.raises(ValueError, match='empty'):
    model.score(image, '<image>Output:', [''])


def test_few_shot_errors(model, image):
  with pytest.raises(ValueError, match='support set is empty'):
    model.few_shot([], image)
  with pytest.raises(ValueError, match=r'Support item 1 must be a tuple '
                     r'\(medium, caption\)'):
    model.few_shot([(image, 'a cat.'), (image,)], image)
  with pytest.raises(ValueError, match=r'\(medium, question, answer\)'):
    model.few_shot([(image, 'a cat.')], (image, 'Q?'), task='vqa')
  with pytest.raises(ValueError, match=r'The query must be a tuple'):
    model.few_shot([(image, 'Q?', 'a')], image, task='vqa')
  with pytest.raises(ValueError, match='Unknown task'):
    model.few_shot([(image, 'a cat.')], image, task='retrieval')
