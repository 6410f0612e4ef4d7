"""The subword models behind a `tokenizer.Tokenizer`, and its `Markers`.

A backend encodes and decodes text without markers; the Tokenizer puts
`<image>` and `<EOC>` around it. `SentencePiece` is a SentencePiece model
plus ids added after its pieces (as a Hugging Face `add_special_tokens`
numbers them); `hf_tokenizer.Backend` is a Hugging Face `tokenizer.json`.
"""

from collections.abc import Sequence
import dataclasses
import re
from typing import Any, Optional, Protocol

import sentencepiece as spm

IMAGE = '<image>'


@dataclasses.dataclass(frozen=True)
class Markers:
  """How a tokenizer spells the markers and which tokens are special.

  Each field is a token as the backend spells it. `eoc=None` puts `<EOC>`
  at the extra id `vocab_size` (our layout); `added` are tokens appended
  after a SentencePiece model's pieces, in order (the ids a Hugging Face
  `add_special_tokens` call gives them). `image_around`, when set, is
  written on both sides of every `<image>` of a text with markers, a run
  of it kept once (so two images in a row share one, and a text that
  already spells it is unchanged): IDEFICS's `<fake_token_around_image>`,
  as its processor writes it.
  """
  image: str = IMAGE
  eoc: Optional[str] = None
  bos: Optional[str] = '<s>'
  eos: Optional[str] = '</s>'
  pad: Optional[str] = '<pad>'
  unk: Optional[str] = '<unk>'
  added: tuple[str, ...] = ()
  image_around: Optional[str] = None

  def to_json(self) -> dict[str, Any]:
    return {**dataclasses.asdict(self), 'added': list(self.added)}

  @classmethod
  def from_json(cls, data: dict[str, Any]) -> 'Markers':
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
      raise ValueError(f'Unknown tokenizer spec fields {unknown}; expected '
                       f'{sorted(fields)}.')
    return cls(**{**data, 'added': tuple(data.get('added', ()))})


class Backend(Protocol):
  """What a Tokenizer needs of a subword model (markers are not its job)."""
  kind: str  # 'sentencepiece' or 'hf'.

  def size(self) -> int: ...  # Ids it defines, [0, size).
  def token_to_id(self, token: str) -> Optional[int]: ...
  def id_to_token(self, token_id: int) -> str: ...
  def encode(self, text: str) -> list[int]: ...  # Markers already split off.
  def encode_plain(self, text: str) -> list[int]: ...  # Never a marker.
  def decode(self, ids: list[int]) -> str: ...  # Special tokens -> ''.
  def files(self) -> dict[str, bytes]: ...  # For save_dir.


class SentencePiece:
  """A SentencePiece model plus `added` ids after its pieces."""
  kind = 'sentencepiece'
  file = 'tokenizer.model'

  def __init__(self, model_proto: bytes, source: str,
               added: Sequence[str] = (), markers: Sequence[str] = ()):
    self.proto = bytes(model_proto)
    try:
      self.sp = spm.SentencePieceProcessor(model_proto=self.proto)
    except RuntimeError as e:
      raise ValueError(
          f'{source} is not a valid SentencePiece model: {e}') from e
    base = self.sp.vocab_size()
    self.added = {token: base + i for i, token in enumerate(added)}
    self.added_tokens = {i: t for t, i in self.added.items()}
    # A marker that is a piece of the model (our `<image>`) is spelt with
    # ordinary pieces in plain text: '<' then 'image>' (SentencePiece
    # always matches a whole user-defined symbol).
    self.literals = {m: self.sp.encode(m[:1]) + self.sp.encode(m[1:])
                     for m in dict.fromkeys(markers) if m not in self.added}

  def size(self) -> int:
    return self.sp.vocab_size() + len(self.added)

  def token_to_id(self, token: str) -> Optional[int]:
    if token in self.added:
      return self.added[token]
    token_id = self.sp.piece_to_id(token)
    if token_id == self.sp.unk_id() and token != self.sp.id_to_piece(
        self.sp.unk_id()):
      return None
    return token_id

  def id_to_token(self, token_id: int) -> str:
    if token_id in self.added_tokens:
      return self.added_tokens[token_id]
    return self.sp.id_to_piece(token_id)

  def encode(self, text: str) -> list[int]:
    return self.sp.encode(text)

  def encode_plain(self, text: str) -> list[int]:
    if not self.literals:
      return self.sp.encode(text)
    pattern = '(' + '|'.join(map(re.escape, self.literals)) + ')'
    ids = []
    for part in re.split(pattern, text):
      ids.extend(self.literals[part] if part in self.literals
                 else self.sp.encode(part))
    return ids

  def decode(self, ids: list[int]) -> str:
    # Added tokens are special (pad, markers): they render as ''.
    return self.sp.decode([i for i in ids if i not in self.added_tokens])

  def files(self) -> dict[str, bytes]:
    return {self.file: self.proto}
