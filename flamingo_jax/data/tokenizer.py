"""SentencePiece tokenizer with Flamingo's `<image>` and `<EOC>` tokens.

Flamingo's LM reads a 32k SentencePiece vocabulary (Chinchilla's) plus two
markers (paper §2.4, App. A.3.1):

- `<image>` marks where a medium sits in the text. It is a user-defined
  symbol of the SentencePiece model, i.e. one ordinary piece of the frozen
  vocabulary: the LM embeds it like any text token, and phi
  (`flamingo_jax.models.media_index`) is computed from its positions.
- `<EOC>` (end of chunk) is *not* a SentencePiece piece: it is the one token
  Flamingo adds to the LM, with id `vocab_size` and its own trainable
  embedding rows (`lm/eoc_embedding`, `lm/eoc_unembedding`). The LM's logits
  therefore have `vocab_size + 1` entries.

Id layout of a model made by `Tokenizer.train` (vocab_size=512 here):

  | id       | piece              | meaning                                 |
  |----------|--------------------|-----------------------------------------|
  | 0        | `<pad>`            | padding (`pad_id`)                      |
  | 1        | `<unk>`            | unknown (not produced: byte fallback)   |
  | 2        | `<s>`              | `<BOS>` (`bos_id`)                      |
  | 3        | `</s>`             | `<EOS>` (`eos_id`)                      |
  | 4        | `<image>`          | media marker (`image_id`)               |
  | 5..260   | `<0x00>`..`<0xFF>` | byte fallback: any UTF-8 text encodes   |
  | 261..511 | learned pieces     | `▁a`, `▁dog`, ...                       |
  | 512      | (none)             | `<EOC>` (`eoc_id == vocab_size`)        |

Worked example (the learned pieces depend on the corpus):

  >>> tok = Tokenizer.train(corpus, vocab_size=512, path='/tmp/tok.model')
  >>> ids = tok.encode('<image>A dog.<EOC>')
  >>> [tok.id_to_piece(i) for i in ids]
  ['<image>', 'A', '▁dog', '.', '<EOC>']
  >>> ids[0], ids[-1]
  (4, 512)
  >>> tok.decode([tok.bos_id] + ids + [tok.eos_id])  # <BOS>, <EOS> -> ''
  '<image>A dog.<EOC>'

Whitespace is kept exactly (no dummy `▁` prefix, no whitespace collapsing,
no Unicode normalisation), so `decode(encode(s)) == s` for every string and
`' dog'` and `'dog'` are different token sequences. This is what makes the
paired datasets' random space prefix (`formatting.format_pair`) meaningful;
with SentencePiece's defaults both would encode alike. Texts are encoded
piecewise around `<EOC>`: a model with `add_dummy_prefix` (not ours) would
give each piece its own `▁`.
"""

from collections.abc import Iterable, Iterator
import io
import os
import posixpath
import re
from typing import Any

import numpy as np
import sentencepiece as spm

IMAGE = '<image>'
EOC = '<EOC>'

# Trainer options that fix the id layout above: not overridable.
_FIXED_OPTIONS = dict(
    pad_id=0, unk_id=1, bos_id=2, eos_id=3, user_defined_symbols=[IMAGE])
# Defaults a caller may override through `Tokenizer.train(**options)`.
_DEFAULT_OPTIONS = dict(
    model_type='unigram',
    byte_fallback=True,
    add_dummy_prefix=False,
    remove_extra_whitespaces=False,
    normalization_rule_name='identity',
    minloglevel=2,  # SentencePiece's INFO logs are noise at our sizes.
)


