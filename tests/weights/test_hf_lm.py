"""Hugging Face LM importers against transformers, live: LLaMA, GPT-NeoX,
MPT, GPT-2 at the tiny configurations of fixtures.HF_LMS, fresh random
weights in float32, saved with `save_pretrained` (LLaMA sharded), imported
and compared logit for logit; config mapping, errors, the tokenizer and
the convert CLI; MPT-1B's MosaicGPT against its torch restatement
(mosaic_gpt_reference.py), with and without biases. (test_parity.py checks
the committed fixtures without torch, greedy generation included.)

Needs torch and transformers (the `[parity]` extra); skipped without them.
"""

import functools
import json
import os

import numpy as np
import pytest

from flamingo_jax.weights import convert
from flamingo_jax.weights import hf_gpt2
from flamingo_jax.weights import hf_gpt_neox
from flamingo_jax.weights import hf_llama
from flamingo_jax.weights import hf_mpt
from flamingo_jax.weights import mapping
from tests.weights import fixtures
from tests.weights.test_parity import lm_logits
from tests.weights.test_parity import relative_difference

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

TOLERANCE = 1e-4
VOCAB = fixtures.LM_VOCAB
FAMILIES = {'llama': hf_llama, 'gpt_neox': hf_gpt_neox, 'mpt': hf_mpt,
            'gpt2': hf_gpt2}


@functools.lru_cache(maxsize=None)
def _reference(family: str, directory: str):
  """A random HF model of `family`, saved (LLaMA: sharded) in `directory`."""
  config_class, model_class, kwargs = fixtures.HF_LMS[f'hf_{family}']
  torch.manual_seed(len(family))
  model = getattr(transformers, model_class)(
      getattr(transformers, config_class)(**kwargs)).eval()
  with torch.no_grad():  # Away from the init: norms' 1/0, zero biases.
    for param in model.parameters():
      param.add_(0.05 * torch.randn_like(param))
  model.save_pretrained(directory, max_shard_size=(
      '20KB' if family == 'llama' else '50MB'))
  return model


@pytest.fixture(name='saved', scope='module')
def _saved(tmp_path_factory):
  def get(family):
    directory = str(tmp_path_factory.getbasetemp() / f'hf_{family}')
    return _reference(family, directory), directory
  return get


@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_logits_match_transformers(family, saved):
  reference, directory = saved(family)
  source = FAMILIES[family]
  store = source.read(directory)
  config = source.config_from(directory, store)
  params = source.to_params(store, config)
  tokens = np.random.default_rng(3).integers(0, VOCAB, (2, 11))
  with torch.no_grad():
    theirs = reference(torch.from_numpy(tokens)).logits.numpy()
  ours = np.asarray(lm_logits(config, params, tokens))
  assert ours.shape == (2, 11, VOCAB + 1)  # + our (unused) <EOC>.
  assert relative_difference(ours[..., :VOCAB], theirs) <= TOLERANCE
  if family == 'llama':
    assert len(store.groups()) > 1  # Read from shards and an index.


def test_configs_name_each_layout(saved):
  got = {f: FAMILIES[f].config_from(saved(f)[1]) for f in FAMILIES}
  assert got['llama']['num_kv_heads'] == 2 and got['llama']['ffw'] == 'gated'
  assert got['llama']['rotary_base'] == 500.0
  assert got['gpt_neox']['rotary_fraction'] == 0.5
  assert got['gpt_neox']['parallel_residual']
  assert got['mpt']['positions'] == 'alibi' and got['mpt']['tied_embeddings']
  assert not got['mpt']['norm_bias'] and got['mpt']['ffw_hidden'] == 96
  assert got['gpt2']['max_positions'] == 40


def test_wrong_family_and_missing_tensors_are_named(saved, tmp_path):
  _, directory = saved('gpt2')
  with pytest.raises(ValueError, match="model_type 'gpt2': not a LLaMA"):
    hf_llama.config_from(directory)
  store = hf_gpt2.read(directory)
  config = hf_gpt2.config_from(directory, store)
  arrays = {n: store[n] for n in store if 'h.1.mlp.c_fc.weight' not in n}
  with pytest.raises(mapping.CheckpointMismatchError,
                     match=r'lm/blocks/block/ffw/hidden/w .*layers \[1\]'):
    hf_gpt2.to_params(mapping.tensors_lib.from_arrays(arrays), config)
  config['width'] = 48
  with pytest.raises(mapping.CheckpointMismatchError,
                     match=r'h\.0\.ln_1\.weight has shape \(32,\)'):
    hf_gpt2.to_params(store, config)


