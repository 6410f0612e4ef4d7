"""Builds the embedded world's TFDS datasets.

  python -m flamingo_jax.data.world --data_dir DIR [--sizes tiny]
      [--datasets world_pairs,world_vqa] [--image_size 64] [--num_workers N]

Prints one line per dataset (and TFDS progress bars); reruns reuse what is
already built.
"""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # Before TF is imported.

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
import tensorflow as tf

from flamingo_jax.data.world import build
from flamingo_jax.data.world import builders
# pylint: enable=g-import-not-at-top,wrong-import-position

_DATA_DIR = flags.DEFINE_string('data_dir', None, 'TFDS data directory.',
                                required=True)
_SIZES = flags.DEFINE_enum('sizes', 'default', builders.SIZES,
                           'Table of split sizes.')
_DATASETS = flags.DEFINE_list('datasets', None,
                              f'Datasets to build (default: all of '
                              f'{", ".join(builders.DATASETS)}).')
_IMAGE_SIZE = flags.DEFINE_integer('image_size',
                                   builders.DEFAULT_IMAGE_SIZE,
                                   'Image side in pixels.')
_NUM_WORKERS = flags.DEFINE_integer(
    'num_workers', None, 'Generator processes (default: the CPUs, <= 16).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  # Building needs no accelerator; keep TensorFlow off the GPUs.
  tf.config.set_visible_devices([], 'GPU')
  build.build_all(_DATA_DIR.value, _SIZES.value, datasets=_DATASETS.value,
                     image_size=_IMAGE_SIZE.value,
                     num_workers=_NUM_WORKERS.value,
                     log=lambda line: print(line, flush=True))


if __name__ == '__main__':
  app.run(main)
