"""The notebook surface: `flamingo_jax.load(workdir)` -> a `Model`.

  import flamingo_jax
  model = flamingo_jax.load('workdir/tiny')        # or W/checkpoints[/<step>]
  model.generate(image, '<image>Output:')           # -> ' two red circles.'
  model.generate([img1, img2], '<image>Output: a cat.<EOC><image>Output:')
  model.generate(video, '<image>Question: What moves? Answer:')
  model.score(image, '<image>Output:', [' a cat.', ' a dog.'])  # -> [2] logp
  model.few_shot([(img1, 'a cat.'), (img2, 'a dog.')], img3)    # captioning
  model.few_shot([(img1, 'What is it?', 'a cat')], (img2, 'What is it?'),
                 task='vqa')

Media. A medium is an image -- a PIL image (any mode: transparency goes
over white and 16-bit or float pixels are scaled by their depth, as the
dataset builders store images, `data.images.to_rgb`), a uint8 numpy array
[h, w, 3], a file path (str or pathlib.Path, decoded with PIL) or encoded
bytes -- or a video: a uint8 array [t, h, w, 3] or a list/tuple of frames
(each frame any of the image forms). Media are resized to the model's image size keeping their aspect
ratio (`data.pipeline.fit_image`); videos keep all their frames (the
resampler interpolates its temporal table past `max_frames`).

`media` arguments. For one prompt (a str): one medium, or a list with one
medium per `<image>` marker, in order (None or [] for a text-only prompt).
So a video given as a list of frames goes in a list of its own,
`[frames]`: a bare list is always read as one medium per marker, and a count
that does not match the markers is an error, never a guess. For a batch (a
list of prompts): a list with one such entry per prompt; the results are
then lists. Every medium of one call must have the same number of frames.

Context. The longest sequence the model takes, `Model.max_len`, is
`config.eval.max_len` when the config has it, otherwise the longest
`config.data.datasets.*.seq_len` it was trained on (256 tokens: the
interleaved documents, in the tiny recipe as in the paper). A prompt plus
its `max_new_tokens` (for `generate`, `few_shot`) or plus its longest
candidate (for `score`) must fit it; a longer one is an error naming both
numbers. (The architecture has no hard limit of its own -- the relative
positions are sinusoids of any offset and the decoding caches are sized for
each call -- but offsets past the trained length were never seen in
training, and every new token costs time in proportion to the cache.)

Decoding. `generate` and `few_shot` decode as the run's evaluation did:
their defaults are the run's `config.eval.decoding` (`max_new_tokens`,
`beam_size`, `length_penalty`, `min_new_tokens`; `Model.decoding`), each
missing one taken from `FALLBACK_DECODING` (greedy, 20 tokens, and at least
one token before `<EOC>`, so that an answer is never empty). An argument
given to the call wins.

Placement. With one device, or when the parameters fit one device and the
config's mesh does not split parameters (its 'fsdp' and 'model' axes are 1),
they live on the default device. Otherwise (`placement='auto'`), or with
`placement='mesh'`, they are sharded over a mesh built from `config.mesh`
and `config.param_rules` (`training.sharding`), restored straight into their
shards; when the parameters do not fit one device but the config's mesh
would only replicate them, the devices go to its 'fsdp' axis instead.
"""

from collections.abc import Mapping, Sequence
import contextlib
import math
from typing import Any, Optional

from absl import logging
import haiku as hk
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from flamingo_jax import checkpoint as checkpoint_lib
from flamingo_jax import loading
from flamingo_jax.data import tokenizer as tokenizer_lib
from flamingo_jax.inference import generate as generate_lib
from flamingo_jax.inference import prompts as prompts_lib
from flamingo_jax.inference import user_inputs
from flamingo_jax.training import sharding as sharding_lib

PathLike = loading.PathLike
FALLBACK_DECODING = loading.FALLBACK_DECODING  # The decoding defaults.
FEW_SHOT_TASKS = user_inputs.FEW_SHOT_TASKS  # few_shot's `task`.
# Prompt and candidate lengths are padded to multiples of these, so that few
# distinct shapes (each compiled once) serve most prompts.
_PAD_PROMPTS = 32
_PAD_CANDIDATES = 8


