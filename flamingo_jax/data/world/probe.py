"""Held-out episodes for the binding probes, as model inputs.

The probe (`flamingo_jax.training.probe`, logged while training) asks: at
the query position of an episode, how much more likely is the word bound to
the query's picture than the episode's other words? Each probe episode binds
`ways` made-up words (from the 'eval' half of the word space: never trained
on) to shapes or colours through `shots` support pictures per word, in the
few-shot format, and asks one query per word. Every query is continued by
every word of the episode, one row each:

  <BOS><image>This is a dax.<EOC> ... <image>This is a blicket.<EOC>
      <image>This is a| dax.<EOC>        (row: query q, candidate c)

`score_mask` marks the targets of the continuation after '|' (the word, the
rest of the line and <EOC>). The rows of one episode share their support,
and the text of a query's prompt does not depend on which picture it shows:
a model blind to the pictures gives every query the same candidate scores,
so its margin, averaged over the episode's queries, is exactly 0.

The keyed probe (`probe_batch(keyed=True)`) writes every picture's key in
words at the start of its line, the query's too, as the LM stage's episode
text does (`<image> circle This is a dax.<EOC> ... <image> circle This is
a| dax.<EOC>`): the binding is in the text, so the frozen LM's own circuit
solves it (Flamingo with its gates at 0 is that LM), and a drop below it
says the cross-attention layers' writes break that circuit.

The attribute probe (`attribute_probe_images`) asks it of the vision
encoder alone, a step before: can a linear read-out of its features tell
the values of an attribute apart (the shape, the colour of a one-object
picture, as the nonce episodes show them)? An attribute the features do not
separate can't be bound to a word by any cross-attention.

The text probe (`text_probe_batch`) asks the same of an LM alone, on
held-out episodes in the LM stage's keyed episode text
(`nonce.episode_text`): the support pictures as their keys at the start of
their lines, then the query's key and its line up to the word, continued by
every word:

  <BOS>circle This is a dax. square This is a blicket. ... circle This is
      a| dax.      (row: query q, candidate c)

`score_mask` marks the candidate's line after '|' (the word and the
punctuation). Here the query's text names its key, so a model must read
the context to bind; one that ignores the context (its next-token
distribution the same whatever came before) gives each candidate word the
same score for every query, so its margin is exactly 0 and the same word
wins every query of an episode (accuracy exactly 1 / ways).

Glossary of shapes:
  E: probe episodes.
  Q: queries per episode (= ways, one per word); C: candidates (= ways).
  R: rows, E * Q * C, in that order (the correct candidate of query q is
    c = q).
  L: sequence length.
  N: media slots, ways * shots support pictures + 1 query (the text probe:
    1, empty).
  H, W: image side.
"""

from typing import Any

import numpy as np

from flamingo_jax.data import formatting
from flamingo_jax.data.world import language
from flamingo_jax.data.world import nonce
from flamingo_jax.data.world import scenes

PROBE_NAME = 'binding_probe'  # Its episodes' generator name (held out).
TEXT_PROBE_NAME = 'text_binding_probe'  # The text probe's.
ATTRIBUTE_PROBE_NAME = 'attribute_probe'  # The attribute probe's pictures.
ATTRIBUTE_PROBE_TRAIN = 0.75  # Share of the pictures the read-out fits.


def _continuation(tokenizer, line: str, prefix: str) -> tuple[list[int], int]:
  """`line`'s ids, and how many of them are the prompt's `prefix` (the rest
  is scored)."""
  line_ids = list(tokenizer.encode(line, parse_markers=False))
  prefix_ids = list(tokenizer.encode(prefix, parse_markers=False))
  if line_ids[:len(prefix_ids)] != prefix_ids or len(line_ids) == len(
      prefix_ids):
    raise ValueError(f'The probe line {line!r} does not tokenize as its '
                     f'prompt {prefix!r} followed by the word.')
  return line_ids, len(prefix_ids)


def _line(template: str, key: str, made_up: str, keyed: bool) -> str:
  """A picture's line, 'This is a dax.', or keyed: ' circle This is a
  dax.'."""
  if keyed:
    return ' ' + nonce.keyed_line(template, key, made_up)
  return template.format(made_up)


