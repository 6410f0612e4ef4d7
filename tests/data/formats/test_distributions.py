"""The public datasets' own file shapes, built as a new user would.

Each test writes a tiny file in exactly the shape a dataset is distributed
in (OBELICS Parquet, MMC4 .jsonl.zip, LAION Parquet + img2dataset
WebDataset, CC3M TSV, WebVid CSV, a `datasets` save_to_disk folder) and
builds it, asserting the skip counts.
"""

import gzip
import io
import json
import os
import zipfile

import numpy as np
import pyarrow as pa
import pytest

from flamingo_jax.data.formats import common
from flamingo_jax.data.formats import img2dataset
from flamingo_jax.data.formats import tables
from tests.data.formats import util

IMAGES = [util.image(seed, 16, 16) for seed in range(8)]
URL = 'https://example.com/img/{}.jpg'


def _images(example):
  return [np.asarray(image) for image in example['images']]


# ------------------------------------------------------------- OBELICS --


@pytest.fixture(scope='module')
def obelics(tmp_path_factory):
  """OBELICS' Parquet (images are URLs) and an img2dataset 'files' folder."""
  root = tmp_path_factory.mktemp('obelics')
  util.write_img2dataset(root / 'images', [
      (URL.format(1), IMAGES[1]), (URL.format(2), None),  # 2 failed.
      (URL.format(4), IMAGES[4])])  # 3 was never downloaded.
  strings = pa.list_(pa.string())
  util.write_parquet(root / 'obelics-00000.parquet', {
      'images': [[None, URL.format(1), None, URL.format(2), URL.format(3)],
                 [URL.format(4), None],
                 [None, URL.format(2)]],
      'texts': [['A page.', None, 'More text.', None, None],
                [None, 'Caption four.'],
                ['Only a failed image.', None]],
      'metadata': ['[]'] * 3, 'general_metadata': ['{}'] * 3,
  }, types={'images': strings, 'texts': strings})
  return root


def test_obelics_parquet_with_img2dataset_images(obelics, tmp_path):
  builder, stats = util.build(
      'interleaved_jsonl', obelics / 'obelics-00000.parquet', tmp_path,
      img2dataset_dir=str(obelics / 'images'))
  assert stats == {'train': {'examples': 2, 'dropped_image/missing_image': 3,
                             'skipped/too_few_images': 1}}
  data = util.by_source(builder.as_data_source(split='train'))
  page = data[f'{obelics}/obelics-00000.parquet:0']
  assert [util.text(t) for t in page['chunks']['text']] == [
      'A page.', '', ' More text.']
  np.testing.assert_array_equal(_images(page), [IMAGES[1]])
  np.testing.assert_array_equal(
      _images(data[f'{obelics}/obelics-00000.parquet:1']), [IMAGES[4]])


def test_urls_are_never_fetched_and_never_crash(obelics, tmp_path):
  # No img2dataset folder: every URL is a missing image, even strict.
  _, stats = util.build('interleaved_jsonl',
                        obelics / 'obelics-00000.parquet', tmp_path / 'a',
                        min_images=0)
  assert stats == {'train': {'examples': 3,
                             'dropped_image/missing_image': 5}}
  _, stats = util.build('interleaved_jsonl',
                        obelics / 'obelics-00000.parquet', tmp_path / 'b',
                        img2dataset_dir=str(obelics / 'images'),
                        on_bad_image='skip_document')
  assert stats == {'train': {'examples': 1, 'skipped/missing_image': 2}}


def test_img2dataset_index_says_why_a_url_is_missing(obelics):
  index = img2dataset.Img2DatasetIndex(str(obelics / 'images'))
  assert len(index) == 2
  where, data = index.read(URL.format(4))
  assert where.endswith('00001/000010000.jpg')  # Its key, not the URL.
  np.testing.assert_array_equal(util.decode(data), IMAGES[4])
  with pytest.raises(common.BadInput, match="status 'failed_to_download': "
                     'HTTP 404'):
    index.read(URL.format(2))
  with pytest.raises(common.BadInput, match='not in its url -> key'):
    index.read(URL.format(3))
  with pytest.raises(ValueError, match='not an img2dataset output folder'):
    img2dataset.Img2DatasetIndex(str(obelics))