def load(path: PathLike, *, step: Optional[int] = None,
         placement: str = 'auto',
         config: Optional[Mapping[str, Any]] = None,
         tokenizer: Optional[PathLike | tokenizer_lib.Tokenizer] = None
         ) -> 'Model':
  """A trained model, ready to generate and score.

  Args:
    path: a training workdir W (config.json and checkpoints/), W/checkpoints,
      or W/checkpoints/<step>.
    step: which checkpoint; default the one `path` names, else the newest
      intact one (a damaged newer step is skipped with a warning).
    placement: 'auto' (see the module docstring), 'device' (the default
      device) or 'mesh' (sharded over `config.mesh` / `config.param_rules`).
    config: the run's config; default W/config.json.
    tokenizer: a Tokenizer or a SentencePiece .model path; default the file
      `config.data.tokenizer` names.

  Returns:
    A `Model`. Its `generate` and `few_shot` decode by default as the run's
    evaluation did: `config.eval.decoding`, else `FALLBACK_DECODING`
    (`Model.decoding`).

  Raises:
    FileNotFoundError: a missing path, config.json, checkpoint or tokenizer.
    ValueError: a bad `placement` or `step`, a damaged checkpoint
      (`checkpoint.CheckpointDamagedError`), or a tokenizer whose vocabulary
      is not the model's.
  """
  if placement not in ('auto', 'device', 'mesh'):
    raise ValueError(f"placement must be 'auto', 'device' or 'mesh'; got "
                     f'{placement!r}.')
  location = loading.locate(path, step)
  if config is None:
    config = loading.read_config(location)
  elif not isinstance(config, ml_collections.ConfigDict):
    config = ml_collections.ConfigDict(config)
  if config.get('task', 'flamingo') != 'flamingo':
    raise ValueError(
        f'{location.workdir} is a {config.task!r} run (config.task), not a '
        'Flamingo one: load() restores Flamingo models.')
  # A missing step is named before anything loads.
  checkpoint_lib.resolve_step(location.checkpoints, location.step)
  tokenizer = loading.load_tokenizer(config, tokenizer)
  vocab = config.model.lm.vocab_size
  if tokenizer.vocab_size != vocab:
    raise ValueError(
        f'The tokenizer has {tokenizer.vocab_size} pieces but the model '
        f'(config.model.lm.vocab_size) has {vocab}: not this run\'s '
        'tokenizer.')
  num_bytes = loading.param_bytes(checkpoint_lib.abstract_params(
      location.checkpoints, location.step))
  fits = loading.fits_one_device(num_bytes, jax.devices()[0])
  mesh = None
  if placement == 'mesh' or (placement == 'auto' and jax.device_count() > 1):
    candidate = loading.inference_mesh(config, fits)
    splits = any(candidate.shape.get(a, 1) > 1 for a in ('fsdp', 'model'))
    if placement == 'mesh' or splits:
      mesh = candidate
  if mesh is None:
    if not fits:
      logging.warning('The parameters (%.1f GB) may not fit one device.',
                      num_bytes / 1e9)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = lambda tree: jax.tree.map(lambda _: device, tree)
  else:
    shardings = lambda tree: sharding_lib.param_shardings(
        tree, config.param_rules, mesh)
  # The newest intact step unless one is asked for (checkpoint.py).
  params, chosen = checkpoint_lib.load_params_and_step(
      location.checkpoints, location.step, shardings)
  logging.info('Loaded step %d from %s (%.1f MB of parameters, %s).', chosen,
               location.checkpoints, num_bytes / 1e6,
               'on ' + str(jax.devices()[0]) if mesh is None
               else f'sharded over mesh {dict(mesh.shape)}')
  return Model(config=config, params=params, tokenizer=tokenizer,
               step=chosen, mesh=mesh, workdir=location.workdir)


# -- The model -------------------------------------------------------------