class Tokenizer:
  """A SentencePiece model plus `<EOC>` (id `vocab_size`).

  Build one with `Tokenizer.train(...)`, `Tokenizer.load(path)` or
  `Tokenizer(serialized_model_bytes)`; pickles as its serialized model.
  """

  def __init__(self, model_proto: bytes, *, source: str = '<bytes>'):
    """Loads a serialized SentencePiece ModelProto (`source`: for errors)."""
    self._proto = bytes(model_proto)
    self._source = source
    try:
      self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
    except RuntimeError as e:
      raise ValueError(
          f'{source} is not a valid SentencePiece model: {e}') from e
    self._check_specials()
    # A literal '<image>' in plain text, spelt with ordinary pieces: '<' then
    # 'image>' (SentencePiece always matches the whole user-defined symbol).
    self._literal_image = self._sp.encode('<') + self._sp.encode('image>')

  def _check_specials(self) -> None:
    sp = self._sp
    for name in ('pad', 'bos', 'eos'):
      if getattr(sp, f'{name}_id')() < 0:
        raise ValueError(f'SentencePiece model {self._source} defines no '
                         f'{name} piece; train it with Tokenizer.train.')
    if sp.encode(IMAGE) != [sp.piece_to_id(IMAGE)] or (
        sp.piece_to_id(IMAGE) == sp.unk_id()):
      raise ValueError(
          f'SentencePiece model {self._source} has no user-defined {IMAGE} '
          'piece; train it with Tokenizer.train (user_defined_symbols).')

  # -- Construction ----------------------------------------------------------

  @classmethod
  def train(
      cls,
      texts: Iterable[str],
      vocab_size: int,
      *,
      path: str | None = None,
      **options: Any,
  ) -> 'Tokenizer':
    """Trains a SentencePiece model on `texts` (one string per sentence).

    Args:
      texts: the training corpus; each string is one SentencePiece sentence
        (SentencePiece skips those longer than `max_sentence_length` bytes,
        4192 by default).
      vocab_size: the SentencePiece vocabulary size, i.e. the LM's
        `vocab_size`; `<EOC>` comes on top. With byte fallback (the default)
        it must exceed 261 + the corpus' distinct characters kept.
      path: where to write the `.model` file (local or gs://); none if None.
      **options: other SentencePieceTrainer options (`model_type`,
        `character_coverage`, `byte_fallback`, `split_digits`, ...); the
        special-id options are fixed and cannot be given.

    Returns:
      The trained tokenizer.

    Raises:
      ValueError: no text, a vocab_size the corpus cannot fill or is too
        small for, a fixed option given, or another training failure.
    """
    fixed = sorted(set(options) & set(_FIXED_OPTIONS))
    if fixed:
      raise ValueError(f'Trainer options {fixed} are fixed by Tokenizer '
                       f'(the id layout is {_FIXED_OPTIONS}).')
    counter = _Counter(texts)
    model = io.BytesIO()
    try:
      spm.SentencePieceTrainer.train(
          sentence_iterator=iter(counter), model_writer=model,
          vocab_size=vocab_size,
          **{**_DEFAULT_OPTIONS, **options, **_FIXED_OPTIONS})
    except RuntimeError as e:
      raise _training_error(e, vocab_size, counter.count) from e
    tokenizer = cls(model.getvalue(), source=path or '<trained>')
    if path is not None:
      tokenizer.save(path)
    return tokenizer

  @classmethod
  def load(cls, path: str) -> 'Tokenizer':
    """Loads a `.model` file: a local path, or gs:// etc. via tf.io.gfile."""
    return cls(_read_bytes(path), source=path)

  def save(self, path: str) -> None:
    """Writes the serialized SentencePiece model to `path`."""
    _write_bytes(path, self._proto)

  @property
  def serialized_model(self) -> bytes:
    return self._proto

  def __getstate__(self) -> dict[str, Any]:
    return {'model_proto': self._proto, 'source': self._source}

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__init__(state['model_proto'], source=state['source'])

  # -- Ids -------------------------------------------------------------------

  @property
  def vocab_size(self) -> int:
    """SentencePiece pieces; equals the LM's `vocab_size` (without `<EOC>`)."""
    return self._sp.vocab_size()

  @property
  def pad_id(self) -> int:
    return self._sp.pad_id()

  @property
  def unk_id(self) -> int:
    return self._sp.unk_id()

  @property
  def bos_id(self) -> int:
    return self._sp.bos_id()

  @property
  def eos_id(self) -> int:
    return self._sp.eos_id()

  @property
  def image_id(self) -> int:
    return self._sp.piece_to_id(IMAGE)

  @property
  def eoc_id(self) -> int:
    return self.vocab_size

  # -- Text ------------------------------------------------------------------

  def encode(self, text: str, *, parse_markers: bool = True) -> list[int]:
    """Text to ids; no `<BOS>`/`<EOS>` are added.

    Args:
      text: the string to encode.
      parse_markers: if True, each '<image>' becomes `image_id` and each
        '<EOC>' becomes `eoc_id`. If False, both are spelt with ordinary
        text pieces, so a document's own text can never forge a marker.

    Returns:
      The ids, each in [0, vocab_size].
    """
    if not parse_markers:
      return self._encode_plain(text)
    ids = []
    for i, part in enumerate(text.split(EOC)):
      if i:
        ids.append(self.eoc_id)
      ids.extend(self._sp.encode(part))
    return ids

  def _encode_plain(self, text: str) -> list[int]:
    ids = []
    for i, part in enumerate(text.split(IMAGE)):
      if i:
        ids.extend(self._literal_image)
      ids.extend(self._sp.encode(part))
    return ids

  def decode(self, ids: Iterable[int] | np.ndarray) -> str:
    """Ids to text; `eoc_id` renders as '<EOC>', `<image>` as '<image>'.

    Decodes everything: it stops at neither `<EOC>` nor `<EOS>`. The control
    pieces `<pad>`, `<BOS>` and `<EOS>` render as ''.
    """
    ids = [int(i) for i in np.asarray(ids, dtype=np.int64).reshape(-1)]
    bad = [i for i in ids if not 0 <= i <= self.eoc_id]
    if bad:
      raise ValueError(f'Token id {bad[0]} is outside [0, {self.eoc_id}] '
                       f'(vocab_size={self.vocab_size}, plus <EOC>).')
    parts, current = [], []
    for i in ids:
      if i == self.eoc_id:
        parts.append(current)
        current = []
      else:
        current.append(i)
    parts.append(current)
    return EOC.join(self._sp.decode(part) for part in parts)

  def id_to_piece(self, token_id: int) -> str:
    return EOC if token_id == self.eoc_id else self._sp.id_to_piece(token_id)


