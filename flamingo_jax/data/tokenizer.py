"""SentencePiece tokenizer with Flamingo's `<image>` and `<EOC>` tokens.

Flamingo's LM reads a 32k SentencePiece vocabulary (Chinchilla's) plus two
markers (paper §2.4, App. A.3.1):

- `<image>` marks where a medium sits in the text. It is a user-defined
  symbol of the SentencePiece model, i.e. one ordinary piece of the frozen
  vocabulary: the LM embeds it like any text token, and phi
  (`flamingo_jax.data.media_index`) is computed from its positions.
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

Imported tokenizers. A published model's own tokenizer -- a Hugging Face
`tokenizer.json` (`data/hf_tokenizer.py`) or any SentencePiece `.model` --
is a `Tokenizer` too, with a `Markers` spec that says how that checkpoint
spells `<image>` and `<EOC>` (OpenFlamingo: `<image>` and `<|endofchunk|>`,
two ids its tokenizer adds after the base vocabulary) and which tokens are
`<BOS>`, `<EOS>` and `<pad>`. Prompts and documents keep writing `<image>`
and `<EOC>`: `encode` maps both (and the checkpoint's own spellings) to the
marker ids, `decode` renders them as `<image>` and `<EOC>`, and neither
needs `<image>` to be a piece of the SentencePiece model. `vocab_size` is
then the LM's embedding rows, markers included when the checkpoint has them
(`eoc_id < vocab_size`); only in our own layout is `<EOC>` the extra id
`vocab_size`. Such a tokenizer is saved as a directory (`save_dir`: the
backend's file and `flamingo_tokenizer.json`, the spec), which
`Tokenizer.load` takes.
"""

from collections.abc import Iterable, Iterator
import io
import json
import posixpath
import re
from typing import Any, Optional

import numpy as np
import sentencepiece as spm

from flamingo_jax import fs
from flamingo_jax.data import tokenizer_backends as backends
from flamingo_jax.data.tokenizer_backends import Markers