class Model:
  """A trained Flamingo: config, parameters, tokenizer and a cached decoder.

  Attributes:
    config: the run's config (`config.model` is the architecture).
    params: the Haiku parameters, on one device or sharded over `mesh`.
    tokenizer: the run's tokenizer (`<image>`, `<EOC>`).
    decoder: `inference.generate.Decoder` (jitted greedy / beam / score).
    step: the training step of the checkpoint.
    mesh: the mesh the parameters are sharded over, or None.
    max_len: the longest prompt plus new tokens (or plus a candidate), in
      tokens (`max_len_source` says whence).
    image_size: the side media are resized to.
    decoding: the decoding `generate` and `few_shot` use by default
      (`decoding_source` says whence: 'config.eval.decoding' or
      'FALLBACK_DECODING').
  """

  def __init__(self, *, config: ml_collections.ConfigDict, params: hk.Params,
               tokenizer: tokenizer_lib.Tokenizer, step: int,
               mesh: Optional[jax.sharding.Mesh] = None,
               workdir: Optional[str] = None):
    self.config = config
    self.params = params
    self.tokenizer = tokenizer
    self.step = step
    self.mesh = mesh
    self.workdir = workdir
    self.model_config = config.model.to_dict()
    self.image_size = int(self.model_config['image_size'])
    self.max_len, self.max_len_source = loading.context_length(config)
    self.decoding, self.decoding_source = loading.decoding_defaults(config)
    self.decoder = generate_lib.Decoder(
        self.model_config,
        compute_dtype=jnp.dtype(config.get('compute_dtype', 'float32')))
    self.stop_ids, self.banned_ids = generate_lib.special_ids(
        tokenizer, self.model_config['lm']['vocab_size'])

  def __repr__(self) -> str:
    count = sum(math.prod(x.shape) for x in jax.tree.leaves(self.params))
    where = ('on ' + str(jax.devices()[0]) if self.mesh is None
             else f'sharded over {dict(self.mesh.shape)}')
    return (f'Model(step={self.step}, parameters={count:,}, '
            f'image_size={self.image_size}, max_len={self.max_len}, '
            f'{where}, workdir={self.workdir!r})')

  def _scope(self):
    return (jax.set_mesh(self.mesh) if self.mesh is not None
            else contextlib.nullcontext())

  # -- Prompts -------------------------------------------------------------

  def _encode(self, media: Any, prompt: str, what: str, *,
              candidate_tokens: int = 0,
              new_tokens: int = 0) -> prompts_lib.EncodedPrompt:
    """One prompt, checked to fit the context with the tokens it is to get
    (its longest candidate to score, or `max_new_tokens`)."""
    if not isinstance(prompt, str):
      raise TypeError(f'{what} must be a str; got {type(prompt).__name__}.')
    num_markers = self.tokenizer.encode(prompt).count(self.tokenizer.image_id)
    encoded = prompts_lib.encode(
        self.tokenizer, prompt, user_inputs.media_list(media, num_markers, what),
        self.image_size)
    length = len(encoded.tokens)
    context = (f'the model\'s context of {self.max_len} '
               f'({self.max_len_source})')
    if length + candidate_tokens > self.max_len:
      extra = (f' (with its longest candidate, {candidate_tokens} tokens)'
               if candidate_tokens else '')
      raise ValueError(
          f'{what} has {length + candidate_tokens} tokens{extra}, more than '
          f'{context}: use fewer shots or shorter text.')
    if length + new_tokens > self.max_len:
      raise ValueError(
          f'{what} has {length} tokens and max_new_tokens is {new_tokens}: '
          f'{length + new_tokens} in all, more than {context}. Lower '
          f'max_new_tokens (at most {self.max_len - length} for this '
          'prompt), or use fewer shots or shorter text.')
    return encoded

  def _batch(self, media: Any, prompt: str | Sequence[str], *,
             candidate_tokens: Sequence[int] = (),
             new_tokens: int = 0) -> tuple[dict, bool]:
    """(collated batch, whether the call was batched); `candidate_tokens`:
    per prompt, the longest candidate to score."""
    if isinstance(prompt, str):
      encoded = [self._encode(
          media, prompt, 'The prompt',
          candidate_tokens=max(candidate_tokens, default=0),
          new_tokens=new_tokens)]
      batched = False
    else:
      prompt = list(prompt)
      if not prompt:
        raise ValueError('Give at least one prompt.')
      if media is None:
        media = [None] * len(prompt)
      if not isinstance(media, (list, tuple)) or len(media) != len(prompt):
        given = (f'{len(media)} entries' if isinstance(media, (list, tuple))
                 else type(media).__name__)
        raise ValueError(
            f'{len(prompt)} prompts need a list of {len(prompt)} media '
            'entries (one per prompt: a medium, a list of media or None); '
            f'got {given}.')
      extra = list(candidate_tokens) or [0] * len(prompt)
      encoded = [self._encode(m, p, f'Prompt {i}', candidate_tokens=extra[i],
                              new_tokens=new_tokens)
                 for i, (m, p) in enumerate(zip(media, prompt))]
      batched = True
    return prompts_lib.collate(encoded, pad_multiple=_PAD_PROMPTS), batched

  def _options(self, max_new_tokens: Optional[int],
               beam_size: Optional[int], length_penalty: Optional[float],
               min_new_tokens: Optional[int]) -> generate_lib.Options:
    """The call's decoding: its arguments over `self.decoding`."""
    decoding = dict(self.decoding)
    if min_new_tokens is None and max_new_tokens is not None:
      # A shorter budget than the default's minimum lowers the minimum.
      decoding['min_new_tokens'] = min(decoding['min_new_tokens'],
                                       int(max_new_tokens))
    decoding.update({k: v for k, v in dict(
        max_new_tokens=max_new_tokens, beam_size=beam_size,
        length_penalty=length_penalty,
        min_new_tokens=min_new_tokens).items() if v is not None})
    return loading.decoding_options(decoding, self.stop_ids, self.banned_ids)

  def _text(self, tokens: np.ndarray, length: int) -> str:
    ids = [int(t) for t in tokens[:length]]
    if ids and ids[-1] in self.stop_ids:
      ids = ids[:-1]
    return self.tokenizer.decode(ids)

  # -- Public API ------------------------------------------------------------

  def generate(self, media: Any, prompt: str | Sequence[str], *,
               max_new_tokens: Optional[int] = None,
               beam_size: Optional[int] = None,
               length_penalty: Optional[float] = None,
               min_new_tokens: Optional[int] = None) -> str | list[str]:
    """The continuation of `prompt`, up to (not including) `<EOC>`.

    The decoding arguments left None take the run's evaluation decoding,
    `self.decoding`: `config.eval.decoding`, else `FALLBACK_DECODING`
    (greedy, 20 tokens, `min_new_tokens=1`).

    Args:
      media: for one prompt, a medium or a list with one medium per
        `<image>` marker; for a list of prompts, a list of those (see the
        module docstring).
      prompt: text with `<image>` markers, e.g. '<image>Output:'
        (`data.formatting.caption_prompt()`), or a list of such texts.
      max_new_tokens: the most tokens generated per prompt; the prompt plus
        these must fit `self.max_len`.
      beam_size: 1 for greedy decoding; the paper uses 3.
      length_penalty: GNMT's alpha for beam search (0: plain log-prob).
      min_new_tokens: `<EOC>` is held back before this many new tokens
        (default: the run's, at most `max_new_tokens`).

    Returns:
      The generated text (raw: a leading space is kept), or a list of them
      for a list of prompts.
    """
    options = self._options(max_new_tokens, beam_size, length_penalty,
                            min_new_tokens)
    batch, batched = self._batch(media, prompt,
                                 new_tokens=options.max_new_tokens)
    with self._scope():
      if options.beam_size == 1:
        result = self.decoder.greedy(self.params, batch, options)
      else:
        result = self.decoder.beam_search(self.params, batch, options)
      tokens, lengths = jax.device_get((result.tokens, result.lengths))
    texts = [self._text(np.asarray(t), int(n))
             for t, n in zip(tokens, lengths)]
    return texts if batched else texts[0]

  def score(self, media: Any, prompt: str | Sequence[str],
            candidates: Sequence[str] | Sequence[Sequence[str]]
            ) -> np.ndarray:
    """log p(candidate | media, prompt) of each candidate continuation.

    Args:
      media: as for `generate`.
      prompt: one prompt, or a list of prompts.
      candidates: continuations (e.g. [' a cat.<EOC>', ' a dog.<EOC>'];
        `<EOC>` is scored if written); for a list of prompts, either one
        list shared by all or one list per prompt, all of the same length.

    Returns:
      float32 [C] summed log-probabilities, or [B, C] for a list of prompts.
    """
    batched = not isinstance(prompt, str)
    if isinstance(candidates, str):
      raise TypeError('candidates must be a list of strings, not one string.')
    candidates = list(candidates)
    if not candidates:
      raise ValueError('Give at least one candidate.')
    rows = len(prompt) if batched else 1
    if all(isinstance(c, str) for c in candidates):
      per_row = [candidates] * rows
    elif batched and len(candidates) == rows and all(
        isinstance(c, (list, tuple)) and all(isinstance(s, str) for s in c)
        for c in candidates):
      per_row = [list(c) for c in candidates]
    else:
      raise ValueError('candidates must be a list of strings (or, for a list '
                       'of prompts, one list of strings per prompt).')
    num = {len(c) for c in per_row}
    if len(num) > 1 or 0 in num:
      raise ValueError('Every prompt needs the same number (>= 1) of '
                       f'candidates; got {[len(c) for c in per_row]}.')
    ids = [[self.tokenizer.encode(c) for c in row] for row in per_row]
    for row in per_row:
      for c in row:
        if not self.tokenizer.encode(c):
          raise ValueError(f'Candidate {c!r} is empty: nothing to score.')
    longest = [max(len(i) for i in row) for row in ids]
    batch, _ = self._batch(media, prompt, candidate_tokens=longest)
    width = -(-max(longest) // _PAD_CANDIDATES) * _PAD_CANDIDATES
    tokens = np.zeros([rows, num.pop(), width], np.int32)  # [B, C, Lc]
    valid = np.zeros(tokens.shape, bool)  # [B, C, Lc]
    for b, row in enumerate(ids):
      for c, cand in enumerate(row):
        tokens[b, c, :len(cand)] = cand
        valid[b, c, :len(cand)] = True
    with self._scope():
      scores = np.asarray(jax.device_get(
          self.decoder.score(self.params, batch, tokens, valid)))  # [B, C]
    return scores if batched else scores[0]

  def few_shot(self, support: Sequence[tuple[Any, ...]], query: Any, *,
               task: str = 'caption', max_new_tokens: Optional[int] = None,
               beam_size: Optional[int] = None,
               length_penalty: Optional[float] = None,
               min_new_tokens: Optional[int] = None) -> str:
    """The answer for `query` after the `support` examples, in the paper's
    prompt format.

    Args:
      support: the shots, in order: `(medium, text)` for task 'caption'
        (`<image>Output: {text}<EOC>`) and 'plain' (`<image>{text}<EOC>`,
        the image-text pairs' training format); `(medium, question, answer)`
        for 'vqa' (`<image>Question: {q} Answer: {a}<EOC>`). At least one:
        for zero-shot, call `generate` with the query prompt (e.g.
        `data.formatting.caption_prompt()`), or give the paper's text-only
        shots yourself.
      query: a medium ('caption', 'plain') or `(medium, question)` ('vqa').
      task: 'caption', 'vqa' or 'plain' (see FEW_SHOT_TASKS).
      max_new_tokens: as for `generate` (None: the run's evaluation
        decoding, `self.decoding`).
      beam_size: as for `generate` (likewise).
      length_penalty: as for `generate` (likewise).
      min_new_tokens: as for `generate` (likewise).

    Returns:
      The generated answer, stripped of surrounding whitespace.
    """
    if task not in FEW_SHOT_TASKS:
      raise ValueError(f'Unknown task {task!r}; expected one of '
                       f'{sorted(FEW_SHOT_TASKS)}.')
    spec = FEW_SHOT_TASKS[task]
    if isinstance(support, (str, bytes)) or not isinstance(
        support, Sequence):
      raise TypeError('support must be a list of tuples, e.g. '
                      f'{spec.support_form}.')
    if not support:
      raise ValueError(
          'The support set is empty: few_shot needs at least one example. '
          'For zero-shot, call model.generate(medium, prompt) with the query '
          'prompt (e.g. data.formatting.caption_prompt()).')
    media, shots = [], []
    for index, item in enumerate(support):
      fields = user_inputs.fields(item, spec.support_arity, str,
                       f'Support item {index}', spec.support_form)
      media.append(fields[0])
      shots.append(spec.shot(*fields[1:]))
    if spec.query_arity == 1:
      query_medium, query_text = query, spec.query()
    else:
      fields = user_inputs.fields(query, spec.query_arity, str, 'The query',
                       spec.query_form)
      query_medium, query_text = fields[0], spec.query(*fields[1:])
    media.append(query_medium)
    prompt = ''.join(shots) + query_text
    return self.generate(media, prompt, max_new_tokens=max_new_tokens,
                         beam_size=beam_size, length_penalty=length_penalty,
                         min_new_tokens=min_new_tokens).strip()