class _Counter:
  """Iterates over training texts once, counting them and checking types."""

  def __init__(self, texts: Iterable[str]):
    self._texts = texts
    self.count = 0

  def __iter__(self) -> Iterator[str]:
    for text in self._texts:
      if not isinstance(text, str):
        raise TypeError(f'Training texts must be str; got {type(text)}.')
      self.count += 1
      yield text


def _training_error(e: RuntimeError, vocab_size: int,
                    num_texts: int) -> ValueError:
  """Turns SentencePiece's trainer assertion into an actionable message."""
  message = str(e)
  detail = message.split('] ', 1)[-1].strip()
  if num_texts == 0:
    return ValueError('Tokenizer.train got no training text.')
  if 'smaller than required_chars' in message:
    return ValueError(
        f'vocab_size={vocab_size} is too small for this corpus: the special '
        'pieces, the 256 byte pieces (byte fallback) and the corpus '
        f'characters need more. Raise vocab_size. ({detail})')
  if 'too high' in message:
    limit = re.search(r'<= (\d+)', message)
    return ValueError(
        f'vocab_size={vocab_size} is too large for this corpus of '
        f'{num_texts} texts: SentencePiece found at most '
        f'{limit.group(1) if limit else "fewer"} pieces. Use more text or a '
        f'smaller vocab_size. ({detail})')
  return ValueError(f'SentencePiece training failed: {message}')


def _is_remote(path: str) -> bool:
  return '://' in path


def _gfile(path: str) -> Any:
  """tf.io.gfile, imported only for remote paths (TensorFlow loads slowly)."""
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        f'Reading {path} needs TensorFlow (tf.io.gfile); install it or copy '
        'the model to a local path.') from e
  return tf.io.gfile


def _read_bytes(path: str) -> bytes:
  if _is_remote(path):
    gfile = _gfile(path)
    if not gfile.exists(path):
      raise FileNotFoundError(f'SentencePiece model file not found: {path}')
    with gfile.GFile(path, 'rb') as f:
      return f.read()
  if not os.path.isfile(path):
    raise FileNotFoundError(f'SentencePiece model file not found: {path}')
  with open(path, 'rb') as f:
    return f.read()


def _write_bytes(path: str, data: bytes) -> None:
  if _is_remote(path):
    gfile = _gfile(path)
    gfile.makedirs(posixpath.dirname(path))
    with gfile.GFile(path, 'wb') as f:
      f.write(data)
    return
  directory = os.path.dirname(path)
  if directory:
    os.makedirs(directory, exist_ok=True)
  with open(path, 'wb') as f:
    f.write(data)
