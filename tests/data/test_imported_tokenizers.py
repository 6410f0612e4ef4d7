"""A checkpoint's own tokenizer (Hugging Face JSON, foreign SentencePiece),
with the markers as the checkpoint defines them, in formatting and prompts."""

import json
import os
import pickle

import numpy as np
import pytest
import sentencepiece as spm

from flamingo_jax.data import formatting
from flamingo_jax.data import tokenizer as tokenizer_lib
from flamingo_jax.inference import prompts
from tests.data.test_tokenizer import make_corpus

tokenizers = pytest.importorskip('tokenizers')
# pylint: disable-next=g-import-not-at-top,wrong-import-position
from flamingo_jax.data import hf_tokenizer

PROMPT = '<image>Output: a cute dog.<EOC><image>Output:'


@pytest.fixture(name='hf_dir', scope='module')
def _hf_dir(tmp_path_factory) -> str:
  """A GPT-2-style byte-level BPE tokenizer.json, as an MPT/NeoX checkpoint
  ships it: <|endoftext|> is BOS and EOS, no pad, no markers."""
  directory = tmp_path_factory.mktemp('hf')
  bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
  bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(
      add_prefix_space=False)
  bpe.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=400, special_tokens=['<|endoftext|>'],
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  bpe.train_from_iterator(make_corpus(300), trainer)
  bpe.save(str(directory / 'tokenizer.json'))
  (directory / 'tokenizer_config.json').write_text(json.dumps(
      {'bos_token': '<|endoftext|>', 'eos_token': '<|endoftext|>',
       'unk_token': '<|endoftext|>'}))
  return str(directory)


@pytest.fixture(name='hf', scope='module')
def _hf(hf_dir) -> tokenizer_lib.Tokenizer:
  return hf_tokenizer.from_hf(hf_dir)


def test_markers_are_added_as_open_flamingo_adds_them(hf):
  base = 400
  assert hf.vocab_size == base + 3
  # add_special_tokens(['<|endofchunk|>', '<image>']), then '<PAD>'.
  assert (hf.eoc_id, hf.image_id, hf.pad_id) == (base, base + 1, base + 2)
  assert hf.bos_id == hf.eos_id == 0
  assert hf.id_to_piece(hf.eoc_id) == '<EOC>'


def test_encode_decode_with_markers(hf):
  ids = hf.encode(PROMPT)
  assert ids.count(hf.image_id) == 2 and ids.count(hf.eoc_id) == 1
  assert ids == hf.encode(PROMPT.replace('<EOC>', '<|endofchunk|>'))
  assert hf.decode(ids) == PROMPT
  assert hf.decode([hf.bos_id] + ids + [hf.pad_id]) == PROMPT


def test_plain_text_never_makes_markers(hf):
  text = 'a literal <image> and <|endofchunk|> and <EOC> in a page'
  ids = hf.encode(text, parse_markers=False)
  assert hf.image_id not in ids and hf.eoc_id not in ids
  assert hf.decode(ids) == text


def test_same_ids_as_transformers(hf_dir, hf):
  transformers = pytest.importorskip('transformers')
  reference = transformers.PreTrainedTokenizerFast(
      tokenizer_file=os.path.join(hf_dir, 'tokenizer.json'))
  reference.add_special_tokens(
      {'additional_special_tokens': ['<|endofchunk|>', '<image>']})
  reference.add_special_tokens({'pad_token': '<PAD>'})
  text = PROMPT.replace('<EOC>', '<|endofchunk|>')
  assert hf.encode(PROMPT) == reference(text, add_special_tokens=False)[
      'input_ids']


def test_save_load_and_pickle(hf, tmp_path):
  spec = hf.save_dir(str(tmp_path / 'tok'))
  assert os.path.basename(spec) == tokenizer_lib.SPEC_FILE
  for other in (tokenizer_lib.Tokenizer.load(spec),
                tokenizer_lib.Tokenizer.load(str(tmp_path / 'tok')),
                pickle.loads(pickle.dumps(hf))):
    assert other.encode(PROMPT) == hf.encode(PROMPT)
    assert (other.vocab_size, other.eoc_id, other.pad_id) == (
        hf.vocab_size, hf.eoc_id, hf.pad_id)
  with pytest.raises(ValueError, match='save_dir'):
    hf.save(str(tmp_path / 'x.model'))