# ---------------------------------------------------------------- MMC4 --


def test_mmc4_jsonl_zip(tmp_path):
  src = tmp_path / 'mmc4'
  util.write(src / 'images' / 'aa11.jpg', util.encode(IMAGES[0]))
  # Downloaded from raw_url by img2dataset, WebDataset with JSON sidecars.
  util.write_img2dataset(src / 'downloaded', [(URL.format(5), IMAGES[5])],
                         output_format='webdataset', parquet_sidecars=False)

  def info(name, index, url=None):
    return {'image_name': name, 'raw_url': url or URL.format(name),
            'matched_text_index': index, 'matched_sim': 0.3}

  docs = [
      {'url': 'https://a.org', 'text_list': ['First.', 'Second.'],
       'image_info': [info('aa11.jpg', 0), info('bb22.jpg', 1, URL.format(5)),
                      info('cc33.jpg', 1)],
       'similarity_matrix': [[0.3, 0.1]]},
      {'url': 'https://b.org', 'text_list': ['Nothing found.'],
       'image_info': [info('dd44.jpg', 0)], 'similarity_matrix': [[0.2]]},
  ]
  buffer = io.BytesIO()
  with zipfile.ZipFile(buffer, 'w') as archive:
    archive.writestr('docs_shard_0_v2.jsonl',
                     ''.join(json.dumps(d) + '\n' for d in docs))
  util.write(src / 'docs_shard_0_v2.jsonl.zip', buffer.getvalue())
  builder, stats = util.build(
      'interleaved_jsonl', src, tmp_path / 'out',
      image_dir=str(src / 'images'),
      img2dataset_dir=str(src / 'downloaded'))
  assert stats == {'train': {'examples': 1, 'dropped_image/missing_image': 2,
                             'skipped/too_few_images': 1}}
  (doc,) = builder.as_data_source(split='train')
  assert util.text(doc['source']) == f'{src}/docs_shard_0_v2.jsonl.zip:1'
  assert list(doc['chunks']['image']) == [0, -1, 1, -1]
  np.testing.assert_array_equal(_images(doc), [IMAGES[0], IMAGES[5]])


# ------------------------------------------------------- LAION, CC3M --


def test_laion_parquet_and_img2dataset_webdataset(tmp_path):
  src = tmp_path / 'laion'
  urls = [URL.format(i) for i in range(5)]
  util.write_img2dataset(src / 'shards', [
      (urls[0], IMAGES[0]), (urls[1], None), (urls[2], IMAGES[2]),
      (urls[3], IMAGES[3])], output_format='webdataset')
  util.write_parquet(src / 'part-00000.parquet', {
      'SAMPLE_ID': [10, 11, 12, 13, 14], 'URL': urls,
      'TEXT': ['A cat.', 'A dog.', '  ', 'A bird.', 'A fish.'],
      'HEIGHT': [16] * 5, 'WIDTH': [16] * 5, 'LICENSE': ['?'] * 5,
      'NSFW': ['UNLIKELY'] * 5, 'similarity': [0.3] * 5})
  with pytest.raises(ValueError, match=r"part-00000\.parquet:0: no 'image' "
                     r"field; the record has \['HEIGHT', 'LICENSE'"):
    util.build('table_pairs', src / 'part-00000.parquet', tmp_path / 'bad')
  builder, stats = util.build(
      'table_pairs', src / 'part-00000.parquet', tmp_path / 'out',
      image_key='URL', caption_key='TEXT',
      img2dataset_dir=str(src / 'shards'))
  assert stats == {'train': {'examples': 2, 'skipped/missing_image': 2,
                             'skipped/empty_caption': 1}}
  data = util.by_source(builder.as_data_source(split='train'))
  np.testing.assert_array_equal(
      data[f'{src}/part-00000.parquet:3']['image'], IMAGES[3])
  with pytest.raises(ValueError, match=r'part-00000\.parquet: expected '
                     r'WebDataset \.tar shards, but the file is a Parquet'):
    util.build('webdataset_pairs', src / 'part-00000.parquet', tmp_path / 'w')
  # The img2dataset shards themselves are WebDataset pairs.
  _, stats = util.build('webdataset_pairs', src / 'shards', tmp_path / 'wds')
  assert stats == {'train': {'examples': 3}}