def _write_tokenizer(directory: str) -> None:
  """A word-level tokenizer.json of VOCAB - 6 words whose BOS and EOS are
  one token, as GPT-NeoX's and MPT's (`<|endoftext|>`)."""
  tokenizers = pytest.importorskip('tokenizers')
  vocab = {'<|endoftext|>': 0, **{f'w{i}': i for i in range(1, VOCAB - 6)}}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(
      vocab, unk_token='<|endoftext|>'))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.save(os.path.join(directory, 'tokenizer.json'))
  with open(os.path.join(directory, 'tokenizer_config.json'), 'w') as f:
    json.dump({'bos_token': '<|endoftext|>', 'eos_token': '<|endoftext|>',
               'unk_token': '<|endoftext|>'}, f)


def test_convert_cli_fits_the_rows_to_the_tokenizer(saved, tmp_path):
  """OpenFlamingo's markers join the tokenizer; the embedding rows follow
  it (cut past the tokenizer, mean rows for the markers)."""
  from flamingo_jax import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  from flamingo_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  reference, directory = saved('mpt')
  with_tokenizer = tmp_path / 'mpt'
  with_tokenizer.mkdir()
  for name in os.listdir(directory):
    os.symlink(os.path.join(directory, name), with_tokenizer / name)
  _write_tokenizer(str(with_tokenizer))
  workdir = str(tmp_path / 'workdir')
  assert convert.main(['hf_mpt', str(with_tokenizer), '--workdir',
                       workdir]) == 0
  with open(os.path.join(workdir, 'config.json')) as f:
    config = json.load(f)
  tok = tokenizer_lib.Tokenizer.load(config['data']['tokenizer'])
  # VOCAB - 6 words + <|endofchunk|>, <image>, <PAD>.
  assert tok.vocab_size == VOCAB - 3 == config['model']['lm']['vocab_size']
  assert tok.bos_id == tok.eos_id == 0
  assert (tok.eoc_id, tok.image_id, tok.pad_id) == (VOCAB - 6, VOCAB - 5,
                                                    VOCAB - 4)
  params = checkpoint_lib.load_params(workdir)
  table = np.asarray(params['lm/embed']['embeddings'])
  theirs = reference.transformer.wte.weight.detach().numpy()
  np.testing.assert_array_equal(table, theirs[:VOCAB - 3])  # Rows kept/cut.
  # Generation stops at <|endoftext|> although it is also BOS, and never
  # picks the LM's own <EOC> logit (id vocab_size): <EOC> is a row here.
  from flamingo_jax.inference import generate  # pylint: disable=g-import-not-at-top
  stop_ids, banned_ids = generate.special_ids(tok, tok.vocab_size)
  assert stop_ids == (tok.eoc_id, 0)
  assert set(banned_ids) == {tok.pad_id, tok.image_id, tok.vocab_size}


@pytest.mark.parametrize('no_bias', [False, True])
def test_mosaic_gpt_against_its_restatement(no_bias, tmp_path):
  """MPT-1B's MosaicGPT (tests/weights/mosaic_gpt_reference.py), fresh and
  random in float32, as pytorch_model.bin: with `no_bias: false` every
  Linear and LayerNorm (q_ln, k_ln included) keeps its bias."""
  from tests.weights import mosaic_gpt_reference  # pylint: disable=g-import-not-at-top
  from flamingo_jax.weights import hf_mosaic_gpt  # pylint: disable=g-import-not-at-top
  config = mosaic_gpt_reference.config(**dict(fixtures.MOSAIC_GPT,
                                               no_bias=no_bias))
  torch.manual_seed(5)
  model = mosaic_gpt_reference.MosaicGPT(config).eval()
  with torch.no_grad():
    for param in model.parameters():
      param.add_(0.05 * torch.randn_like(param))
  torch.save(model.state_dict(), tmp_path / 'pytorch_model.bin')
  (tmp_path / 'config.json').write_text(json.dumps(config))
  store = hf_mosaic_gpt.read(str(tmp_path))
  lm_config = hf_mosaic_gpt.config_from(str(tmp_path), store)
  assert lm_config['use_bias'] == lm_config['norm_bias'] == (not no_bias)
  assert any(n.endswith('q_ln.bias') for n in store) == (not no_bias)
  tokens = np.random.default_rng(4).integers(0, VOCAB, (2, 11))
  with torch.no_grad():
    theirs = model(torch.from_numpy(tokens)).logits.numpy()
  ours = lm_logits(lm_config, hf_mosaic_gpt.to_params(store, lm_config),
                   tokens)
  assert relative_difference(ours[..., :VOCAB], theirs) <= TOLERANCE
