"""What the Hugging Face causal-LM importers share (hf_llama, hf_gpt_neox,
hf_mpt, hf_mosaic_gpt, hf_gpt2): reading a checkpoint directory, its config.json, the
vocabulary rows, the tokenizer, and the conversion into `config.model.lm`
and `lm/...` parameters.

A checkpoint directory as `save_pretrained` / the Hub writes it:
`config.json`, `model.safetensors` or shards with
`model.safetensors.index.json` (or `pytorch_model.bin[.index.json]`), and
usually `tokenizer.json` (+ `tokenizer_config.json`,
`special_tokens_map.json`), or a SentencePiece `tokenizer.model` alone
(LLaMA's original release). Tensor names may carry the causal-LM wrapper's
prefix (`model.`, `gpt_neox.`, `transformer.`) or not (a base model, GPT-2's
published files): each family finds it from an anchor tensor.

Vocabulary. With a tokenizer (and unless `--no_tokenizer`), the
tokenizer is imported with Flamingo's markers as OpenFlamingo adds them
(`data/hf_tokenizer.py`: `<|endofchunk|>`, `<image>`, and `<PAD>` when the
tokenizer has no pad token, after its vocabulary), and the LM's embedding
rows (and untied output rows) are fitted to the tokenizer's size as
OpenFlamingo's `resize_token_embeddings(len(tokenizer))` does: rows beyond
it (a vocabulary padded for speed, e.g. GPT-NeoX's 50432 for 50277 tokens)
are dropped, rows it adds are the mean of the checkpoint's rows (the
markers' rows are new parameters to train, as in OpenFlamingo). Without a
tokenizer the LM keeps the checkpoint's rows. Either way our own `<EOC>`
parameters (`lm/eoc_embedding`, `lm/eoc_unembedding`: id `vocab_size`) are
zeros: with an imported tokenizer `<EOC>` is its `<|endofchunk|>` row and
id `vocab_size` is never produced (generation bans it).
"""

import json
import os
from typing import Any, Callable, Optional

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from flamingo_jax.models import lm as lm_lib
from flamingo_jax.weights import mapping
from flamingo_jax.weights import tensors as tensors_lib

ROOT = 'lm'
BLOCK = 'lm/blocks/block'
EOC_PARAMS = ('eoc_embedding', 'eoc_unembedding')


def read(path: str) -> tensors_lib.TensorStore:
  return tensors_lib.open_path(path)


def directory_of(path: str) -> str:
  return path if os.path.isdir(path) else os.path.dirname(path)


def hf_config(path: str, model_types: tuple[str, ...], family: str
              ) -> dict[str, Any]:
  """config.json beside the weights, checked to be of `family`."""
  file = os.path.join(directory_of(path), 'config.json')
  if not os.path.isfile(file):
    raise FileNotFoundError(
        f'No config.json beside {path}: a Hugging Face {family} checkpoint '
        'directory holds one (heads, norms and positions are not in the '
        'weights).')
  with open(file) as f:
    config = json.load(f)
  model_type = config.get('model_type')
  if model_type not in model_types:
    raise ValueError(f'{file} has model_type {model_type!r}: not a {family} '
                     f'checkpoint (expected one of {model_types}).')
  return config


def prefix_of(tensors: tensors_lib.TensorStore, anchor: str,
              family: str) -> str:
  """The name prefix before `anchor` (e.g. 'model.' or '')."""
  found = [n[:-len(anchor)] for n in tensors if n.endswith(anchor)
           and (n == anchor or n[-len(anchor) - 1] == '.')]
  if len(found) != 1:
    raise ValueError(f'{tensors.source}: expected one tensor named '
                     f'[prefix.]{anchor} (a Hugging Face {family} '
                     f'checkpoint); found {found or "none"}.')
  return found[0]


def unsupported(config: dict[str, Any], source: str,
                checks: dict[str, tuple[Any, Callable[[Any], bool]]]) -> None:
  """Raises naming the config fields whose value `checks` refuses.

  `checks`: field -> (default when absent, predicate of a supported value).
  """
  bad = {k: config.get(k, default) for k, (default, ok) in checks.items()
         if not ok(config.get(k, default))}
  if bad:
    raise ValueError(f'{source}: config.json sets {bad}, which the '
                     'flamingo_jax LM does not implement.')


