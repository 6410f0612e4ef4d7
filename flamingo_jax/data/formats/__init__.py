"""Builders for the data users hold: local files (or gs://) -> TFDS datasets.

Each format is a `tfds.core.GeneratorBasedBuilder` whose examples have the
same features as the embedded world's dataset of the same kind, so the
pipeline's READERS and the evaluation code read either unchanged:

  format             reads                                  world twin
  interleaved_jsonl  OBELICS-like or MMC4 tables + images   world_documents
  webdataset_pairs   WebDataset tar shards                  world_pairs
  table_pairs        tables of image, caption               world_pairs
  video_pairs        tables of video (or frame dir), cap    world_video_pairs
  coco_karpathy      dataset_coco.json (Karpathy splits)    world_captions
  coco_captions_json COCO's captions_<subset>.json          world_captions
  vqa                VQAv2 / OK-VQA question+annotation     world_vqa
  video_qa           MSVD-QA / MSRVTT-QA JSON               world_video_qa
  vatex              VATEX JSON                             world_video_captions
  image_folder       ImageNet-style class folders           world_classification

Each module's docstring gives its exact schema, options and bad-input rules.
`interleaved` is another name of `interleaved_jsonl` (which reads more than
JSONL; ALIASES): either builds, and reads, DATA_DIR/interleaved_jsonl/<name>.
Tables (`tables`) are JSONL (.gz, .zip), CSV, TSV (.gz), Parquet or Hugging
Face `datasets` save_to_disk folders, read by extension; image URLs are
never fetched, only found in an img2dataset output folder (`img2dataset`).
With a Beam runner (`build(..., beam_runner=...)`, `--beam_runner`) a
dataset is built by an Apache Beam pipeline instead of one process, with
the same result (`distributed`).
Differences from the world: images keep their own size and encoding (the
pipeline resizes them), and multi-reference texts (`captions`, `answers`)
have as many entries as the source gives. Every example also has 'id'
(int64) and 'source' (the file:line, shard:key or annotation record it came
from). Documents' images have varying sizes, so read them with
`as_data_source` (as the pipeline does), not `as_dataset`.

Configuration: one `BuilderConfig` dataclass per format carries the source
path(s) and the options; its name (given, or '<source stem>_<hash of the
options>') names the prepared directory DATA_DIR/<format>/<name>/1.0.0/,
and its options and per-split statistics are stored in that directory's
metadata.json. (TFDS' manual_dir is one directory for all datasets and
carries no options; a config does both and keeps datasets from different
sources apart.) Building reuses a prepared dataset, and refuses one built
from other options.

  python -m flamingo_jax.data.formats --format webdataset_pairs \
      --source 'gs://b/laion-{00000..00099}.tar' --data_dir gs://b/tfds \
      --name laion [--option max_image_size=480]
  builder = formats.build('vqa', '/data/vqav2', DATA_DIR,
                          image_dir='/data/coco')
  source = formats.open_source('vqa/vqav2_1a2b3c4d', DATA_DIR, 'query')

In a training config, a dataset spec reads a prepared format dataset with
builder='<format>/<name>' (and data_dir=... if it is not config.data's).

Bad input: records that cannot be used are skipped and counted per reason
(on_error='skip', the default of the training formats) or stop the build
with an error naming the file and record (on_error='raise', the default of
the evaluation formats); so are damaged sources found while listing records
(a tar shard cut short, even on a 512-byte boundary, is named by shard and
member). The first skips of each reason are logged by file and record; the
counts of every split are logged, stored in
`builder.info.metadata['statistics']` and returned by `statistics()`.
Images deeper than 8 bits (16-bit PNG/TIFF, integer and float) are scaled
to 8 bits, not clipped (`data.images.to_rgb`).
"""

from collections.abc import Callable, Mapping, Sequence
import dataclasses
import hashlib
import json
import os
import re
from typing import Any

from absl import logging
import tensorflow as tf
import tensorflow_datasets as tfds

from flamingo_jax.data.formats import classification
from flamingo_jax.data.formats import common
from flamingo_jax.data.formats import files
from flamingo_jax.data.formats import documents
from flamingo_jax.data.formats import image_eval
from flamingo_jax.data.formats import pairs
from flamingo_jax.data.formats import video
from flamingo_jax.data.formats import video_eval

