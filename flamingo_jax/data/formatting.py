"""Examples to fixed-length training sequences (paper §2.4, App. A.3).

Two kinds of example become the same sequence layout:

- Interleaved documents (M3W): a list of chunks, `{'text': str}` or
  `{'image': i}` (i: index of the image in the document's own image list).
  A text chunk may carry `'supervised': False`: its tokens are read but not
  learned (loss_mask 0), e.g. a made-up word at its first showing, which no
  reader could predict (the world's nonce episodes).
- Image/video-text pairs (ALIGN, LTIP, VTP): a caption, seen as the
  one-image document `[{'image': 0}, {'text': caption}]`.

Layout. A chunk is the text before the first image (when there is any) or an
image together with the text that follows it, up to the next image. Every
chunk ends with `<EOC>`; the sequence opens with `<BOS>` and closes with
`<EOC><EOS>`:

  chunks: [text 'Pets!'] [img 0] [text 'My dog.'] [img 1] [text 'My cat.']
  ids:    <BOS> Pets! <EOC> <image> My dog. <EOC> <image> My cat. <EOC> <EOS>

  chunks: [img 0] [text 'A picture of my dog.'] [img 1] [text 'My cat.']
  ids:    <BOS> <image> A picture of my dog. <EOC> <image> My cat. <EOC> <EOS>

So `<EOC>` comes before every `<image>` (the paper's rule), except when the
image follows `<BOS>` directly: nothing precedes it, so no chunk ends there.
This makes a pair `<BOS><image>caption<EOC><EOS>` exactly as the paper writes
it, and matches the few-shot prompts (`<BOS><image>Output: ...<EOC><image>`,
`caption_prompt`) the model is evaluated with. Two images in a row give
`<image><EOC><image>` (an image-only chunk). Text chunks are concatenated
verbatim (put separators in the text); whitespace-only text is dropped.
Document text is encoded with `parse_markers=False`, so a literal '<image>'
in a web page is plain text and can never be a marker without an image.
Only the tokenizer's ids are used (`bos_id`, `image_id`, `eoc_id`, ...), so
an imported tokenizer (`data/tokenizer.py`: a checkpoint's Hugging Face or
SentencePiece tokenizer, its markers added after the vocabulary) formats
the same way.

Training arrays (L = seq_len, N = max_media), for the full id stream S above
cut to S' (see truncation): `tokens = S'[:-1]`, `targets = S'[1:]`, padded.
For [img 0] 'd1 d2' [img 1] 'c1 c2' (d*, c*: text ids) and L = 11:

  (B = <BOS>, I = <image>, C = <EOC>, E = <EOS>, _ = <pad>)
  tokens        B  I  d1 d2 C  I  c1 c2 C  _  _
  targets       I  d1 d2 C  I  c1 c2 C  E  _  _
  loss_mask     0  1  1  1  0  1  1  1  1  0  0
  media_index   0  1  1  1  1  2  2  2  2  0  0   (previous image)
  media_index   1  1  2  2  2  2  0  0  0  0  0   (next image: p_next)
  kept_media [0, 1, -1, -1, -1] for N = 5; num_media 2; media_mask [T T F F F]

`loss_mask` is 0 at padding, where the target is an `<image>` marker
(which image comes next is not text to predict) and at the text of chunks
marked `'supervised': False`; `<EOC>` and `<EOS>` targets are supervised.
`media_index` is phi from `compute_media_index` over the kept tokens, 0 at
padding; per document, with probability `p_next` text attends
to the next image instead of the previous one (Table 10 iii).

Truncation. S' is S cut at the first of
  1. the (N+1)-th `<image>`: the first N images are kept and the text stops
     before the next image (its `<EOC>` stays: that chunk did end there);
     the paper keeps "the first 5 images" of a sequence and drops the others,
     and cutting before the next marker means no marker lacks its image;
  2. L + 1 ids: L inputs, the last with its true next id as target.
Only images whose marker is among `tokens` are kept (`kept_media`), so every
marker has its image and every kept image its marker.

Random window (App. A.3: "we sample a random subsequence of L = 256 tokens
and take up to the first N = 5 images included in it"). With `window_rng`,
a document longer than L + 1 ids is first cut to a window of them, drawn
uniformly: <BOS> followed by S[o + 1 : o + 1 + L] for an offset o in
[0, len(S) - L - 1] (o = 0 is the cut above); then truncation 1 applies
within the window. Text before the window's first marker attends to no
image (phi = 0), as text before a document's first image does. The
pipeline draws o from the example's own generator of (seed, dataset,
global position), so every step sees another window of a document and a
resumed run the same ones. Nothing is reported
half-written: a malformed example raises `ValueError`; an example with
nothing to learn returns `Skip(reason)` for the pipeline to count.

Glossary of shapes:
  L: sequence length (256 for M3W, 32 for pairs in the paper).
  N: media slots (max_media: 5 for M3W in training, 1 for pairs).
"""

