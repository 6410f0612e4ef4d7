r"""Builds a TFDS dataset from data in one of the formats of this package.

  python -m flamingo_jax.data.formats --format FORMAT --source PATH \
      --data_dir DIR [--name NAME] [--option KEY=VALUE ...] [--num_workers N]
      [--beam_runner RUNNER --beam_arg=--OPTION=VALUE ...]

`--source` is a path (local or gs://), or, repeated, SPLIT=PATH for the
training formats. `--option` sets a format option (see each module's
docstring); VALUE is read as JSON when it parses (8, null, {"query": "val"})
and as a string otherwise. Prints a progress line per split every few
seconds, the statistics of skipped records, and the builder name to use in
a config. Reruns reuse what is already built.
"""

import json
import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # Before TF is imported.

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
import tensorflow as tf

from flamingo_jax.data import formats
# pylint: enable=g-import-not-at-top,wrong-import-position

_FORMAT = flags.DEFINE_enum('format', None, formats.format_names(),
                            'The format of the source.', required=True)
_SOURCE = flags.DEFINE_multi_string(
    'source', None, 'PATH, or SPLIT=PATH (repeatable).', required=True)
_DATA_DIR = flags.DEFINE_string('data_dir', None, 'TFDS data directory.',
                                required=True)
_NAME = flags.DEFINE_string('name', None, 'Dataset (config) name; default: '
                            'from the source and options.')
_OPTION = flags.DEFINE_multi_string('option', [], 'KEY=VALUE (repeatable).')
_NUM_WORKERS = flags.DEFINE_integer('num_workers', None,
                                    'Reader threads (default: the CPUs).')
_BEAM_RUNNER = flags.DEFINE_string(
    'beam_runner', None, 'Build with Apache Beam on this runner '
    '(DirectRunner, DataflowRunner, FlinkRunner, SparkRunner, ...); '
    'default: one process.')
_BEAM_ARG = flags.DEFINE_multi_string(
    'beam_arg', [], 'A Beam pipeline option (repeatable), e.g. '
    '--beam_arg=--direct_num_workers=8 '
    '--beam_arg=--direct_running_mode=multi_processing.')


def parse_source(values: list[str]) -> str | dict[str, str]:
  """['PATH'] -> 'PATH'; ['train=P1', 'validation=P2'] -> a dict."""
  if len(values) == 1 and '=' not in values[0].split('/')[0]:
    return values[0]
  source = {}
  for value in values:
    split, sep, path = value.partition('=')
    if not sep or not split or not path:
      raise app.UsageError(f'--source {value!r}: expected SPLIT=PATH when '
                           'giving several sources.')
    source[split] = path
  return source


def parse_options(values: list[str]) -> dict[str, object]:
  """['max_images=16', 'image_dir=/d'] -> {'max_images': 16, ...}."""
  options = {}
  for value in values:
    key, sep, text = value.partition('=')
    if not sep or not key:
      raise app.UsageError(f'--option {value!r}: expected KEY=VALUE.')
    try:
      options[key] = json.loads(text)
    except json.JSONDecodeError:
      options[key] = text
  return options


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  tf.config.set_visible_devices([], 'GPU')  # Building needs no accelerator.
  formats.build(_FORMAT.value, parse_source(_SOURCE.value), _DATA_DIR.value,
                name=_NAME.value, num_workers=_NUM_WORKERS.value,
                log=lambda line: print(line, flush=True),
                beam_runner=_BEAM_RUNNER.value, beam_args=_BEAM_ARG.value,
                **parse_options(_OPTION.value))


if __name__ == '__main__':
  app.run(main)