FORMATS: dict[str, type[common.FormatBuilder]] = {
    cls.name: cls for cls in (
        documents.InterleavedJsonl, pairs.WebDatasetPairs, pairs.TablePairs,
        video.VideoPairs, image_eval.CocoKarpathy,
        image_eval.CocoCaptions, image_eval.Vqa,
        video_eval.VideoQa, video_eval.Vatex, classification.ImageFolder)}
# The pipeline's dataset kind of the training formats.
KINDS = {'interleaved_jsonl': 'documents', 'webdataset_pairs': 'pairs',
         'table_pairs': 'pairs', 'video_pairs': 'video_pairs'}
# Other names of formats: {alias: the format's name}. A dataset is stored,
# and read, under the format's name whichever is given.
ALIASES = {'interleaved': 'interleaved_jsonl'}
BadInput = common.BadInput


def format_names() -> list[str]:
  """Every name `--format` takes: FORMATS and ALIASES."""
  return sorted({*FORMATS, *ALIASES})


def builder_class(format_name: str) -> type[common.FormatBuilder]:
  format_name = ALIASES.get(format_name, format_name)
  if format_name not in FORMATS:
    raise ValueError(f'Unknown format {format_name!r}; expected one of '
                     f'{format_names()}.')
  return FORMATS[format_name]


def options_of(format_name: str) -> list[str]:
  """The options (config fields besides `source`) of a format."""
  base = {f.name for f in dataclasses.fields(tfds.core.BuilderConfig)}
  return [f.name for f in dataclasses.fields(
      builder_class(format_name).CONFIG_CLASS)
          if f.name not in base and f.name != 'source']


def _absolute(path: str) -> str:
  return path if '://' in path else os.path.abspath(os.path.expanduser(path))


def default_name(source: str | Mapping[str, str],
                 options: Mapping[str, Any]) -> str:
  """'<stem of the source>_<8 hex digits of source and options>'."""
  first = next(iter(source.values())) if isinstance(source, Mapping) else (
      source)
  stem = os.path.basename(str(first).rstrip('/')).split('.')[0]
  stem = re.sub(r'[^a-z0-9_]+', '_', stem.lower()).strip('_') or 'data'
  digest = hashlib.sha256(json.dumps(
      common.jsonable({'source': source, **options}),
      sort_keys=True).encode()).hexdigest()[:8]
  return f'{stem}_{digest}'


def make_builder(format_name: str, source: str | Mapping[str, str],
                 data_dir: str | os.PathLike, *, name: str | None = None,
                 num_workers: int | None = None, **options
                 ) -> common.FormatBuilder:
  """The (not yet prepared) builder of `source` in one of FORMATS.

  Args:
    format_name: one of FORMATS (or ALIASES).
    source: where the data is (local or gs://): a path, or for the training
      formats {split: path} (a plain path is the 'train' split).
    data_dir: the TFDS data directory to write to.
    name: the dataset's config name; default: `default_name(...)`.
    num_workers: threads reading and decoding; None: the CPUs, up to 16.
    **options: the format's config fields (`options_of(format_name)`).

  Returns:
    The builder; prepare it with `build` (or download_and_prepare).

  Raises:
    ValueError: an unknown format or option, a bad name or value, or a
      prepared dataset of this name built from other options.
  """
  cls = builder_class(format_name)
  unknown = sorted(set(options) - set(options_of(format_name)))
  if unknown:
    raise ValueError(f'Unknown options {unknown} for format {format_name!r}; '
                     f'expected some of {options_of(format_name)}.')
  options = {k: os.fspath(v) if isinstance(v, os.PathLike) else v
             for k, v in options.items()}
  source = ({str(k): _absolute(os.fspath(v)) for k, v in source.items()}
            if isinstance(source, Mapping) else _absolute(os.fspath(source)))
  name = name or default_name(source, options)
  if not re.fullmatch(r'[A-Za-z0-9_]+', name):
    raise ValueError(f'Dataset names may use letters, digits and _; got '
                     f'{name!r}.')
  config = cls.CONFIG_CLASS(name=name, source=source, **options)
  builder = cls(config=config, data_dir=os.fspath(data_dir))
  builder.num_workers = num_workers
  stored = _stored_metadata(builder.data_dir).get('options')
  wanted = common.jsonable(config.options())
  if stored is not None and stored != wanted:
    raise ValueError(f'{builder.data_dir} was built with options {stored}, '
                     f'not {wanted}: give another name, or delete it.')
  return builder