from collections.abc import Mapping, Sequence
import dataclasses

import numpy as np

from flamingo_jax.data import media_index as media_index_lib
from flamingo_jax.data import tokenizer as tokenizer_lib

# {'text': str}, {'text': str, 'supervised': bool} or {'image': int}.
Chunk = Mapping[str, str | int | bool]
Example = dict[str, np.ndarray]

# Skip reasons, for the pipeline's counters.
EMPTY_CAPTION = 'empty_caption'  # A pair whose caption is empty or blank.
NO_TEXT = 'no_text'  # A document with no non-blank text chunk.
NO_TEXT_KEPT = 'no_text_kept'  # Text exists but none survives truncation.


@dataclasses.dataclass(frozen=True)
class Skip:
  """An example that yields no training sequence, and why."""

  reason: str  # One of EMPTY_CAPTION, NO_TEXT, NO_TEXT_KEPT.
  detail: str = ''


def format_document(
    chunks: Sequence[Chunk],
    tokenizer: tokenizer_lib.Tokenizer,
    *,
    seq_len: int = 256,
    max_media: int = 5,
    p_next: float = 0.0,
    rng: np.random.Generator | None = None,
    window_rng: np.random.Generator | None = None,
) -> Example | Skip:
  """Formats one interleaved document (see the module docstring).

  Args:
    chunks: `{'text': str}` and `{'image': int}` entries in document order.
    tokenizer: the tokenizer.
    seq_len: L, the output length.
    max_media: N, the most images kept.
    p_next: probability that the document's text attends to the next image.
    rng: draws the p_next coin, once per call (before any skip, so the
      number of draws does not depend on the content); needed only when
      0 < p_next < 1.
    window_rng: draws the offset of a random window of L + 1 ids (one draw,
      only for a document longer than that); None: its beginning.

  Returns:
    A dict `tokens`, `targets` int32 [L], `loss_mask` float32 [L],
    `media_index` int32 [L], `num_media` int32 [], `kept_media` int32 [N]
    (source image index per slot, -1 when empty), `media_mask` bool [N]; or
    a `Skip` when nothing is left to learn.

  Raises:
    ValueError: malformed chunks, bad sizes or a missing rng.
  """
  _check_sizes(seq_len, max_media)
  attend_next = _coin(p_next, rng, 'p_next')
  stream = _build_stream(chunks, tokenizer)
  if stream is None:
    return Skip(NO_TEXT, 'the document has no non-blank text')
  ids, source, is_text, unlearned = stream
  if window_rng is not None and len(ids) > seq_len + 1:
    offset = int(window_rng.integers(0, len(ids) - seq_len))
    keep = np.r_[0, offset + 1:offset + 1 + seq_len]  # <BOS>, the window.
    ids, source, is_text, unlearned = (ids[keep], source[keep],
                                       is_text[keep], unlearned[keep])
  end = _cut(source, seq_len, max_media)
  if not is_text[1:end].any():
    return Skip(NO_TEXT_KEPT, f'no text left with seq_len={seq_len}, '
                f'max_media={max_media}')
  return _to_arrays(ids[:end], source[:end], unlearned[:end], seq_len,
                    max_media, attend_next, tokenizer.pad_id)