def _prompt(template: str, key: str, keyed: bool) -> str:
  """`_line` up to the word: 'This is a', or keyed: ' circle This is a'."""
  if keyed:
    return ' ' + nonce.keyed_prompt(template, key)
  return template.split('{}')[0].rstrip()


def _check_sizes(num_episodes: int, ways: int, shots: int) -> None:
  if num_episodes < 1 or ways < 2 or shots < 1:
    raise ValueError(f'The probe needs num_episodes >= 1, ways >= 2 and '
                     f'shots >= 1; got {num_episodes}, {ways}, {shots}.')


def _held_out_episode(name: str, seed: int, index: int, ways: int,
                      shots: int):
  """Episode `index`'s generator (for its pictures), binding (eval words),
  template and support order (the way of each support picture)."""
  rng = scenes.example_rng(name, str(seed), index)
  binding = nonce.bind(rng, ways, half='eval')
  template = language.pick(rng, nonce.TEMPLATES[binding.attribute])
  order = tuple(nonce.ways_order(rng, ways, shots))
  return rng, binding, template, order


def _stack(rows: list[dict[str, np.ndarray]], ways: int
           ) -> dict[str, np.ndarray]:
  batch = {key: np.stack([row[key] for row in rows]) for key in rows[0]}
  batch['ways'] = np.int32(ways)
  return batch


def probe_batch(tokenizer: Any, *, num_episodes: int = 16, seed: int = 0,
                ways: int = 3, shots: int = 2, image_size: int = 64,
                seq_len: int = 128, keyed: bool = False
                ) -> dict[str, np.ndarray]:
  """The probe's rows (see the module docstring); `keyed`: the keyed probe's.

  Args:
    tokenizer: the run's tokenizer (`encode`, and the marker ids).
    num_episodes: E.
    seed: which held-out episodes.
    ways: words per episode (Q = C).
    shots: support pictures per word.
    image_size: H = W.
    seq_len: L; must hold the longest row.
    keyed: every line, the query's too, after its picture's key in words
      (' circle This is a dax.': the key's tokens as mid-line in the LM
      stage's episode text).

  Returns:
    tokens, targets int32 [R, L]; score_mask float32 [R, L]; media uint8
    [R, N, 1, H, W, 3]; media_mask bool [R, N]; media_index int32 [R, L];
    ways int32 [] (Q = C).
  """
  _check_sizes(num_episodes, ways, shots)
  num_support = ways * shots
  rows = []
  for e in range(num_episodes):
    rng, binding, template, order = _held_out_episode(PROBE_NAME, seed, e,
                                                      ways, shots)
    attribute, values, words = (binding.attribute, binding.values,
                                binding.words)
    support = [scenes.render_scene(nonce.scene(rng, attribute, values[w]),
                                   image_size) for w in order]
    chunks = []
    for i, w in enumerate(order):
      chunks += [{'image': i},
                 {'text': _line(template, values[w], words[w], keyed)}]
    for q in range(ways):
      query = scenes.render_scene(nonce.scene(rng, attribute, values[q]),
                                  image_size)
      media = np.stack(support + [query])[:, None]  # [N, 1, H, W, 3]
      prefix = _prompt(template, values[q], keyed)
      for c in range(ways):
        line = _line(template, values[q], words[c], keyed)
        out = formatting.format_document(
            chunks + [{'image': num_support}, {'text': line}], tokenizer,
            seq_len=seq_len, max_media=num_support + 1)
        if (isinstance(out, formatting.Skip) or
            out['num_media'] != num_support + 1 or
            out['targets'][out['loss_mask'] > 0][-1] != tokenizer.eos_id):
          raise ValueError(f'seq_len={seq_len} does not hold a probe '
                           'episode; raise it.')
        _, start = _continuation(tokenizer, line, prefix)
        last_image = int(np.nonzero(out['tokens'] == tokenizer.image_id)[0]
                         [-1])
        end = int(np.nonzero(out['targets'] == tokenizer.eoc_id)[0][-1])
        score_mask = np.zeros(seq_len, np.float32)
        score_mask[last_image + start:end + 1] = 1.0
        rows.append(dict(tokens=out['tokens'], targets=out['targets'],
                         score_mask=score_mask, media=media,
                         media_mask=out['media_mask'],
                         media_index=out['media_index']))
  return _stack(rows, ways)