def num_layers(tensors: tensors_lib.TensorStore, pattern: str) -> int:
  """The number of distinct layer indices `pattern` (with a `layer`
  group) matches among the tensor names."""
  import re  # pylint: disable=g-import-not-at-top
  compiled = re.compile(pattern)
  found = {int(m.group('layer')) for n in tensors
           if (m := compiled.fullmatch(n))}
  if not found or found != set(range(len(found))):
    raise ValueError(f'{tensors.source}: layer tensors {pattern!r} have '
                     f'indices {sorted(found)}; expected 0..N-1.')
  return len(found)


# -- Vocabulary rows -------------------------------------------------------------


def fit_rows(rows: int) -> mapping.Transform:
  """[V, ...] -> [rows, ...]: cut, or extended with the mean row."""
  def fit(x: np.ndarray) -> np.ndarray:
    if x.shape[0] >= rows:
      return x[:rows]
    mean = x.astype(np.float32).mean(axis=0, keepdims=True).astype(x.dtype)
    return np.concatenate([x, np.repeat(mean, rows - x.shape[0], axis=0)])
  return fit


def fit_rows_then_transpose(rows: int) -> mapping.Transform:
  fit = fit_rows(rows)
  return lambda x: fit(x).T


def tokenizer_for(path: str, use_tokenizer: bool):
  """The checkpoint's tokenizer with Flamingo's markers, or None: its
  tokenizer.json, else its SentencePiece tokenizer.model."""
  if not use_tokenizer:
    return None
  from flamingo_jax.data import hf_tokenizer  # pylint: disable=g-import-not-at-top
  directory = directory_of(path)
  file = os.path.join(directory, hf_tokenizer.FILE)
  if os.path.isfile(file):
    return hf_tokenizer.from_hf(file)
  file = os.path.join(directory, hf_tokenizer.SENTENCEPIECE_FILE)
  if os.path.isfile(file):
    return hf_tokenizer.from_sentencepiece(file)
  return None


# -- Parameters ----------------------------------------------------------------


def abstract_params(lm_config: dict[str, Any]
                    ) -> dict[str, dict[str, jax.ShapeDtypeStruct]]:
  """The parameter shapes of the LM `lm_config` describes."""
  model = hk.transform(lambda t: lm_lib.DecoderLM(**lm_config, name=ROOT)(t))
  return jax.eval_shape(model.init, jax.random.key(0),
                        jnp.zeros([1, 2], jnp.int32))


def map_params(tensors: tensors_lib.TensorStore, lm_config: dict[str, Any],
               rules: list[mapping.Rule], ignore: list[str], *,
               dtype: Any, what: str, lazy: bool = False) -> mapping.Params:
  """`lm/...` from the tensors; our `<EOC>` rows (no tensor) are zeros.
  `lazy`: mapping.LazyArray parameters (mapping.map_tensors)."""
  abstract = abstract_params(lm_config)
  root = dict(abstract[ROOT])
  eoc = {name: root.pop(name) for name in EOC_PARAMS}
  abstract = dict(abstract, **{ROOT: root})
  params = mapping.map_tensors(tensors, rules, abstract, ignore=ignore,
                               dtype=dtype, what=what, lazy=lazy)
  params.setdefault(ROOT, {}).update({name: np.zeros(x.shape, dtype)
                       for name, x in eoc.items()})
  return params


def linear(source: str, target: str, with_bias: bool,
           weight: mapping.Transform = mapping.transpose
           ) -> list[mapping.Rule]:
  """A torch Linear (`weight` [out, in], `bias`) -> hk.Linear (w, b)."""
  rules = [mapping.Rule(rf'{source}\.weight', f'{target}/w', weight)]
  if with_bias:
    rules.append(mapping.Rule(rf'{source}\.bias', f'{target}/b'))
  return rules


def norm(source: str, target: str, with_bias: bool) -> list[mapping.Rule]:
  rules = [mapping.Rule(rf'{source}\.weight', f'{target}/scale')]
  if with_bias:
    rules.append(mapping.Rule(rf'{source}\.bias', f'{target}/offset'))
  return rules


