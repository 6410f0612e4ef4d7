"""Beam builds (DirectRunner, 2 worker processes) equal one-process builds.

Needs apache_beam (the `beam` extra of setup.py); skipped
without it.
"""

import json

import numpy as np
import pytest

from flamingo_jax.data import formats
from tests.data.formats import util

beam = pytest.importorskip('apache_beam')

IMAGES = [util.image(seed, 12, 12) for seed in range(6)]
BEAM_ARGS = ['--direct_num_workers=2', '--direct_running_mode=multi_processing']
# Two threads: the same pipeline without starting worker processes (~25 s).
THREADS = ['--direct_num_workers=2', '--direct_running_mode=multi_threading']


def _examples(builder):
  return util.by_source(builder.as_data_source(split='train'))


def _assert_same(one, other):
  assert formats.statistics(one) == formats.statistics(other)
  a, b = _examples(one), _examples(other)
  assert sorted(a) == sorted(b)
  for key, example in a.items():
    for name, value in example.items():
      if name == 'images':
        for x, y in zip(value, b[key][name], strict=True):
          np.testing.assert_array_equal(x, y)
      elif name == 'chunks':
        for field in value:
          np.testing.assert_array_equal(value[field], b[key][name][field])
      else:
        np.testing.assert_array_equal(value, b[key][name], err_msg=key)


def test_documents_beam_build_equals_one_process(tmp_path):
  src = tmp_path / 'src'
  for part in range(3):
    util.write_tar(src / f'docs-{part}.tar', {
        f'{part}-{i}.png': util.encode(IMAGES[(part + i) % 6])
        for i in range(3)})
    rows = [{'texts': [f'Doc {part}.{i}', None, None],
             'images': [None, f'{part}-{i}.png', f'{part}-gone.png']}
            for i in range(3)]
    rows.append({'texts': [None], 'images': [f'{part}-0.png']})  # No text.
    util.write(src / f'docs-{part}.jsonl',
               ''.join(json.dumps(r) + '\n' for r in rows))
  one, stats = util.build('interleaved_jsonl', src, tmp_path / 'one',
                          name='docs')
  assert stats == {'train': {'examples': 9, 'skipped/no_text': 3,
                             'dropped_image/missing_image': 9}}
  beamed = formats.build('interleaved_jsonl', str(src), str(tmp_path / 'beam'),
                         name='docs', log=lambda line: None,
                         beam_runner='DirectRunner', beam_args=BEAM_ARGS)
  _assert_same(one, beamed)


def test_webdataset_beam_build_equals_one_process(tmp_path):
  for shard in range(2):
    members = {}
    for i in range(3):
      members[f'{shard}{i}.png'] = util.encode(IMAGES[i])
      if i < 2:  # The third has no caption.
        members[f'{shard}{i}.txt'] = f'Caption {shard}{i}.'.encode()
    util.write_tar(tmp_path / 'src' / f'{shard:05d}.tar', members)
  one, stats = util.build('webdataset_pairs', tmp_path / 'src',
                          tmp_path / 'one', name='pairs')
  assert stats == {'train': {'examples': 4, 'skipped/empty_caption': 2}}
  beamed = formats.build('webdataset_pairs', str(tmp_path / 'src'),
                         str(tmp_path / 'beam'), name='pairs',
                         log=lambda line: None, beam_runner='DirectRunner',
                         beam_args=THREADS)
  _assert_same(one, beamed)
