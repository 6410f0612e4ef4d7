r"""Converts a published checkpoint into a flamingo_jax workdir.

  python -m flamingo_jax.weights.convert SOURCE INPUT --workdir W [options]
  python -m flamingo_jax.weights.convert --help          # the sources
  python -m flamingo_jax.weights.convert SOURCE --help   # its options
  python -m flamingo_jax.weights.convert SOURCE INPUT --list   # tensors only

For example, OpenAI's CLIP ViT-L/14 (Hugging Face layout) as the frozen
vision encoder of a run:

  python -m flamingo_jax.weights.convert hf_clip \
      ~/clip-vit-large-patch14 --workdir /tmp/clip_l14 --tokens=last_block
  # then in the run's config:
  #   config.init_from = [dict(workdir='/tmp/clip_l14',
  #                            include=['vision_encoder/.*'], exclude=[])]
  #   config.model.vision = <the 'model.vision' of /tmp/clip_l14/config.json>

What is written (an ordinary workdir, so `init_from`, `checkpoint.
load_params` and the other readers take it as it is):
  W/config.json            `task: 'import'`, `model` (the part the source
                           fills, e.g. `model.vision`) and `weights` (source,
                           inputs, dtype); a whole model (`open_flamingo`,
                           `idefics`)
                           writes `task: 'flamingo'`, all of `model` and
                           `eval.max_len`, so `flamingo_jax.load(W)` takes it;
  W/checkpoints/<step>/    the parameters as the frozen part of a train state
                           (`{'step', 'trainable': {}, 'frozen': params}`),
                           in `checkpoint.Checkpointer`'s layout
                           (`checkpoint_parts.save_in_parts`);
  W/tokenizer/             the source's tokenizer, when it has one
                           (`Tokenizer.save_dir`; `config.data.tokenizer`
                           names its flamingo_tokenizer.json, which
                           `Tokenizer.load` and `flamingo_jax.load` read).
Nothing is written half: the workdir is assembled under a temporary name
beside W and renamed when complete; a checkpoint that does not fit (missing,
extra or misshaped tensors, another family) stops before anything is
written, naming the tensors and both shapes.

Memory: a Hugging Face LM (hf_llama, hf_gpt_neox, hf_mpt, hf_mosaic_gpt,
hf_gpt2: the 7B-80B sources) is mapped lazily (`mapping.LazyArray`): each
parameter is filled from its tensors (each a memory map of its own, across
the shards) only when the writer reaches it, and written to orbax in parts
of about PART_BYTES (at least one array; orbax's partial saves,
`checkpoint_parts.save_in_parts`, which also takes their checksums in host
memory, slice by slice), each freed once written. The peak is two copies
of the largest parameter (a stacked [layers, ...] array, e.g. LLaMA-7B's
FFW, 2.9 GB in bf16: the device array handed to orbax, whose host copy
was freed, and orbax's own copy for writing) plus ~0.3 GB of JAX and
orbax, whatever the model's size: converting a 1.24 GB bf16 LLaMA-shaped
checkpoint (14 layers of TinyLlama-1.1B's widths, largest array 323 MB, 4
shards; tests/weights/make_memory_checkpoint.py) peaks at 892 MB RSS to
bf16 (1138 MB with three copies, 4.4 GiB when mapped eagerly) and 1519 MB
to float32 (2373 MB, 6.1 GiB). The other sources (vision towers,
open_flamingo's assembly) map eagerly: their output is whole in host memory
before it is written.
The peak RSS is printed at the end.

Adding a source: a module in `flamingo_jax.weights` with `KIND`, `SUMMARY`,
`read(path)`, `config_from(path, tensors, **options)`, `to_params(tensors,
config, dtype=)` and `add_arguments(parser)` (adds its options, returns
their names), listed in SOURCES. A source with several inputs (a model
assembled from a vision tower and an LM) may instead define
`convert(args) -> Converted`.
"""

import argparse
import dataclasses
import inspect
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from typing import Any, Callable, Optional

from absl import logging
import ml_dtypes
import numpy as np

from flamingo_jax import checkpoint_parts
from flamingo_jax.data import tokenizer as tokenizer_lib
from flamingo_jax.weights import hf_clip
from flamingo_jax.weights import hf_gpt2
from flamingo_jax.weights import hf_gpt_neox
from flamingo_jax.weights import hf_llama
from flamingo_jax.weights import hf_mosaic_gpt
from flamingo_jax.weights import hf_mpt
from flamingo_jax.weights import idefics
from flamingo_jax.weights import mapping
from flamingo_jax.weights import nfnet_npz
from flamingo_jax.weights import open_clip
from flamingo_jax.weights import open_flamingo
from flamingo_jax.weights import tensors as tensors_lib
from flamingo_jax.weights import timm_nfnet
from flamingo_jax.weights import torch_file

