"""Rows of the table files public datasets come in, chosen by extension.

  extension                  read as                       a row's key
  .jsonl .jsonl.gz           one JSON object a line        its line (from 1)
  .jsonl.zip                 the .jsonl members of a zip   line (member:line
                             (MMC4 as distributed)         if several)
  .csv .csv.gz               CSV, first row the header     its line (from 1)
  .tsv .tsv.gz               tab-separated, no quoting     its line (from 1)
                             (CC3M's: no header, give
                             `columns`)
  .parquet                   Apache Parquet (pyarrow)      its row (from 0)
  a directory with           Hugging Face `datasets`       its row (from 0)
  state.json                 `save_to_disk` (its .arrow
                             files, read with pyarrow:
                             `datasets` is not needed)

Values are what the file holds: Parquet and Arrow lists, structs and bytes
come as Python lists, dicts and bytes (a `datasets` Image column as
{'bytes', 'path'}). `columns` names the columns of a CSV/TSV without a
header row; without it, a header that looks like data (a cell is a URL) is
an error saying so. A file whose content is not what its extension says
(a Parquet file named .jsonl, a zip named .jsonl.gz, ...) is an error naming
the file, what its first bytes show it to be, and what was expected.
"""

from collections.abc import Iterator, Sequence
import csv
import gzip
import io
import json
import os
import re
import zipfile
from typing import Any

import tensorflow as tf

from flamingo_jax.data.formats import files

JSONL = ('.jsonl', '.jsonl.gz', '.jsonl.zip')
CSV = ('.csv', '.csv.gz', '.tsv', '.tsv.gz')
PARQUET = ('.parquet',)
EXTENSIONS = JSONL + CSV + PARQUET
HF_STATE = 'state.json'  # What `datasets.Dataset.save_to_disk` writes.
HF_DICT = 'dataset_dict.json'  # ... and `DatasetDict.save_to_disk`.
BATCH_ROWS = 1024
_MAGIC = ((b'PAR1', 'a Parquet file (name it .parquet)'),
          (b'PK\x03\x04', 'a zip archive (name it .jsonl.zip)'),
          (b'\x1f\x8b', 'a gzip file (name it .jsonl.gz, .csv.gz or .tsv.gz)'),
          (b'ARROW1', 'an Arrow IPC file'),
          (b'\xff\xff\xff\xff', 'an Arrow stream (a `datasets` .arrow file: '
           'give its save_to_disk folder)'))
_DESCRIPTION = ('.jsonl / .jsonl.gz / .jsonl.zip (JSON lines), .csv / .tsv '
                '(.gz), .parquet, or a Hugging Face datasets save_to_disk '
                'folder')


def is_hf_folder(path: str) -> bool:
  return files.isdir(path) and files.exists(os.path.join(path, HF_STATE))


def list_tables(source: str, extensions: Sequence[str] = EXTENSIONS
                ) -> list[str]:
  """The table files (or `datasets` folders) of a source.

  A source is a file, a `datasets` save_to_disk folder, a directory of
  tables (those ending with one of `extensions`), a glob or a {a..b} range.

  Raises:
    FileNotFoundError: nothing matches.
    ValueError: a `datasets` DatasetDict folder (its splits must be named).
  """
  if files.isdir(source):
    if files.exists(os.path.join(source, HF_DICT)):
      splits = json.loads(files.read_bytes(os.path.join(source, HF_DICT)))
      splits = splits.get('splits', splits)
      raise ValueError(
          f'{source} is a Hugging Face DatasetDict (splits {splits}) saved '
          f'with save_to_disk: give one split folder per split, e.g. '
          f'--source train={os.path.join(source, "train")}.')
    if is_hf_folder(source):
      return [source]
  return files.list_files(source, tuple(extensions))


def sniff(path: str) -> str | None:
  """What a file's first bytes show it to be, or None if not recognised."""
  with tf.io.gfile.GFile(path, 'rb') as f:
    head = f.read(8)
  return next((what for magic, what in _MAGIC if head.startswith(magic)),
              None)


def read_rows(path: str, columns: Sequence[str] | None = None
              ) -> Iterator[tuple[str, dict[str, Any]]]:
  """(row key, row) of a table; see the module docstring.

  Raises:
    ValueError: an unknown extension, content that is not what the
      extension says, a malformed line (naming file:line), or a header that
      looks like data.
  """
  if is_hf_folder(path):
    yield from _read_hf(path)
  elif path.endswith(PARQUET):
    yield from _read_parquet(path)
  elif path.endswith('.jsonl.zip'):
    yield from _read_zip(path)
  elif path.endswith(JSONL + CSV):
    compressed = path.endswith('.gz')
    kind = sniff(path)
    if kind and not (compressed and kind.startswith('a gzip')):
      raise ValueError(f'{path}: expected {_extension(path)} text, but the '
                       f'file is {kind}.')
    try:
      yield from _read_text(path, columns)
    except (UnicodeDecodeError, gzip.BadGzipFile, EOFError) as e:
      raise ValueError(f'{path}: expected UTF-8 {_extension(path)} text; '
                       f'cannot read it ({e}).') from e
  else:
    raise ValueError(f'{path}: unknown table format {_extension(path)!r}; '
                     f'expected {_DESCRIPTION}.')