IMAGE = backends.IMAGE  # '<image>'
EOC = '<EOC>'
SPEC_FILE = 'flamingo_tokenizer.json'  # An imported tokenizer's spec.

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
  """A subword model plus the `<image>` and `<EOC>` markers.

  Build one with `Tokenizer.train(...)`, `Tokenizer.load(path)`,
  `Tokenizer(serialized_model_bytes)` (our SentencePiece layout, see the
  module docstring), `Tokenizer.from_sentencepiece(...)` (any SentencePiece
  model, with a `Markers` spec) or `hf_tokenizer.from_hf(...)`; pickles as
  its files and spec.
  """

  def __init__(self, model_proto: bytes, *, source: str = '<bytes>',
               markers: Optional[Markers] = None):
    """A serialized SentencePiece ModelProto (`source`: for errors).

    Without `markers`, the model must have our layout (`Tokenizer.train`).
    """
    own_layout = markers is None
    markers = markers or Markers()
    backend = backends.SentencePiece(model_proto, source, markers.added,
                             (IMAGE, markers.image))
    self._setup(backend, markers, source, own_layout)

  @classmethod
  def from_backend(cls, backend: backends.Backend, markers: Markers,
                   source: str) -> 'Tokenizer':
    """A tokenizer over any Backend (e.g. `hf_tokenizer`'s)."""
    tokenizer = cls.__new__(cls)
    tokenizer._setup(backend, markers, source, own_layout=False)
    return tokenizer

  @classmethod
  def from_sentencepiece(cls, model_proto: bytes, markers: Markers, *,
                         source: str = '<bytes>') -> 'Tokenizer':
    """Any SentencePiece model (e.g. LLaMA's), its markers per `markers`:
    a marker that is not one of its pieces goes in `markers.added`."""
    return cls(model_proto, source=source, markers=markers)

  def _setup(self, backend: backends.Backend, markers: Markers, source: str,
             own_layout: bool) -> None:
    self._backend, self._markers, self._source = backend, markers, source
    self._own_layout = own_layout
    if own_layout:
      self._check_own_layout()
      sp = backend.sp
      self._ids = dict(pad=sp.pad_id(), unk=sp.unk_id(), bos=sp.bos_id(),
                       eos=sp.eos_id())
    else:
      self._ids = {name: self._special_id(name)
                   for name in ('pad', 'unk', 'bos', 'eos')}
    self._image_id = self._marker_id(markers.image, IMAGE)
    self._eoc_id = (backend.size() if markers.eoc is None
                    else self._marker_id(markers.eoc, EOC))
    # Text -> marker id: the canonical spellings and the checkpoint's.
    self._marker_ids = {IMAGE: self._image_id, EOC: self._eoc_id,
                        markers.image: self._image_id}
    if markers.eoc is not None:
      self._marker_ids[markers.eoc] = self._eoc_id
    if markers.image_around is not None:
      self._marker_ids[markers.image_around] = self._marker_id(
          markers.image_around, 'image_around')
    spellings = sorted(self._marker_ids, key=len, reverse=True)
    self._marker_pattern = re.compile(
        '(' + '|'.join(map(re.escape, spellings)) + ')')

  def _check_own_layout(self) -> None:
    sp = self._backend.sp
    for name in ('pad', 'bos', 'eos'):
      if getattr(sp, f'{name}_id')() < 0:
        raise ValueError(f'SentencePiece model {self._source} defines no '
                         f'{name} piece; train it with Tokenizer.train, or '
                         'load another model with '
                         'Tokenizer.from_sentencepiece and a Markers spec.')
    if sp.encode(IMAGE) != [sp.piece_to_id(IMAGE)] or (
        sp.piece_to_id(IMAGE) == sp.unk_id()):
      raise ValueError(
          f'SentencePiece model {self._source} has no user-defined {IMAGE} '
          'piece; train it with Tokenizer.train (user_defined_symbols), or '
          'load a model without one with Tokenizer.from_sentencepiece and '
          "Markers(added=('<image>', ...)).")

  def _special_id(self, name: str) -> int:
    token = getattr(self._markers, name)
    if token is None:
      if name == 'unk':
        return -1
      raise ValueError(f'Tokenizer {self._source} has no {name} token: name '
                       'one in its Markers (or add one, as OpenFlamingo adds '
                       "'<PAD>').")
    token_id = self._backend.token_to_id(token)
    if token_id is None:
      raise ValueError(f'Tokenizer {self._source}: its {name} token '
                       f'{token!r} is not in the vocabulary.')
    return token_id

  def _marker_id(self, token: str, what: str) -> int:
    token_id = self._backend.token_to_id(token)
    if token_id is None:
      raise ValueError(
          f'Tokenizer {self._source}: the {what} marker {token!r} is not a '
          'token of it; add it (Markers.added, or the Hugging Face '
          "tokenizer's added tokens).")
    return token_id

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
    """Loads a `.model` file (our layout), or an imported tokenizer's
    `flamingo_tokenizer.json` (or its directory); local or gs:// etc."""
    if path.endswith('.json') or (not fs.is_url(path)
                                  and fs.isdir(path)):
      return load_dir(path)
    return cls(_read_bytes(path), source=path)

  def save(self, path: str) -> None:
    """Writes the serialized SentencePiece model to `path` (our layout;
    an imported tokenizer is saved with `save_dir`)."""
    if not self._own_layout:
      raise ValueError('An imported tokenizer is several files: use '
                       'save_dir(directory).')
    _write_bytes(path, self._backend.proto)

  def save_dir(self, directory: str) -> str:
    """Writes the backend's file(s) and the spec; returns the spec's path,
    which `Tokenizer.load` takes."""
    files = self._backend.files()
    spec = {'backend': self._backend.kind, 'files': sorted(files),
            'markers': self._markers.to_json(),
            'own_layout': self._own_layout}
    for name, data in files.items():
      _write_bytes(posixpath.join(directory, name), data)
    spec_path = posixpath.join(directory, SPEC_FILE)
    _write_bytes(spec_path, json.dumps(spec, indent=1).encode())
    return spec_path

  def files(self) -> dict[str, bytes]:
    """The backend's files, as `save_dir` writes them (without the spec)."""
    return self._backend.files()

  @property
  def serialized_model(self) -> bytes:
    """The SentencePiece model (SentencePiece-based tokenizers only)."""
    return self._backend.files()[backends.SentencePiece.file]

  @property
  def markers(self) -> Markers:
    return self._markers

  def __getstate__(self) -> dict[str, Any]:
    return {'backend': self._backend.kind, 'files': self._backend.files(),
            'markers': self._markers.to_json(), 'source': self._source,
            'own_layout': self._own_layout}

  def __setstate__(self, state: dict[str, Any]) -> None:
    restored = _from_files(state['backend'], state['files'],
                           Markers.from_json(state['markers']),
                           state['own_layout'], state['source'])
    self.__dict__.update(restored.__dict__)

  # -- Ids -------------------------------------------------------------------

  @property
  def vocab_size(self) -> int:
    """The LM's `vocab_size`: ids [0, vocab_size) are its embedding rows
    (with our layout `<EOC>` is the extra id `vocab_size`)."""
    return self._backend.size()

  @property
  def pad_id(self) -> int:
    return self._ids['pad']

  @property
  def unk_id(self) -> int:
    return self._ids['unk']

  @property
  def bos_id(self) -> int:
    return self._ids['bos']

  @property
  def eos_id(self) -> int:
    return self._ids['eos']

  @property
  def image_id(self) -> int:
    return self._image_id

  @property
  def eoc_id(self) -> int:
    return self._eoc_id

  @property
  def num_ids(self) -> int:
    """Ids `decode` accepts: [0, num_ids)."""
    return max(self.vocab_size, self.eoc_id + 1)

  # -- Text ------------------------------------------------------------------

  def encode(self, text: str, *, parse_markers: bool = True) -> list[int]:
    """Text to ids; no `<BOS>`/`<EOS>` are added.

    Args:
      text: the string to encode.
      parse_markers: if True, each '<image>' becomes `image_id` and each
        '<EOC>' becomes `eoc_id` (so do the checkpoint's own spellings of
        them). If False, both are spelt with ordinary text pieces, so a
        document's own text can never forge a marker.

    Returns:
      The ids, each in [0, num_ids).
    """
    if not parse_markers:
      return self._backend.encode_plain(text)
    text = self._wrap_images(text)
    if hasattr(self._backend, 'encode_with_markers') and self._markers.eoc:
      # The backend knows both markers as tokens: it encodes the whole text
      # as the original model did (see hf_tokenizer), in its spellings.
      return self._backend.encode_with_markers(
          text.replace(EOC, self._markers.eoc).replace(
              IMAGE, self._markers.image))
    ids = []
    for part in self._marker_pattern.split(text):
      if part in self._marker_ids:
        ids.append(self._marker_ids[part])
      elif part:
        ids.extend(self._backend.encode(part))
    return ids

  def _wrap_images(self, text: str) -> str:
    """Each `<image>` between `image_around` tokens, a run of them kept
    once (`Markers`); `text` as it is without `image_around`."""
    around = self._markers.image_around
    if around is None:
      return text
    images = '|'.join(map(re.escape, {IMAGE, self._markers.image}))
    text = re.sub(images, around + IMAGE + around, text)
    return re.sub(f'(?:{re.escape(around)})+', around, text)

  def decode(self, ids: Iterable[int] | np.ndarray) -> str:
    """Ids to text; `eoc_id` renders as '<EOC>', `<image>` as '<image>'.

    Decodes everything: it stops at neither `<EOC>` nor `<EOS>`. The control
    pieces `<pad>`, `<BOS>` and `<EOS>` render as ''.
    """
    ids = [int(i) for i in np.asarray(ids, dtype=np.int64).reshape(-1)]
    bad = [i for i in ids if not 0 <= i < self.num_ids]
    if bad:
      raise ValueError(
          f'Token id {bad[0]} is outside [0, {self.num_ids - 1}] '
          f'(vocab_size={self.vocab_size}, eoc_id={self.eoc_id}).')
    markers = {self.image_id: IMAGE, self.eoc_id: EOC}
    parts, current = [], []
    for i in ids:
      if i in markers:
        parts.append(self._backend.decode(current))
        parts.append(markers[i])
        current = []
      else:
        current.append(i)
    parts.append(self._backend.decode(current))
    return ''.join(parts)

  def id_to_piece(self, token_id: int) -> str:
    if token_id == self.eoc_id:
      return EOC
    if token_id == self.image_id:
      return IMAGE
    return self._backend.id_to_token(token_id)