def test_cc3m_tsv_without_header(tmp_path):
  src = tmp_path / 'cc3m'
  util.write_img2dataset(src / 'images', [
      (URL.format(0), IMAGES[0]), (URL.format(1), None)])
  util.write(src / 'Train_GCC-training.tsv',
             f'a dog runs on the "beach"\t{URL.format(0)}\n'
             f'a tree\t{URL.format(1)}\n'
             f'an actor at the premiere\t{URL.format(2)}\n')
  with pytest.raises(ValueError, match=r'first row looks like data.*'
                     r'columns=\["caption", "url"\]'):
    util.build('table_pairs', src / 'Train_GCC-training.tsv', tmp_path / 'a')
  builder, stats = util.build(
      'table_pairs', src / 'Train_GCC-training.tsv', tmp_path / 'b',
      columns=['caption', 'url'], image_key='url',
      img2dataset_dir=str(src / 'images'))
  assert stats == {'train': {'examples': 1, 'skipped/missing_image': 2}}
  (pair,) = builder.as_data_source(split='train')
  assert util.text(pair['caption']) == 'a dog runs on the "beach"'
  np.testing.assert_array_equal(pair['image'], IMAGES[0])


# -------------------------------------------------------------- WebVid --


def test_webvid_csv(tmp_path):
  src = tmp_path / 'webvid'
  frames = [util.image(seed, 16, 16) for seed in range(8)]
  util.write_video(src / 'videos' / '000001_000050' / '31353427.mp4', frames,
                   fps=4)
  util.write(src / 'results_2M_val.csv',
             'videoid,contentUrl,duration,page_dir,name\n'
             '31353427,https://ak.picdn.net/a.mp4,PT00H00M02S,000001_000050,'
             '"Surfer, at sunset."\n'
             '14781349,https://ak.picdn.net/b.mp4,PT00H00M30S,000001_000050,'
             'Not downloaded.\n')
  builder, stats = util.build(
      'video_pairs', src / 'results_2M_val.csv', tmp_path / 'out',
      video_dir=str(src / 'videos'), caption_key='name',
      video_path_format='{page_dir}/{videoid}.mp4', num_frames=2, fps=1.0,
      frame_format='png')
  assert stats == {'train': {'examples': 1, 'skipped/missing_video': 1}}
  (pair,) = builder.as_data_source(split='train')
  assert util.text(pair['caption']) == 'Surfer, at sunset.'
  assert np.asarray(pair['video']).shape == (2, 16, 16, 3)


# --------------------------------------------- Hugging Face datasets --


def test_hf_save_to_disk_folder(tmp_path):
  image_type = pa.struct([('bytes', pa.binary()), ('path', pa.string())])
  folder = util.write_hf_dataset(tmp_path / 'hf' / 'train', {
      'image': [{'bytes': util.encode(IMAGES[i]), 'path': None}
                for i in range(2)] + [{'bytes': None, 'path': 'gone.png'}],
      'caption': ['One.', 'Two.', 'Three.']}, types={'image': image_type})
  builder, stats = util.build('table_pairs', folder, tmp_path / 'out')
  assert stats == {'train': {'examples': 2, 'skipped/missing_image': 1}}
  data = util.by_source(builder.as_data_source(split='train'))
  np.testing.assert_array_equal(data[f'{folder}:1']['image'], IMAGES[1])
  util.write(tmp_path / 'hf' / 'dataset_dict.json',
             json.dumps({'splits': ['train']}))
  with pytest.raises(ValueError, match=r"DatasetDict \(splits \['train'\]\)"
                     r'.*--source train='):
    util.build('table_pairs', tmp_path / 'hf', tmp_path / 'out2')