def text_probe_batch(tokenizer: Any, *, num_episodes: int = 16, seed: int = 0,
                     ways: int = 3, shots: int = 2, image_size: int = 64,
                     seq_len: int = 128) -> dict[str, np.ndarray]:
  """The text probe's rows (see the module docstring).

  Args:
    tokenizer: the run's tokenizer (`encode`, and the marker ids).
    num_episodes: E.
    seed: which held-out episodes.
    ways: words per episode (Q = C).
    shots: support pictures (in words) per word.
    image_size: H = W of the one empty media slot (the LM ignores it).
    seq_len: L; must hold the longest row.

  Returns:
    As `probe_batch`, with N = 1 empty media slot (media_mask False).
  """
  _check_sizes(num_episodes, ways, shots)
  rows = []
  for e in range(num_episodes):
    _, binding, template, order = _held_out_episode(TEXT_PROBE_NAME, seed,
                                                    e, ways, shots)
    values, words = binding.values, binding.words
    # As nonce.episode_text writes an episode (its pictures not needed).
    support = ' '.join(nonce.keyed_line(template, values[w], words[w])
                       for w in order)
    for q in range(ways):
      prompt = f'{support} ' + nonce.keyed_prompt(template, values[q])
      for c in range(ways):
        text = f'{support} ' + nonce.keyed_line(template, values[q], words[c])
        ids, start = _continuation(tokenizer, text, prompt)
        out = formatting.format_document([{'text': text}], tokenizer,
                                         seq_len=seq_len, max_media=1)
        if (isinstance(out, formatting.Skip) or
            list(out['tokens'][1:len(ids) + 1]) != ids):
          raise ValueError(f'seq_len={seq_len} does not hold a text probe '
                           'episode; raise it.')
        # targets[j] is the text's id j (tokens[0] is <BOS>).
        score_mask = np.zeros(seq_len, np.float32)
        score_mask[start:len(ids)] = 1.0
        rows.append(dict(
            tokens=out['tokens'], targets=out['targets'],
            score_mask=score_mask,
            media=np.zeros([1, 1, image_size, image_size, 3], np.uint8),
            media_mask=out['media_mask'], media_index=out['media_index']))
  return _stack(rows, ways)


def attribute_probe_images(attribute: str, *, num_images: int = 1024,
                           seed: int = 0, image_size: int = 64
                           ) -> dict[str, np.ndarray]:
  """One-object pictures of held-out scenes, labelled by `attribute`.

  Each picture shows one object as a nonce episode does (`nonce.scene`):
  its `attribute` drawn uniformly, everything else (the other attributes,
  the cell, the background) random.

  Args:
    attribute: one of `nonce.ATTRIBUTES` ('shape', 'colour').
    num_images: pictures, split ATTRIBUTE_PROBE_TRAIN / rest into the
      read-out's fitting and test sets.
    seed: which held-out pictures.
    image_size: H = W.

  Returns:
    images uint8 [num_images, H, W, 3]; labels int32 [num_images] (indices
    into scenes.VALUES[attribute]); num_train int32 [] (the first
    num_train are for fitting); num_classes int32 [].
  """
  if attribute not in nonce.ATTRIBUTES:
    raise ValueError(f'Unknown attribute {attribute!r}; expected one of '
                     f'{nonce.ATTRIBUTES}.')
  values = scenes.VALUES[attribute]
  num_train = int(num_images * ATTRIBUTE_PROBE_TRAIN)
  if num_train < len(values) or num_images - num_train < len(values):
    raise ValueError(f'The attribute probe needs at least {len(values)} '
                     f'pictures to fit and to test; {num_images} pictures '
                     f'give {num_train} and {num_images - num_train}.')
  images, labels = [], []
  for i in range(num_images):
    rng = scenes.example_rng(ATTRIBUTE_PROBE_NAME, attribute, i, seed)
    label = int(rng.integers(len(values)))
    images.append(scenes.render_scene(
        nonce.scene(rng, attribute, values[label]), image_size))
    labels.append(label)
  return dict(images=np.stack(images), labels=np.asarray(labels, np.int32),
              num_train=np.int32(num_train),
              num_classes=np.int32(len(values)))