SOURCES = {m.KIND: m for m in (hf_clip, open_clip, nfnet_npz, timm_nfnet,
                                hf_llama, hf_gpt_neox, hf_mpt,
                                hf_mosaic_gpt, hf_gpt2, open_flamingo,
                                idefics)}
DTYPES = {'float32': np.dtype(np.float32),
          'bfloat16': np.dtype(ml_dtypes.bfloat16),
          'float16': np.dtype(np.float16)}


@dataclasses.dataclass
class Converted:
  """What a conversion produces, before anything is written."""
  model: dict[str, Any]  # The config.model part the source fills.
  params: mapping.Params
  tokenizer: Optional[tokenizer_lib.Tokenizer] = None
  inputs: list[str] = dataclasses.field(default_factory=list)
  # 'import' (a part, for init_from) or 'flamingo' (a whole model that
  # flamingo_jax.load takes), and other config.json sections (e.g. 'eval').
  task: str = 'import'
  extra: dict[str, Any] = dataclasses.field(default_factory=dict)
  # Frees the inputs once the (lazy, mapping.LazyArray) params are written.
  release: Optional[Callable[[], None]] = None


def _model_section(vision_config: dict[str, Any]) -> dict[str, Any]:
  if vision_config['encoder'] == 'vit':
    image_size = vision_config['image_size']
  else:
    from flamingo_jax.models import nfnet  # pylint: disable=g-import-not-at-top
    image_size = nfnet.NFNET_PARAMS[vision_config['variant']]['test_imsize']
  return {'vision': vision_config, 'image_size': image_size}


def convert(kind: str, path: str, *, dtype: str = 'float32',
            torch_backend: str = 'auto', **options: Any) -> Converted:
  """Reads `path` as a `kind` checkpoint and maps it (nothing written).

  Args:
    kind: a key of SOURCES.
    path: the checkpoint file or directory.
    dtype: of the output parameters ('float32', 'bfloat16', 'float16').
    torch_backend: how PyTorch files are read ('auto', 'torch', 'builtin').
    **options: the source's options (its `add_arguments`).

  Returns:
    The model config section and the parameters.
  """
  source = SOURCES[kind]
  start = time.time()
  if hasattr(source, 'convert'):
    if 'torch_backend' in inspect.signature(source.convert).parameters:
      options['torch_backend'] = torch_backend
    return source.convert(path, dtype=DTYPES[dtype], **options)
  tensors = _read(source, path, torch_backend)
  _say(f'{path}: {len(tensors)} tensors, {tensors.num_bytes() / 1e6:.1f} MB '
       f'in {len(tensors.groups())} file(s).')
  config = source.config_from(path, tensors, **options)
  _say(f'Model config: {config}')
  params = source.to_params(tensors, config, dtype=DTYPES[dtype])
  tensors.close()
  _say(f'Mapped {sum(tensors.reads.values())} tensors onto '
       f'{sum(len(v) for v in params.values())} parameters in '
       f'{time.time() - start:.1f} s.')
  return Converted(model=_model_section(config), params=params,
                   inputs=[os.path.abspath(path)])


def _say(message: str) -> None:
  """Progress, on stderr (absl logs stay at WARNING unless --verbose)."""
  logging.info('%s', message)
  if logging.get_verbosity() < logging.INFO:
    print(message, file=sys.stderr)


def _read(source, path: str, torch_backend: str) -> tensors_lib.TensorStore:
  if torch_backend == 'auto':
    return source.read(path)
  return tensors_lib.open_path(path, torch_backend=torch_backend)


# -- Writing -------------------------------------------------------------------


def write_workdir(converted: Converted, workdir: str, *, kind: str,
                  dtype: str, step: int = 0, overwrite: bool = False) -> str:
  """Writes the workdir (see the module docstring); returns its path."""
  workdir = os.path.abspath(workdir)
  if os.path.exists(workdir) and not overwrite:
    raise FileExistsError(f'{workdir} exists; pass --overwrite to replace it.')
  parent = os.path.dirname(workdir)
  os.makedirs(parent, exist_ok=True)
  partial = tempfile.mkdtemp(prefix=f'.{os.path.basename(workdir)}.partial-',
                             dir=parent)
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(partial, 0o777 & ~umask)  # mkdtemp makes it private.
  try:
    config = {'task': converted.task, 'model': converted.model,
              'weights': {'source': kind, 'inputs': converted.inputs,
                          'dtype': dtype, 'step': step},
              **converted.extra}
    if converted.tokenizer is not None:
      spec = converted.tokenizer.save_dir(os.path.join(partial, 'tokenizer'))
      config['data'] = {'tokenizer': os.path.join(
          workdir, 'tokenizer', os.path.basename(spec))}
    with open(os.path.join(partial, 'config.json'), 'w') as f:
      json.dump(config, f, indent=2)
    _say(f'Writing {workdir} ...')
    _save_params(converted.params, os.path.join(partial, 'checkpoints'), step)
    if converted.release is not None:
      converted.release()
    if os.path.exists(workdir):
      shutil.rmtree(workdir)
    os.rename(partial, workdir)
  except BaseException:
    shutil.rmtree(partial, ignore_errors=True)
    raise
  return workdir


