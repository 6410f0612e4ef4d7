"""webdataset_pairs and table_pairs: tar shards, CSV/JSONL + image files."""

import json

import numpy as np
import pytest

from flamingo_jax.data import pipeline
from flamingo_jax.data.formats import pairs
from tests.data.formats import util

IMAGES = [util.image(seed, 32, 32) for seed in range(6)]


def test_webdataset_shards_read_back_as_written(tmp_path):
  jpeg = util.encode(IMAGES[0], 'JPEG')
  util.write_tar(tmp_path / 'src' / 'shard-000.tar', {
      'a/000.jpg': jpeg, 'a/000.txt': b' A cat on a mat. ',
      'a/001.png': util.encode(IMAGES[1]),
      'a/001.json': json.dumps({'caption': 'A dog.', 'width': 32}).encode(),
      '002.webp': util.encode(IMAGES[2], 'WEBP'), '002.txt': b'Lossy.',
      '003.png': util.encode(IMAGES[3]), '003.txt': b'   ',
  })
  util.write_tar(tmp_path / 'src' / 'shard-001.tar', {
      '004.jpg': b'\xff\xd8 truncated', '004.txt': b'Corrupt.',
      '005.txt': b'No image.',
      '006.seg.png': util.encode(IMAGES[5]), '006.txt': b'Dotted name.',
  })
  util.write_tar(tmp_path / 'src' / 'shard-002.tar', {})  # Not in the range.
  builder, stats = util.build(
      'webdataset_pairs', f'{tmp_path}/src/shard-{{000..001}}.tar',
      tmp_path / 'out')
  assert stats == {'train': {'examples': 4, 'skipped/empty_caption': 1,
                             'skipped/corrupt_image': 1,
                             'skipped/missing_image': 1}}
  data = util.by_source(builder.as_data_source(split='train'))
  shard = f'{tmp_path}/src/shard-000.tar'
  chunks, (image,) = pipeline.READERS['pairs'](data[f'{shard}:a/000'])
  assert chunks == [{'image': 0}, {'text': 'A cat on a mat.'}]
  np.testing.assert_array_equal(image, util.decode(jpeg))  # Bytes kept.
  example = data[f'{shard}:a/001']
  assert util.text(example['caption']) == 'A dog.'
  np.testing.assert_array_equal(example['image'], IMAGES[1])
  np.testing.assert_array_equal(data[f'{shard}:002']['image'], util.decode(
      util.encode(IMAGES[2], 'WEBP')))  # WebP is stored as PNG.
  shard = f'{tmp_path}/src/shard-001.tar'
  np.testing.assert_array_equal(data[f'{shard}:006']['image'], IMAGES[5])


def test_webdataset_key_rule():
  assert pairs.split_key('dir/000017.seg.PNG') == ('dir/000017', 'seg.png')


def test_tables_read_back_with_splits(tmp_path):
  src = tmp_path / 'src'
  for i in range(4):
    util.write(src / 'images' / f'{i}.png', util.encode(IMAGES[i]))
  util.write(src / 'train.csv',
             'file,text\nimages/0.png,"A red, round thing."\n'
             'images/1.png,\nimages/missing.png,Gone.\n'
             f'{src}/images/2.png,Absolute path.\n')
  util.write(src / 'validation.jsonl',
             json.dumps({'file': 'images/3.png', 'text': 'Big.'}) + '\n')
  _, stats = util.build(
      'table_pairs', {'train': src / 'train.csv',
                      'validation': src / 'validation.jsonl'},
      tmp_path / 'out', name='tables', image_key='file', caption_key='text',
      max_image_size=16)
  assert stats == {'train': {'examples': 2, 'skipped/empty_caption': 1,
                             'skipped/missing_image': 1},
                   'validation': {'examples': 1}}
  spec = util.ml_collections_spec('table_pairs/tables', 'train',
                                  tmp_path / 'out')
  train = util.by_source(pipeline.open_source(spec, str(tmp_path / 'out')))
  example = train[f'{src}/train.csv:2']
  assert util.text(example['caption']) == 'A red, round thing.'
  assert example['image'].shape == (16, 16, 3)  # Shrunk to max_image_size.
  assert train[f'{src}/train.csv:5']['id'] == 3  # Its position in the file.


def test_table_errors_name_the_file_and_line(tmp_path):
  util.write(tmp_path / 'src' / 'pairs.csv', 'image,caption\nmissing.png,A.\n')
  with pytest.raises(ValueError, match=r"Split 'train' of table_pairs .* has "
                     r"no usable example .*'skipped/missing_image': 1"):
    util.build('table_pairs', tmp_path / 'src', tmp_path / 'out')
  with pytest.raises(ValueError, match=r'pairs\.csv:2: Image file .* does '
                     r'not exist.*on_error="raise"'):
    util.build('table_pairs', tmp_path / 'src', tmp_path / 'out',
               on_error='raise')
  with pytest.raises(ValueError, match=r"pairs\.csv:2: no 'url' field; the "
                     r"record has \['caption', 'image'\]"):
    util.build('table_pairs', tmp_path / 'src', tmp_path / 'out',
               image_key='url')