def _extension(path: str) -> str:
  match = re.search(r'(\.[A-Za-z0-9]+)+$', os.path.basename(path))
  return match.group(0) if match else '(none)'


def _read_text(path, columns):
  with files.open_binary(path) as f:
    stream = gzip.GzipFile(fileobj=f) if path.endswith('.gz') else f
    text = io.TextIOWrapper(stream, encoding='utf-8', newline='')
    if re.search(r'\.(csv|tsv)(\.gz)?$', path):
      yield from _read_delimited(path, text, columns)
    else:
      yield from _read_jsonl(path, text, '')


def _read_jsonl(path, lines, prefix):
  for line_number, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      hint = (' (it has tabs: a TSV file? name it .tsv)'
              if line_number == 1 and '\t' in line else '')
      raise ValueError(f'{path}:{prefix}{line_number}: not valid JSON '
                       f'({e}){hint}.') from e
    if not isinstance(row, dict):
      raise ValueError(f'{path}:{prefix}{line_number}: expected a JSON '
                       f'object; got {type(row).__name__}.')
    yield f'{prefix}{line_number}', row


def _read_delimited(path, text, columns):
  tsv = bool(re.search(r'\.tsv(\.gz)?$', path))
  options = dict(delimiter='\t', quoting=csv.QUOTE_NONE) if tsv else {}
  reader = csv.reader(text, **options)
  if columns is None:
    header = next(reader, None)
    if header is None:
      return
    if any('://' in cell for cell in header):
      raise ValueError(
          f'{path}: the first row looks like data, not a header (it holds a '
          f'URL: {header!r}). For a file without a header (CC3M\'s TSV is '
          f'caption<TAB>url) give its columns, e.g. columns=["caption", '
          f'"url"].')
  else:
    header = list(columns)
  for row in reader:
    if not row or row == ['']:
      continue
    if len(row) != len(header):
      raise ValueError(f'{path}:{reader.line_num}: {len(row)} fields, but '
                       f'the columns are {header} ({len(header)}).')
    yield str(reader.line_num), dict(zip(header, row))


def _read_zip(path):
  with files.open_binary(path) as f:
    try:
      archive = zipfile.ZipFile(f)
    except zipfile.BadZipFile as e:
      raise ValueError(f'{path}: expected a zip archive of .jsonl files; '
                       f'it is {sniff(path) or "not one"} ({e}).') from e
    with archive:
      members = [m for m in archive.namelist() if not m.endswith('/')]
      if not members:
        raise ValueError(f'{path}: the zip archive is empty; expected '
                         '.jsonl members.')
      for member in members:
        prefix = f'{member}:' if len(members) > 1 else ''
        with archive.open(member) as raw:
          try:
            yield from _read_jsonl(
                path, io.TextIOWrapper(raw, encoding='utf-8'), prefix)
          except UnicodeDecodeError as e:
            raise ValueError(f'{path}:{member}: expected UTF-8 JSON lines '
                             f'({e}).') from e


def _read_parquet(path):
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  with files.open_binary(path) as f:
    try:
      table = pq.ParquetFile(f)
    except (pa.ArrowInvalid, OSError) as e:
      raise ValueError(f'{path}: expected a Parquet file; it is '
                       f'{sniff(path) or "not one"} ({e}).') from e
    row = 0
    for batch in table.iter_batches(batch_size=BATCH_ROWS):
      for values in batch.to_pylist():
        yield str(row), values
        row += 1


def _read_hf(path):
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  state = json.loads(files.read_bytes(os.path.join(path, HF_STATE)))
  data_files = [d['filename'] for d in state.get('_data_files') or []]
  if not data_files:
    raise ValueError(f'{path}/{HF_STATE} lists no _data_files; expected a '
                     'folder written by datasets.Dataset.save_to_disk.')
  row = 0
  for name in data_files:
    arrow = os.path.join(path, name)
    with files.open_binary(arrow) as f:
      try:
        reader = pa.ipc.open_stream(f)
      except pa.ArrowInvalid as e:
        raise ValueError(f'{arrow}: expected an Arrow stream (as '
                         f'datasets writes); cannot read it ({e}).') from e
      for batch in reader:
        for values in batch.to_pylist():
          yield str(row), values
          row += 1