# Bytes of parameters per orbax partial save (at least one array): small,
# so that a part is about one array (each save adds an OCDBT file set).
PART_BYTES = 2**26


def _save_params(params: mapping.Params, directory: str, step: int) -> None:
  """Writes the parameters part by part, each freed once written.

  Parts of about PART_BYTES (at least one array) go to orbax's partial
  saves (`checkpoint_parts.save_in_parts`, which also takes their
  checksums in host memory, slice by slice); a `mapping.LazyArray` is
  filled only when its part is made, so with lazy parameters (the LM
  sources) the model is never whole in host memory.
  """
  def parts():
    yield {'step': np.asarray(step, np.int32), 'trainable': {}}
    part, size = {}, 0
    for module in list(params):
      leaves = params.pop(module)
      for name in list(leaves):
        array = leaves.pop(name)
        if isinstance(array, mapping.LazyArray):
          array = array.materialize()
        part.setdefault(module, {})[name] = array
        size += array.nbytes
        del array
        if size >= PART_BYTES:
          yield {'frozen': part}
          part, size = {}, 0
    if part:
      yield {'frozen': part}

  checkpoint_parts.save_in_parts(directory, step, parts(), {'next_step': step})


def peak_rss_mb() -> float:
  """This process's peak resident memory so far, in MB (Linux: KB units)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- Command line --------------------------------------------------------------


def make_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='python -m flamingo_jax.weights.convert',
      description=__doc__.split('\n\n')[0],
      epilog=('Each SOURCE has its own options: '
              'python -m flamingo_jax.weights.convert SOURCE --help.\n'
              'Example:\n  python -m flamingo_jax.weights.convert hf_clip '
              '~/clip-vit-large-patch14 --workdir /tmp/clip_l14 '
              '--tokens=last_block\nThe workdir (config.json, '
              'checkpoints/<step>/) is described in flamingo_jax/weights/'
              'convert.py.'),
      formatter_class=argparse.RawDescriptionHelpFormatter)
  subparsers = parser.add_subparsers(dest='kind', required=True,
                                     metavar='SOURCE')
  for kind, module in SOURCES.items():
    sub = subparsers.add_parser(kind, help=module.SUMMARY,
                                description=module.__doc__.split('\n\n')[0])
    sub.add_argument('input', help='the checkpoint file or its directory')
    sub.add_argument('--workdir', help='the workdir to write (required '
                     'unless --list)')
    sub.add_argument('--dtype', choices=sorted(DTYPES), default='float32',
                     help='dtype of the written parameters')
    sub.add_argument('--step', type=int, default=0,
                     help='the checkpoint step to write')
    sub.add_argument('--overwrite', action='store_true',
                     help='replace an existing workdir')
    sub.add_argument('--torch_backend', choices=torch_file.BACKENDS,
                     default='auto',
                     help="reading PyTorch files: 'torch' is "
                          "torch.load(weights_only=True), 'builtin' our "
                          "restricted unpickler; 'auto' uses torch if "
                          'importable')
    sub.add_argument('--list', action='store_true',
                     help='print the tensors (name, shape, dtype) and exit')
    sub.add_argument('--verbose', action='store_true',
                     help='absl INFO logs (orbax included)')
    sub.set_defaults(option_names=module.add_arguments(sub))
  return parser


def main(argv: Optional[list[str]] = None) -> int:
  args = make_parser().parse_args(argv)
  logging.set_verbosity(logging.INFO if args.verbose else logging.WARNING)
  if args.list:
    store = _read(SOURCES[args.kind], args.input, args.torch_backend)
    for name in store:
      info = store.info(name)
      print(f'{name}\t{list(info.shape)}\t{info.dtype}')
    return 0
  if not args.workdir:
    print('error: --workdir is required (or --list).', file=sys.stderr)
    return 2
  options = {k: getattr(args, k) for k in args.option_names}
  try:
    converted = convert(args.kind, args.input, dtype=args.dtype,
                        torch_backend=args.torch_backend, **options)
    workdir = write_workdir(converted, args.workdir, kind=args.kind,
                            dtype=args.dtype, step=args.step,
                            overwrite=args.overwrite)
  except (ValueError, FileNotFoundError, FileExistsError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  print(f'Wrote {workdir} (step {args.step}); peak RSS '
        f'{peak_rss_mb():.0f} MB.')
  return 0


if __name__ == '__main__':
  sys.exit(main())
