"""Hugging Face `tokenizers` (tokenizer.json) as a flamingo_jax Tokenizer.

`from_hf(path, markers)` reads a checkpoint's `tokenizer.json` (with the
special-token names of its `tokenizer_config.json` /
`special_tokens_map.json` beside it), adds the markers the checkpoint's
Flamingo adds if they are missing -- as special tokens, in order, after the
vocabulary: OpenFlamingo calls `add_special_tokens({"additional_special_
tokens": ["<|endofchunk|>", "<image>"]})` and adds `<PAD>` when there is no
pad token -- and returns a `tokenizer.Tokenizer` whose `Markers` say which
tokens are `<image>`, `<EOC>`, `<BOS>`, `<EOS>`, `<pad>`.

Text with markers is encoded by the Hugging Face tokenizer as a whole, the
canonical `<EOC>` written in the checkpoint's spelling first, so the ids are
the ones the original model saw (the markers are added tokens, split off
before the pre-tokenizer). Plain text (`parse_markers=False`) goes through
a copy of the tokenizer without the marker tokens, so a literal `<image>` in
a document stays text.

Needs the `tokenizers` package (`pip install 'flamingo_jax[hf]'`).
"""

import json
import os
from typing import Any, Callable, Optional, Sequence

from flamingo_jax.data import tokenizer as tokenizer_lib
from flamingo_jax.data import tokenizer_backends

FILE = 'tokenizer.json'
# A SentencePiece model a checkpoint may ship instead (LLaMA's original).
SENTENCEPIECE_FILE = 'tokenizer.model'
# OpenFlamingo's spelling of the markers, in the order it adds them.
OPEN_FLAMINGO_ADDED = ('<|endofchunk|>', '<image>')


def _tokenizers():
  try:
    import tokenizers  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError('Hugging Face tokenizers need the `tokenizers` '
                      "package: pip install 'flamingo_jax[hf]'.") from e
  return tokenizers


class Backend:
  """A tokenizer.json, whole (markers as added tokens) and without them."""
  kind = 'hf'

  def __init__(self, tokenizer_json: bytes | str,
               markers: tokenizer_backends.Markers, source: str):
    tokenizers = _tokenizers()
    text = (tokenizer_json.decode() if isinstance(tokenizer_json, bytes)
            else tokenizer_json)
    try:
      self.full = tokenizers.Tokenizer.from_str(text)
      data = json.loads(text)
    except Exception as e:  # tokenizers raises its own exception type.
      raise ValueError(f'{source} is not a Hugging Face tokenizer.json: '
                       f'{e}') from e
    self.json = text.encode()
    spellings = {markers.image, markers.eoc} - {None}
    data['added_tokens'] = [t for t in data.get('added_tokens', [])
                            if t.get('content') not in spellings]
    self.plain = tokenizers.Tokenizer.from_str(json.dumps(data))

  def size(self) -> int:
    return self.full.get_vocab_size(with_added_tokens=True)

  def token_to_id(self, token: str) -> Optional[int]:
    return self.full.token_to_id(token)

  def id_to_token(self, token_id: int) -> str:
    return self.full.id_to_token(token_id)

  def encode(self, text: str) -> list[int]:
    return self.full.encode(text, add_special_tokens=False).ids

  def encode_with_markers(self, text: str) -> list[int]:
    return self.encode(text)

  def encode_plain(self, text: str) -> list[int]:
    return self.plain.encode(text, add_special_tokens=False).ids

  def decode(self, ids: list[int]) -> str:
    return self.full.decode(ids, skip_special_tokens=True)

  def files(self) -> dict[str, bytes]:
    return {FILE: self.json}


def _token_name(value: Any) -> Optional[str]:
  """A special token as tokenizer_config.json writes it (str or dict)."""
  if isinstance(value, dict):
    return value.get('content')
  return value if isinstance(value, str) else None


def special_tokens(directory: str) -> dict[str, Optional[str]]:
  """bos/eos/pad/unk names from tokenizer_config.json and
  special_tokens_map.json (the latter wins), None where neither says."""
  names: dict[str, Optional[str]] = dict(bos=None, eos=None, pad=None,
                                         unk=None)
  for file in ('tokenizer_config.json', 'special_tokens_map.json'):
    path = os.path.join(directory, file)
    if os.path.isfile(path):
      with open(path) as f:
        config = json.load(f)
      for name in names:
        value = _token_name(config.get(f'{name}_token'))
        if value is not None:
          names[name] = value
  return names


