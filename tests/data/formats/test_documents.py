"""interleaved_jsonl: OBELICS-like and MMC4 JSONL, images in files and tars."""

import gzip
import json

import ml_collections
import numpy as np
import pytest

from flamingo_jax.data import pipeline
from flamingo_jax.data.formats import documents
from tests.data.formats import util

A, B, C, D = (util.image(seed) for seed in range(4))


def _line(record):
  return json.dumps(record) + '\n'


@pytest.fixture(scope='module')
def source(tmp_path_factory):
  root = tmp_path_factory.mktemp('docs')
  util.write_tar(root / 'docs-0001.tar', {'img/a.png': util.encode(A),
                                          'b.png': util.encode(B)})
  util.write(root / 'pics' / 'c.png', util.encode(C))
  util.write(root / 'pics' / 'd.png', util.encode(D))
  util.write(root / 'pics' / 'corrupt.png', b'\x89PNG not really')
  obelics = {'texts': ['Pets! ', None, '  My dog.', 'It barks.', None, None],
             'images': [None, 'img/a.png', None, None, 'pics/c.png', 'b.png'],
             'url': 'https://example.com'}
  util.write(root / 'docs-0001.jsonl', ''.join(_line(r) for r in [
      obelics,
      {'texts': ['Lost:', None, None], 'images': [None, 'b.png', 'gone.png']},
      {'texts': [None, 'Broken.', None],
       'images': ['b.png', None, 'pics/corrupt.png']},
      {'texts': ['Many', None, None, None, None],
       'images': [None, 'b.png', 'b.png', 'b.png', 'b.png']},
      {'texts': [None], 'images': ['b.png']},
      {'texts': ['Only text.'], 'images': [None]},
  ]))
  mmc4 = {'text_list': ['First.', 'Second.'],
          'image_info': [{'image_name': 'pics/d.png', 'matched_text_index': 1},
                         {'image_name': 'pics/c.png', 'matched_text_index': 0}],
          'similarity_matrix': [[0.3, 0.2]]}
  util.write(root / 'docs-0002.jsonl.gz', gzip.compress(_line(mmc4).encode()))
  return root


def test_documents_read_back_as_written(source, tmp_path):
  builder, stats = util.build('interleaved_jsonl', source, tmp_path,
                              max_images=3, name='docs',
                              on_bad_image='skip_document')
  assert stats == {'train': {
      'examples': 2, 'skipped/missing_image': 1, 'skipped/corrupt_image': 1,
      'skipped/too_many_images': 1, 'skipped/no_text': 1,
      'skipped/too_few_images': 1}}
  spec = ml_collections.ConfigDict(dict(
      builder='interleaved_jsonl/docs', split='train', data_dir=str(tmp_path)))
  data = util.by_source(pipeline.open_source(spec, '/nowhere'))
  chunks, media = pipeline.READERS['documents'](
      data[f'{source}/docs-0001.jsonl:1'])
  assert chunks == [{'text': 'Pets!'}, {'image': 0},
                    {'text': ' My dog. It barks.'}, {'image': 1},
                    {'image': 2}]
  for got, want in zip(media, [A, C, B], strict=True):
    np.testing.assert_array_equal(got, want)
  chunks, media = pipeline.READERS['documents'](
      data[f'{source}/docs-0002.jsonl.gz:1'])
  assert chunks == [{'image': 0}, {'text': ' First.'}, {'image': 1},
                    {'text': ' Second.'}]
  for got, want in zip(media, [C, D], strict=True):
    np.testing.assert_array_equal(got, want)
  # The text-only reader and the stored metadata.
  text_chunks, _ = pipeline.READERS['text'](
      data[f'{source}/docs-0002.jsonl.gz:1'])
  assert text_chunks == [{'text': ' First.'}, {'text': ' Second.'}]
  assert builder.info.metadata['options']['max_images'] == 3


def test_by_default_a_document_keeps_its_found_images(source, tmp_path):
  builder, stats = util.build('interleaved_jsonl',
                              f'{source}/docs-0001.jsonl', tmp_path,
                              max_images=3)
  assert stats['train'] == {
      'examples': 4, 'dropped_image/missing_image': 1,
      'dropped_image/corrupt_image': 1, 'dropped_image/too_many_images': 1,
      'skipped/no_text': 1, 'skipped/too_few_images': 1}
  data = util.by_source(builder.as_data_source(split='train'))
  lost = data[f'{source}/docs-0001.jsonl:2']  # 'gone.png' is missing.
  assert [util.text(c) for c in lost['chunks']['text']] == ['Lost:', '']
  many = data[f'{source}/docs-0001.jsonl:4']  # The first 3 of 4 images.
  assert list(many['chunks']['image']) == [-1, 0, 1, 2]


def test_malformed_line_names_file_and_line(tmp_path):
  util.write(tmp_path / 'src' / 'bad.jsonl',
             _line({'texts': ['a'], 'images': [None]}) + '{"texts": [\n')
  with pytest.raises(ValueError, match=r'bad\.jsonl:2: not valid JSON'):
    util.build('interleaved_jsonl', tmp_path / 'src', tmp_path / 'out')


@pytest.mark.parametrize('record, message', [
    ({'texts': ['a', None], 'images': [None]}, 'same length; got 2 and 1'),
    ({'texts': ['a'], 'images': ['x.png']}, 'exactly one of a text'),
    ({'text_list': ['a'], 'image_info': [{'image_name': 'x.png',
                                          'matched_text_index': 3}]},
     'matched_text_index 3'),
    ({'text': 'a'}, 'OBELICS-like'),
])
def test_schema_errors_name_the_record(record, message):
  with pytest.raises(ValueError, match=message) as error:
    documents.parse_document(record, 'f.jsonl:7')
  assert 'f.jsonl:7' in str(error.value)


def test_truncated_image_shard_is_named_and_its_images_counted(tmp_path,
                                                               caplog):
  src = tmp_path / 'src'
  shard = util.write_tar(src / 'docs.tar', {
      'a.png': util.encode(A), 'b.png': util.encode(B),
      'c.png': util.encode(C)})
  util.cut(shard, util.tar_layout(shard)['b.png'][1] + 100)
  util.write(src / 'docs.jsonl', ''.join(
      _line({'texts': ['Text.', None], 'images': [None, name]})
      for name in ('a.png', 'b.png', 'c.png')))
  caplog.set_level('WARNING')
  builder, stats = util.build('interleaved_jsonl', src, tmp_path / 'out')
  assert stats == {'train': {'examples': 1, 'skipped/too_few_images': 2,
                             'dropped_image/corrupt_image': 1,
                             'dropped_image/missing_image': 1}}
  (example,) = builder.as_data_source(split='train')
  np.testing.assert_array_equal(example['images'][0], A)
  warnings = [r.getMessage() for r in caplog.records
              if 'breaks off' in r.getMessage()]
  assert len(warnings) == 1  # Indexed once.
  assert warnings[0].startswith(
      f"{shard}: the tar file breaks off at member 'b.png'")


def test_image_shards_must_be_tars(tmp_path):
  util.write(tmp_path / 'images.tar.gz', gzip.compress(b'not a tar'))
  with pytest.raises(ValueError, match=r'images\.tar\.gz: not an '
                     'uncompressed tar file'):
    documents.TarIndex([str(tmp_path / 'images.tar.gz')])
