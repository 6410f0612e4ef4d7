r"""Trains Flamingo: python -m flamingo_jax.train --config ... --workdir ...

  python -m flamingo_jax.train --config experiments/tiny.py --workdir /tmp/w
  python -m flamingo_jax.train --config experiments/tiny.py --workdir /tmp/w \
      --config.total_steps=200 --config.optim.learning_rate=3e-4

Running the same command again resumes from the workdir's last checkpoint.
On a multi-host pod, set FLAMINGO_JAX_DISTRIBUTED=1 (launch/run_tpu.sh does)
so that every process joins `jax.distributed` before anything else.
"""

import os

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from flamingo_jax import cli

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Training config file, e.g. experiments/tiny.py.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Directory for checkpoints, metrics and the report; a '
    'run in an existing workdir resumes from its last checkpoint.')
flags.mark_flags_as_required(['config', 'workdir'])


def _quiet_library_logs() -> None:
  """Keeps orbax's and tfds's INFO chatter out of the console."""
  import logging as std_logging  # pylint: disable=g-import-not-at-top

  class Filter(std_logging.Filter):

    def filter(self, record):
      noisy = any(part in record.pathname
                  for part in ('/orbax/', '/tensorflow_datasets/'))
      return record.levelno >= std_logging.WARNING or not noisy

  logging.get_absl_handler().addFilter(Filter())


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  _quiet_library_logs()
  if not jax.config.jax_compilation_cache_dir:
    # Resumed runs and reruns skip recompiling (minutes on a small CPU).
    jax.config.update('jax_compilation_cache_dir', os.path.join(
        os.path.expanduser('~'), '.cache', 'flamingo_jax', 'jax_cache'))
  if os.environ.get('FLAMINGO_JAX_DISTRIBUTED'):
    jax.distributed.initialize()
  logging.info('JAX processes: %d, devices: %s', jax.process_count(),
               jax.devices())
  # Imported after jax.distributed.initialize, which must come first.
  from flamingo_jax.orchestration import recipe  # pylint: disable=g-import-not-at-top
  recipe.run(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