def format_pair(
    caption: str,
    tokenizer: tokenizer_lib.Tokenizer,
    *,
    seq_len: int = 32,
    space_prefix_prob: float = 0.5,
    rng: np.random.Generator | None = None,
) -> Example | Skip:
  """Formats an image/video-text pair as `<BOS><image>caption<EOC><EOS>`.

  The caption is stripped and, with probability `space_prefix_prob`,
  prefixed with one space: in documents the text after an `<image>` may or
  may not start with a space, and our tokenizer keeps that difference.

  Args:
    caption: the caption (alt-text).
    tokenizer: the tokenizer.
    seq_len: L, the output length.
    space_prefix_prob: probability of the space prefix.
    rng: draws the space coin, once per call (also for skipped captions);
      needed only when 0 < space_prefix_prob < 1.

  Returns:
    As `format_document`, with N = 1; or `Skip(EMPTY_CAPTION)`.
  """
  prefix = _coin(space_prefix_prob, rng, 'space_prefix_prob')
  caption = caption.strip()
  if not caption:
    return Skip(EMPTY_CAPTION, 'the caption is empty or blank')
  if prefix:
    caption = ' ' + caption
  return format_document([{'image': 0}, {'text': caption}], tokenizer,
                         seq_len=seq_len, max_media=1)


def empty_example(seq_len: int, max_media: int) -> Example:
  """An all-padding example (e.g. to fill a last batch): loss_mask all 0."""
  _check_sizes(seq_len, max_media)
  return {
      'tokens': np.zeros([seq_len], np.int32),
      'targets': np.zeros([seq_len], np.int32),
      'loss_mask': np.zeros([seq_len], np.float32),
      'media_index': np.zeros([seq_len], np.int32),
      'num_media': np.zeros([], np.int32),
      'kept_media': np.full([max_media], -1, np.int32),
      'media_mask': np.zeros([max_media], bool),
  }


def caption_prompt(caption: str | None = None) -> str:
  """A captioning shot, '<image>Output: {caption}<EOC>', or the open query."""
  if caption is None:
    return f'{tokenizer_lib.IMAGE}Output:'
  return f'{tokenizer_lib.IMAGE}Output: {caption}{tokenizer_lib.EOC}'


def vqa_prompt(question: str, answer: str | None = None) -> str:
  """A VQA shot, '<image>Question: {q} Answer: {a}<EOC>', or the open query."""
  prompt = f'{tokenizer_lib.IMAGE}Question: {question} Answer:'
  if answer is None:
    return prompt
  return f'{prompt} {answer}{tokenizer_lib.EOC}'


def _check_sizes(seq_len: int, max_media: int) -> None:
  if seq_len < 1:
    raise ValueError(f'seq_len must be >= 1; got {seq_len}.')
  if max_media < 0:
    raise ValueError(f'max_media must be >= 0; got {max_media}.')


def _coin(p: float, rng: np.random.Generator | None, name: str) -> bool:
  """True with probability p; certain outcomes need no rng."""
  if not 0.0 <= p <= 1.0:
    raise ValueError(f'{name} must be in [0, 1]; got {p}.')
  if p in (0.0, 1.0):
    return p == 1.0
  if rng is None:
    raise ValueError(f'{name}={p} needs an rng (np.random.Generator).')
  return bool(rng.random() < p)