def _stored_metadata(directory: str) -> dict[str, Any]:
  path = os.path.join(directory, 'metadata.json')
  return json.loads(files.read_bytes(path)) if files.exists(path) else {}


def build(format_name: str, source: str | Mapping[str, str],
          data_dir: str | os.PathLike, *, name: str | None = None,
          num_workers: int | None = None,
          log: Callable[[str], None] = logging.info,
          beam_runner: Any = None, beam_args: Sequence[str] | None = None,
          **options) -> common.FormatBuilder:
  """Prepares (or reuses) a dataset; see `make_builder` for the arguments.

  Progress and per-split statistics go to `log`. With `beam_runner` (a
  Beam runner or its name, e.g. 'DirectRunner', 'DataflowRunner'), the
  build is an Apache Beam pipeline (see `distributed`) with the pipeline
  options `beam_args` (e.g. ['--direct_num_workers=8',
  '--direct_running_mode=multi_processing']); it writes the same dataset.

  Returns:
    The prepared builder: `builder.as_data_source(split)`, and its
    statistics in `statistics(builder)`.
  """
  builder = make_builder(format_name, source, data_dir, name=name,
                         num_workers=num_workers, **options)
  builder.log = log
  if builder.is_prepared():
    log(f'{builder.data_dir} is already prepared.')
  else:
    log(f'Building {format_name}/{builder.builder_config.name} from '
        f'{builder.builder_config.source}.')
    beam_options = None
    if beam_runner is not None:
      from apache_beam.options import pipeline_options  # pylint: disable=g-import-not-at-top
      builder.beam = True
      beam_options = pipeline_options.PipelineOptions(list(beam_args or []))
    builder.download_and_prepare(
        file_format='array_record',
        download_config=tfds.download.DownloadConfig(
            compute_stats=tfds.download.ComputeStatsMode.SKIP,
            beam_runner=beam_runner, beam_options=beam_options))
  for split, counts in sorted(statistics(builder).items()):
    log(f'  {split}: ' + ', '.join(f'{k} {v}' for k, v in
                                   sorted(counts.items())))
  log(f"Read it as builder='{format_name}/{builder.builder_config.name}', "
      f"data_dir='{os.fspath(data_dir)}'.")
  return builder


def statistics(builder: tfds.core.DatasetBuilder) -> dict[str, dict[str, int]]:
  """{split: {'examples': n, 'skipped/<reason>': n, ...}} of a dataset."""
  return dict((builder.info.metadata or {}).get('statistics') or
              _stored_metadata(builder.data_dir).get('statistics') or {})


def load_builder(dataset: str, data_dir: str | os.PathLike
                 ) -> tfds.core.DatasetBuilder:
  """A prepared dataset '<format>/<name>[:version]' of data_dir, read-only.

  Needs no source: features, splits and metadata come from the files.
  """
  if not re.fullmatch(r'[a-z0-9_]+/[A-Za-z0-9_]+(:[\d.]+)?', dataset):
    raise ValueError(f'Expected a dataset "<format>/<name>"; got '
                     f'{dataset!r}.')
  format_name, rest = dataset.split('/', 1)
  dataset = f'{ALIASES.get(format_name, format_name)}/{rest}'
  try:
    return tfds.core.read_only_builder.builder_from_files(
        dataset, data_dir=os.fspath(data_dir))
  except (tfds.core.registered.DatasetNotFoundError,
          tf.errors.NotFoundError) as e:
    format_name = dataset.split('/')[0]
    raise FileNotFoundError(
        f'Dataset {dataset!r} is not prepared in {os.fspath(data_dir)!r}: '
        f'build it with `python -m flamingo_jax.data.formats --format '
        f'{format_name} --source PATH --data_dir {os.fspath(data_dir)} '
        f'--name {dataset.split("/")[1].split(":")[0]}`.') from e


def open_source(dataset: str, data_dir: str | os.PathLike, split: str):
  """A random-access source of a prepared dataset's split (as the pipeline)."""
  return load_builder(dataset, data_dir).as_data_source(split=split)
