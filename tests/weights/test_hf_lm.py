"""Hugging Face LM importers against transformers: LLaMA, GPT-NeoX, MPT,
GPT-2 at tiny random configurations, saved with `save_pretrained`, imported,
and compared logit for logit (and greedy tokens for one family).

Needs torch and transformers (the `[parity]` extra); skipped without them.
"""

import functools
import json
import os

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flamingo_jax.models import lm
from flamingo_jax.weights import convert
from flamingo_jax.weights import hf_gpt2
from flamingo_jax.weights import hf_gpt_neox
from flamingo_jax.weights import hf_llama
from flamingo_jax.weights import hf_mpt
from flamingo_jax.weights import mapping

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

TOLERANCE = 1e-4
VOCAB = 96


def _llama():
  return transformers.LlamaConfig(
      vocab_size=VOCAB, hidden_size=32, intermediate_size=40,
      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
      rope_theta=500.0, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2)


def _gpt_neox():
  return transformers.GPTNeoXConfig(
      vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
      num_hidden_layers=2, num_attention_heads=4, rotary_pct=0.5,
      bos_token_id=0, eos_token_id=0)


def _mpt():  # 6 heads: ALiBi slopes of a non-power of two.
  return transformers.MptConfig(vocab_size=VOCAB, d_model=48, n_layers=2,
                                n_heads=6, max_seq_len=64)


def _gpt2():
  return transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2,
                                 n_head=4, n_positions=40, bos_token_id=0,
                                 eos_token_id=0)


FAMILIES = {
    'llama': (_llama, hf_llama, 'LlamaForCausalLM'),
    'gpt_neox': (_gpt_neox, hf_gpt_neox, 'GPTNeoXForCausalLM'),
    'mpt': (_mpt, hf_mpt, 'MptForCausalLM'),
    'gpt2': (_gpt2, hf_gpt2, 'GPT2LMHeadModel'),
}


@functools.lru_cache(maxsize=None)
def _reference(family: str, directory: str):
  """A random HF model of `family`, saved (LLaMA: sharded) in `directory`."""
  make_config, _, cls = FAMILIES[family]
  torch.manual_seed(len(family))
  model = getattr(transformers, cls)(make_config()).eval()
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


def _our_logits(config, params, tokens):
  model = hk.without_apply_rng(hk.transform(
      lambda t: lm.DecoderLM(**config)(t)))
  return np.asarray(jax.jit(model.apply)(params, tokens))


def relative_difference(ours, theirs) -> float:
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  difference = float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)))
  print(f'parity {os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]}: '
        f'max relative difference {difference:.2e}')
  return difference


@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_logits_match_transformers(family, saved):
  reference, directory = saved(family)
  source = FAMILIES[family][1]
  store = source.read(directory)
  config = source.config_from(directory, store)
  params = source.to_params(store, config)
  tokens = np.random.default_rng(3).integers(0, VOCAB, (2, 11))
  with torch.no_grad():
    theirs = reference(torch.from_numpy(tokens)).logits.numpy()
  ours = _our_logits(config, params, tokens)
  assert ours.shape == (2, 11, VOCAB + 1)  # + our (unused) <EOC>.
  assert relative_difference(ours[..., :VOCAB], theirs) <= TOLERANCE
  if family == 'llama':
    assert len(store.groups()) > 1  # Read from shards and an index.


def test_configs_name_each_layout(saved):
  got = {f: FAMILIES[f][1].config_from(saved(f)[1]) for f in FAMILIES}
  assert got['llama']['num_kv_heads'] == 2 and got['llama']['ffw'] == 'gated'
  assert got['llama']['rotary_base'] == 500.0
  assert got['gpt_neox']['rotary_fraction'] == 0.5
  assert got['gpt_neox']['parallel_residual']
  assert got['mpt']['positions'] == 'alibi' and got['mpt']['tied_embeddings']
  assert not got['mpt']['norm_bias'] and got['mpt']['ffw_hidden'] == 192
  assert got['gpt2']['max_positions'] == 40


def test_greedy_generation_matches_transformers(saved):
  """The imported LM inside Flamingo (gates closed: exactly the LM), decoded
  greedily through the cached path (`Flamingo.prefill`, then one
  `decode_step` per token), gives transformers' greedy tokens."""
  from flamingo_jax.models import flamingo  # pylint: disable=g-import-not-at-top
  reference, directory = saved('llama')
  config = hf_llama.config_from(directory)
  lm_params = hf_llama.to_params(hf_llama.read(directory), config)
  model_config = flamingo.model_config('tiny')
  model_config['lm'] = config
  resampler = model_config['resampler']
  visual = jnp.ones([1, 1, resampler['num_latents'], resampler['width']])
  prompt = np.random.default_rng(5).integers(1, VOCAB, (1, 6))
  steps = 8

  def prefill(tokens, visual):
    ones = jnp.ones(tokens.shape, bool)
    return flamingo.Flamingo(model_config).prefill(
        tokens, ones, ones.astype(jnp.int32), visual, jnp.ones([1, 1], bool),
        tokens.shape[1] + steps)  # [1, P, V], state

  def step(token, state):  # [1, 1] -> [1, 1, V], state
    ones = jnp.ones([1, 1], bool)
    return flamingo.Flamingo(model_config).decode_step(
        token, ones, ones.astype(jnp.int32), state)

  def decode(tokens, visual):  # Creates the xattn parameters.
    media_index = jnp.ones(tokens.shape, jnp.int32)
    return flamingo.Flamingo(model_config).decode(
        tokens, visual, jnp.ones([1, 1], bool), media_index)

  params = jax.jit(hk.transform(decode).init)(jax.random.PRNGKey(0), prompt,
                                              visual)
  params = {**params, **lm_params}
  logits, state = jax.jit(hk.transform(prefill).apply)(params, None, prompt,
                                                       visual)
  step = jax.jit(hk.transform(step).apply)
  ours = []
  for _ in range(steps):
    token = jnp.argmax(logits[:, -1, :VOCAB], axis=-1)[:, None]  # [1, 1]
    ours.append(int(token[0, 0]))
    logits, state = step(params, None, token, state)
  with torch.no_grad():
    theirs = reference.generate(
        torch.from_numpy(prompt), max_new_tokens=steps, min_new_tokens=steps,
        do_sample=False, eos_token_id=None, pad_token_id=0)
  assert ours == theirs[0, prompt.shape[1]:].tolist()


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