def unembedding(lm_config: dict[str, Any], rows: int,
                source: str = r'lm_head\.weight'
                ) -> tuple[list[mapping.Rule], list[str]]:
  """(rules, ignored names) of the output head: tied embeddings read the
  embedding table, so a stored head (a copy of it) is ignored."""
  if lm_config['tied_embeddings']:
    return [], [source]
  return [mapping.Rule(source, 'lm/unembed/w', fit_rows_then_transpose(rows))
          ], []


def export(family: 'Family', namespace: dict[str, Any]) -> None:
  """Gives a source module the attributes the convert CLI reads (KIND,
  SUMMARY, read, add_arguments, config_from, to_params, convert) and the
  family itself as SOURCE."""
  namespace['SOURCE'] = family
  for name in ('KIND', 'SUMMARY', 'read', 'add_arguments', 'config_from',
               'to_params', 'convert'):
    namespace[name] = getattr(family, name)


def add_arguments(parser) -> tuple[str, ...]:
  """The convert CLI's options of every HF LM source."""
  parser.add_argument(
      '--no_tokenizer', action='store_true',
      help="do not import the checkpoint's tokenizer.json (or "
           "tokenizer.model); the LM keeps "
           "the checkpoint's vocabulary rows")
  return ('no_tokenizer',)


class Family:
  """One source: its config mapping, rule table and anchor (subclassed)."""
  KIND = ''
  SUMMARY = ''
  FAMILY = ''
  MODEL_TYPES: tuple[str, ...] = ()
  ANCHOR = ''  # The embedding table's name without prefix.

  def lm_config(self, config: dict[str, Any],
                tensors: tensors_lib.TensorStore, prefix: str,
                source: str) -> dict[str, Any]:
    raise NotImplementedError

  def rules(self, prefix: str, lm_config: dict[str, Any], rows: int
            ) -> tuple[list[mapping.Rule], list[str]]:
    """(rules, ignored patterns) filling `lm_config`'s parameters."""
    raise NotImplementedError

  # The source interface of weights/convert.py.

  def read(self, path: str) -> tensors_lib.TensorStore:
    return read(path)

  def add_arguments(self, parser) -> tuple[str, ...]:
    return add_arguments(parser)

  def config_from(self, path: str,
                  tensors: Optional[tensors_lib.TensorStore] = None, *,
                  vocab_size: Optional[int] = None) -> dict[str, Any]:
    """The `config.model.lm` of the checkpoint at `path`.

    `vocab_size`: the rows to fit the vocabulary to (default: the
    checkpoint's).
    """
    tensors = tensors if tensors is not None else read(path)
    config = hf_config(path, self.MODEL_TYPES, self.FAMILY)
    prefix = prefix_of(tensors, self.ANCHOR, self.FAMILY)
    lm_config = self.lm_config(config, tensors, prefix, str(path))
    rows = tensors.info(prefix + self.ANCHOR).shape[0]
    lm_config['vocab_size'] = vocab_size or rows
    return lm_config

  def to_params(self, tensors: tensors_lib.TensorStore,
                lm_config: dict[str, Any], *, dtype: Any = np.float32,
                lazy: bool = False) -> mapping.Params:
    prefix = prefix_of(tensors, self.ANCHOR, self.FAMILY)
    rules, ignore = self.rules(prefix, lm_config, lm_config['vocab_size'])
    return map_params(tensors, lm_config, rules, ignore, dtype=dtype,
                      what=f'Hugging Face {self.FAMILY} LM', lazy=lazy)

  def convert(self, path: str, *, dtype: Any = np.float32,
              no_tokenizer: bool = False):
    """Reads and maps the checkpoint (weights/convert.py's `convert`)."""
    from flamingo_jax.weights import convert as convert_lib  # pylint: disable=g-import-not-at-top
    tensors = read(path)
    tokenizer = tokenizer_for(path, not no_tokenizer)
    vocab = tokenizer.vocab_size if tokenizer is not None else None
    lm_config = self.config_from(path, tensors, vocab_size=vocab)
    # Filled one parameter at a time as the workdir is written (7B-80B).
    params = self.to_params(tensors, lm_config, dtype=dtype, lazy=True)
    return convert_lib.Converted(model={'lm': lm_config}, params=params,
                                 tokenizer=tokenizer,
                                 inputs=[os.path.abspath(path)],
                                 release=tensors.close)