def load_dir(path: str) -> Tokenizer:
  """An imported tokenizer saved by `save_dir`: its spec JSON or directory."""
  spec_path = (path if path.endswith('.json')
               else posixpath.join(path, SPEC_FILE))
  directory = posixpath.dirname(spec_path)
  try:
    spec = json.loads(_read_bytes(spec_path).decode())
    kind, names = spec['backend'], spec['files']
    markers = Markers.from_json(spec['markers'])
  except (KeyError, TypeError, ValueError) as e:
    raise ValueError(f'{spec_path} is not a tokenizer spec: {e}') from e
  files = {name: _read_bytes(posixpath.join(directory, name))
           for name in names}
  return _from_files(kind, files, markers, spec.get('own_layout', False),
                     spec_path)


def _from_files(kind: str, files: dict[str, bytes], markers: Markers,
                own_layout: bool, source: str) -> Tokenizer:
  if kind == backends.SentencePiece.kind:
    proto = files[backends.SentencePiece.file]
    return Tokenizer(proto, source=source,
                     markers=None if own_layout else markers)
  if kind == 'hf':
    # pylint: disable-next=g-import-not-at-top
    from flamingo_jax.data import hf_tokenizer
    return Tokenizer.from_backend(
        hf_tokenizer.Backend(files[hf_tokenizer.FILE], markers, source),
        markers, source)
  raise ValueError(f'{source}: unknown tokenizer backend {kind!r}.')


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


def _read_bytes(path: str) -> bytes:
  # A URL is an object (gs:// has no directories to tell apart).
  if not (fs.exists(path) if fs.is_url(path) else fs.isfile(path)):
    raise FileNotFoundError(f'SentencePiece model file not found: {path}')
  return fs.read_bytes(path)


def _write_bytes(path: str, data: bytes) -> None:
  directory = fs.dirname(path)
  if directory:
    fs.makedirs(directory)
  with fs.open_file(path, 'wb') as f:
    f.write(data)