def test_a_folder_written_by_datasets(tmp_path):
  datasets = pytest.importorskip('datasets')
  written = datasets.Dataset.from_dict(
      {'texts': [['Hello.', None]], 'images': [[None, 'a.png']]})
  written.save_to_disk(str(tmp_path / 'docs'))
  rows = list(tables.read_rows(str(tmp_path / 'docs')))
  assert rows == [('0', {'texts': ['Hello.', None],
                         'images': [None, 'a.png']})]
  pairs = datasets.Dataset.from_dict(
      {'image': [util.encode(IMAGES[0]), util.encode(IMAGES[1])],
       'caption': ['One.', 'Two.']},
      features=datasets.Features({'image': datasets.Image(),
                                  'caption': datasets.Value('string')}))
  pairs.save_to_disk(str(tmp_path / 'pairs'))
  builder, stats = util.build('table_pairs', tmp_path / 'pairs',
                              tmp_path / 'out')
  assert stats == {'train': {'examples': 2}}
  data = util.by_source(builder.as_data_source(split='train'))
  np.testing.assert_array_equal(data[f'{tmp_path}/pairs:1']['image'],
                                IMAGES[1])


# ------------------------------------------------------------- readers --


ROWS = [{'image': 'a.png', 'caption': 'One, "quoted".'},
        {'image': 'b.png', 'caption': 'Two.'}]


def _write_all_shapes(root):
  jsonl = ''.join(json.dumps(r) + '\n' for r in ROWS)
  buffer = io.BytesIO()
  with zipfile.ZipFile(buffer, 'w') as archive:
    archive.writestr('t.jsonl', jsonl)
  util.write(root / 't.jsonl', jsonl)
  util.write(root / 't.jsonl.gz', gzip.compress(jsonl.encode()))
  util.write(root / 't.jsonl.zip', buffer.getvalue())
  util.write(root / 't.csv', 'image,caption\na.png,"One, ""quoted""."\n'
             'b.png,Two.\n')
  util.write(root / 't.tsv.gz', gzip.compress(
      b'image\tcaption\na.png\tOne, "quoted".\nb.png\tTwo.\n'))
  util.write_parquet(root / 't.parquet', {k: [r[k] for r in ROWS]
                                          for k in ROWS[0]})
  util.write_hf_dataset(root / 'hf', {k: [r[k] for r in ROWS]
                                      for k in ROWS[0]})
  return ['t.jsonl', 't.jsonl.gz', 't.jsonl.zip', 't.csv', 't.tsv.gz',
          't.parquet', 'hf']


def test_every_table_shape_reads_the_same_rows(tmp_path):
  for name in _write_all_shapes(tmp_path):
    rows = [row for _, row in tables.read_rows(str(tmp_path / name))]
    assert rows == ROWS, name


@pytest.mark.parametrize('name, data, message', [
    ('docs.jsonl', None, r'docs\.jsonl: expected \.jsonl text, but the file '
     r'is a Parquet file \(name it \.parquet\)'),
    ('docs.jsonl.gz', b'PK\x03\x04zipped', r'expected \.jsonl\.gz text, but '
     r'the file is a zip archive \(name it \.jsonl\.zip\)'),
    ('pairs.csv', b'\xff\xfe\x00b\x00a\x00d', r'pairs\.csv: expected UTF-8 '
     r'\.csv text'),
    ('docs.txt', b'{}', r"unknown table format '\.txt'; expected \.jsonl"),
    ('cc3m.jsonl', b'a caption\thttp://x\n', r'cc3m\.jsonl:1: not valid JSON'
     r'.*it has tabs: a TSV file'),
])
def test_a_file_not_in_its_extensions_shape_is_named(tmp_path, name, data,
                                                     message):
  path = str(tmp_path / name)
  if data is None:
    util.write_parquet(path, {'URL': ['http://x'], 'TEXT': ['t']})
  else:
    util.write(path, data)
  with pytest.raises(ValueError, match=message):
    list(tables.read_rows(path))
  assert os.path.exists(path)