def _markers_to_add(names: dict[str, Optional[str]],
                    known: Callable[[str], bool], add: Sequence[str],
                    pad_if_missing: Optional[str]) -> list[str]:
  """The tokens of `add` the tokenizer lacks (`known`: has it), in order,
  then `pad_if_missing` when it has no pad token (named in `names`, which
  this sets, and missing): what OpenFlamingo adds after the vocabulary."""
  missing = [t for t in add if not known(t)]
  if names['pad'] is None and pad_if_missing is not None:
    names['pad'] = pad_if_missing
    if not known(pad_if_missing):
      missing.append(pad_if_missing)
  return missing


def from_hf(path: str, *, image: str = '<image>',
            eoc: Optional[str] = '<|endofchunk|>',
            add: Sequence[str] = OPEN_FLAMINGO_ADDED,
            pad_if_missing: Optional[str] = '<PAD>',
            image_around: Optional[str] = None,
            **special: Optional[str]) -> tokenizer_lib.Tokenizer:
  """A checkpoint's Hugging Face tokenizer, with Flamingo's markers.

  Args:
    path: `tokenizer.json` or the directory holding it (and its
      tokenizer_config.json / special_tokens_map.json).
    image: the `<image>` marker's spelling.
    eoc: the `<EOC>` marker's spelling; None for our extra id.
    add: tokens to add as special tokens, in order, when the tokenizer lacks
      them (default: OpenFlamingo's).
    pad_if_missing: the pad token to add when the tokenizer has none.
    image_around: a token written around each `<image>` (IDEFICS's
      `<fake_token_around_image>`; `tokenizer.Markers`).
    **special: bos=, eos=, pad=, unk= token names overriding the configs.

  Returns:
    The Tokenizer.
  """
  tokenizers = _tokenizers()
  file = path if os.path.isfile(path) else os.path.join(path, FILE)
  if not os.path.isfile(file):
    raise FileNotFoundError(f'No Hugging Face tokenizer.json at {path}.')
  directory = os.path.dirname(file)
  with open(file) as f:
    text = f.read()
  names = {**special_tokens(directory),
           **{k: v for k, v in special.items() if v is not None}}
  hf = tokenizers.Tokenizer.from_str(text)
  missing = _markers_to_add(names, lambda t: hf.token_to_id(t) is not None,
                            add, pad_if_missing)
  if missing:
    hf.add_special_tokens([tokenizers.AddedToken(t, special=True)
                           for t in missing])
    text = hf.to_str()
  markers = tokenizer_lib.Markers(image=image, eoc=eoc,
                                  image_around=image_around, **names)
  return tokenizer_lib.Tokenizer.from_backend(Backend(text, markers, file),
                                              markers, file)


def from_sentencepiece(path: str, *, image: str = '<image>',
                       eoc: Optional[str] = '<|endofchunk|>',
                       add: Sequence[str] = OPEN_FLAMINGO_ADDED,
                       pad_if_missing: Optional[str] = '<PAD>',
                       image_around: Optional[str] = None,
                       **special: Optional[str]) -> tokenizer_lib.Tokenizer:
  """A checkpoint's SentencePiece `tokenizer.model` (e.g. LLaMA's, without a
  tokenizer.json), with Flamingo's markers added as `from_hf` adds them.

  Args:
    path: `tokenizer.model` or the directory holding it.
    image, eoc, add, pad_if_missing, image_around, **special: as in
      `from_hf`; special
      tokens the configs beside the file do not name are the model's own
      (its bos/eos/unk ids' pieces).

  Returns:
    The Tokenizer: the model's pieces, then the added markers in order.
  """
  import sentencepiece  # pylint: disable=g-import-not-at-top
  file = (path if os.path.isfile(path)
          else os.path.join(path, SENTENCEPIECE_FILE))
  if not os.path.isfile(file):
    raise FileNotFoundError(f'No SentencePiece tokenizer.model at {path}.')
  with open(file, 'rb') as f:
    proto = f.read()
  sp = sentencepiece.SentencePieceProcessor(model_proto=proto)
  names = {**special_tokens(os.path.dirname(file)),
           **{k: v for k, v in special.items() if v is not None}}
  for name, token_id in (('bos', sp.bos_id()), ('eos', sp.eos_id()),
                         ('unk', sp.unk_id()), ('pad', sp.pad_id())):
    if names[name] is None and token_id >= 0:
      names[name] = sp.id_to_piece(token_id)
  pieces = {sp.id_to_piece(i) for i in range(sp.get_piece_size())}
  added = _markers_to_add(names, pieces.__contains__, add, pad_if_missing)
  markers = tokenizer_lib.Markers(image=image, eoc=eoc, added=tuple(added),
                                  image_around=image_around, **names)
  return tokenizer_lib.Tokenizer.from_sentencepiece(proto, markers,
                                                    source=file)
