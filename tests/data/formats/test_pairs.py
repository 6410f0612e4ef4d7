"""webdataset_pairs and table_pairs: tar shards, CSV/JSONL + image files."""

import json

import numpy as np
import pytest

from flamingo_jax.data import pipeline
from flamingo_jax.data.formats import common
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


def _shard(path) -> str:
  """Samples 000..002, each an image (over 512 bytes) and a caption."""
  return util.write_tar(path, {
      f'{i:03d}.{extension}': data for i in range(3)
      for extension, data in (('png', util.encode(IMAGES[i])),
                              ('txt', f'Caption {i}.'.encode()))})


# Where a download may stop, and what must come of it: the samples read,
# and the message (the member and tarfile's reason).
_CUTS = {
    # Inside 001.png's data: 000 is complete, 001 is lost.
    'mid_member': (lambda m: m['001.png'][1] + 100, ['000'],
                   r"inside member '001\.png' \(unexpected end of data\)"
                   r".* Kept the 1 sample\(s\) .* skipped sample '001'"),
    # On a block boundary inside 001.png's data: its header promises more.
    'short_data_on_block': (lambda m: m['001.png'][1] + 512, ['000'],
                            r"inside member '001\.png'"),
    # On the boundary after 001.png: tarfile sees an end; 001 lacks its
    # caption, so it is not yielded.
    'between_members': (lambda m: m['001.txt'][0], ['000'],
                        r"after member '001\.png' \(no end-of-archive "
                        r"block\).* skipped sample '001'"),
    'inside_header': (lambda m: m['001.txt'][0] + 100, ['000'],
                      r"after member '001\.png' \(no end-of-archive"),
    # Every member is whole but the end blocks are missing: the last sample
    # cannot be known complete.
    'no_end_blocks': (lambda m: m['002.txt'][1] + 512, ['000', '001'],
                      r"after member '002\.txt' \(no end-of-archive"),
}


@pytest.mark.parametrize('cut', sorted(_CUTS))
def test_truncated_shards_are_detected(tmp_path, cut):
  position, read, message = _CUTS[cut]
  path = _shard(tmp_path / 'shard.tar')
  util.cut(path, position(util.tar_layout(path)))
  keys = []
  with pytest.raises(common.BadInput, match=message) as error:
    for key, sample in pairs.read_samples(path):
      keys.append(key)
      assert sorted(sample) == ['png', 'txt']
  assert keys == read
  assert error.value.reason == 'truncated_tar'
  assert str(error.value).startswith(f'{path}: the tar file breaks off')


def test_whole_and_empty_shards(tmp_path):
  path = _shard(tmp_path / 'shard.tar')
  assert [key for key, _ in pairs.read_samples(path)] == ['000', '001', '002']
  with pytest.raises(common.BadInput, match='not a readable tar file') as e:
    list(pairs.read_samples(util.write(tmp_path / 'empty.tar', b'')))
  assert e.value.reason == 'unreadable_tar'


def test_webdataset_damage_is_skipped_counted_and_named(tmp_path, caplog):
  src = tmp_path / 'src'
  cut_mid = _shard(src / 'shard-0.tar')
  util.cut(cut_mid, util.tar_layout(cut_mid)['001.png'][1] + 100)
  cut_on_block = _shard(src / 'shard-1.tar')
  util.cut(cut_on_block, util.tar_layout(cut_on_block)['002.png'][0])
  util.write(src / 'shard-2.tar', b'')  # A download that never started.
  png = util.encode(IMAGES[3])
  util.write_tar(src / 'shard-3.tar', {
      '300.png': png, '300.json': b'{"caption": "Cut',
      '301.png': png, '301.json': b'["A list."]',
      '302.png': png, '302.txt': b'\xff\xfe Not UTF-8.',
      '303.png': png, '303.json': b'{"caption": "Whole."}'})
  caplog.set_level('WARNING')
  builder, stats = util.build('webdataset_pairs', src, tmp_path / 'out')
  assert stats == {'train': {'examples': 3, 'skipped/truncated_tar': 2,
                             'skipped/unreadable_tar': 1,
                             'skipped/bad_json': 2, 'skipped/bad_text': 1}}
  # shard-1's 001 is whole, but nothing tells it from a sample cut short.
  assert sorted(util.by_source(builder.as_data_source(split='train'))) == [
      f'{cut_mid}:000', f'{cut_on_block}:000', f'{src}/shard-3.tar:303']
  logged = caplog.text
  assert f"{cut_mid}: the tar file breaks off inside member '001.png'" in (
      logged)
  assert f"{cut_on_block}: the tar file breaks off after member '001.txt'" in (
      logged)
  assert f'{src}/shard-3.tar:300.json: not a JSON object' in logged