@pytest.fixture(name='llama_like', scope='module')
def _llama_like(tmp_path_factory) -> tokenizer_lib.Tokenizer:
  """A SentencePiece model without <image> (as LLaMA's), the markers added
  after its pieces."""
  prefix = str(tmp_path_factory.mktemp('sp') / 'plain')
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(make_corpus(500)), model_prefix=prefix,
      vocab_size=300, pad_id=-1, unk_id=0, bos_id=1, eos_id=2,
      byte_fallback=True, minloglevel=2)
  with open(prefix + '.model', 'rb') as f:
    proto = f.read()
  with pytest.raises(ValueError, match='Tokenizer.from_sentencepiece'):
    tokenizer_lib.Tokenizer(proto)  # Not our layout.
  markers = tokenizer_lib.Markers(
      image='<image>', eoc='<|endofchunk|>', bos='<s>', eos='</s>',
      pad='<PAD>', unk='<unk>', added=('<|endofchunk|>', '<image>', '<PAD>'))
  return tokenizer_lib.Tokenizer.from_sentencepiece(proto, markers)


def test_sentencepiece_without_an_image_piece(llama_like):
  tok = llama_like
  assert (tok.vocab_size, tok.eoc_id, tok.image_id, tok.pad_id) == (
      303, 300, 301, 302)
  ids = tok.encode(PROMPT)
  assert ids[0] == tok.image_id and ids.count(tok.eoc_id) == 1
  assert tok.decode(ids) == PROMPT
  plain = tok.encode('see <image> here', parse_markers=False)
  assert tok.image_id not in plain


@pytest.mark.parametrize('which', ['hf', 'llama_like'])
def test_formatting_and_prompts(which, request):
  tok = request.getfixturevalue(which)
  example = formatting.format_document(
      [{'text': 'Pets!'}, {'image': 0}, {'text': ' My dog.'}, {'image': 1},
       {'text': ' My cat.'}], tok, seq_len=40, max_media=2)
  tokens = example['tokens']
  assert tokens[0] == tok.bos_id
  markers = np.flatnonzero(tokens == tok.image_id)
  assert len(markers) == 2 and example['num_media'] == 2
  # <EOC> ends the chunk before each image; phi steps at each marker.
  assert all(tokens[m - 1] == tok.eoc_id for m in markers)
  np.testing.assert_array_equal(example['media_index'][markers], [1, 2])
  assert example['loss_mask'][markers - 1].sum() == 0  # Targets: markers.
  encoded = prompts.encode(tok, PROMPT, [np.zeros((8, 8, 3), np.uint8)] * 2,
                           image_size=8)
  assert encoded.tokens[0] == tok.bos_id
  assert (encoded.tokens == tok.image_id).sum() == 2
  assert encoded.media_index[-1] == 2
  with pytest.raises(ValueError, match='2 <image> markers but 1 media'):
    prompts.encode(tok, PROMPT, [np.zeros((8, 8, 3), np.uint8)], 8)


def test_a_checkpoint_with_only_tokenizer_model(llama_like, tmp_path):
  """The LM importers take a lone SentencePiece tokenizer.model (LLaMA's
  original release), with the markers as OpenFlamingo adds them; it saves
  and loads as the convert CLI writes it."""
  # pylint: disable-next=g-import-not-at-top
  from flamingo_jax.weights import hf_lm
  checkpoint = tmp_path / 'llama'  # As LLaMA's original release.
  checkpoint.mkdir()
  (checkpoint / 'tokenizer.model').write_bytes(llama_like.serialized_model)
  tok = hf_lm.tokenizer_for(str(checkpoint / 'config.json'), True)
  assert tok.markers == llama_like.markers
  assert (tok.vocab_size, tok.eoc_id, tok.image_id, tok.pad_id) == (
      303, 300, 301, 302)
  assert tok.encode(PROMPT) == llama_like.encode(PROMPT)
  assert hf_lm.tokenizer_for(str(checkpoint), False) is None
  loaded = tokenizer_lib.Tokenizer.load(tok.save_dir(str(tmp_path / 'tok')))
  assert loaded.encode(PROMPT) == tok.encode(PROMPT)
  with pytest.raises(FileNotFoundError, match='No SentencePiece'):
    hf_tokenizer.from_sentencepiece(str(tmp_path))