def _parse_chunk(chunk: Chunk, position: int
                 ) -> tuple[str, str | int, bool]:
  """('text', str, supervised) or ('image', int, False), or a ValueError
  naming the chunk."""
  supervised = chunk.get('supervised', True) if isinstance(
      chunk, Mapping) else None
  if (not isinstance(chunk, Mapping) or not isinstance(supervised, bool)
      or len(chunk) != 1 + ('supervised' in chunk)):
    raise ValueError(f'Chunk {position} must be {{"text": str}} (with an '
                     f'optional "supervised": bool) or {{"image": int}}; '
                     f'got {chunk!r}.')
  (kind, value), = ((k, v) for k, v in chunk.items() if k != 'supervised')
  if kind == 'text' and isinstance(value, str):
    return kind, value, supervised
  if (kind == 'image' and 'supervised' not in chunk
      and isinstance(value, (int, np.integer))
      and not isinstance(value, bool) and value >= 0):
    return kind, int(value), False
  raise ValueError(f'Chunk {position} must be {{"text": str}} or '
                   f'{{"image": int >= 0}}; got {chunk!r}.')


def _build_stream(
    chunks: Sequence[Chunk], tokenizer: tokenizer_lib.Tokenizer,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
  """The whole document's ids S, their source image (-1: none), is-text,
  and unlearned (text of a chunk marked 'supervised': False).

  Returns None when the document has no non-blank text.
  """
  ids, source, is_text, unlearned = [tokenizer.bos_id], [-1], [False], [False]
  # Consecutive text chunks of one supervision, encoded together.
  pending, pending_supervised = [], True

  def flush_text():
    text = ''.join(pending)
    pending.clear()
    if text.strip():
      text_ids = tokenizer.encode(text, parse_markers=False)
      ids.extend(text_ids)
      source.extend([-1] * len(text_ids))
      is_text.extend([True] * len(text_ids))
      unlearned.extend([not pending_supervised] * len(text_ids))

  def append(token_id, image=-1):
    ids.append(token_id)
    source.append(image)
    is_text.append(False)
    unlearned.append(False)

  for position, chunk in enumerate(chunks):
    kind, value, supervised = _parse_chunk(chunk, position)
    if kind == 'text':
      if pending and supervised != pending_supervised:
        flush_text()
      pending_supervised = supervised
      pending.append(value)
      continue
    flush_text()
    if len(ids) > 1:  # A chunk ends here; right after <BOS> none does.
      append(tokenizer.eoc_id)
    append(tokenizer.image_id, value)
  flush_text()
  if not any(is_text):
    return None
  append(tokenizer.eoc_id)
  append(tokenizer.eos_id)
  return (np.array(ids, np.int32), np.array(source, np.int32),
          np.array(is_text, bool), np.array(unlearned, bool))


def _cut(source: np.ndarray, seq_len: int, max_media: int) -> int:
  """Length of S': before the (N+1)-th marker, and at most L + 1 ids."""
  markers = np.flatnonzero(source >= 0)
  end = len(source)
  if len(markers) > max_media:
    end = int(markers[max_media])
  return min(end, seq_len + 1)


def _to_arrays(
    ids: np.ndarray,  # [n + 1] S'
    source: np.ndarray,  # [n + 1]
    unlearned: np.ndarray,  # [n + 1]
    seq_len: int,
    max_media: int,
    attend_next: bool,
    pad_id: int,
) -> Example:
  """tokens/targets/masks/phi for S', padded to L; media slots padded to N."""
  n = len(ids) - 1
  is_marker = source[:n] >= 0  # [n]
  kept = source[:n][is_marker]  # [num_media]
  phi = media_index_lib.compute_media_index(is_marker, len(kept),
                                            attend_next)  # [n]
  # [n]: the target is not an <image> marker, nor text marked unsupervised.
  supervised = (source[1:] < 0) & ~unlearned[1:]

  def pad(x, value, length=seq_len):
    return np.pad(x, (0, length - len(x)), constant_values=value)

  return {
      'tokens': pad(ids[:-1], pad_id).astype(np.int32),
      'targets': pad(ids[1:], pad_id).astype(np.int32),
      'loss_mask': pad(supervised.astype(np.float32), 0.0),
      'media_index': pad(phi, 0).astype(np.int32),
      'num_media': np.array(len(kept), np.int32),
      'kept_media': pad(kept, -1, max_media).astype(np.int32),
      'media_mask': pad(np.ones(len(kept), bool), False, max_media),
  }
