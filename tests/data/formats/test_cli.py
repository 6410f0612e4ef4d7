"""The entry points: make_builder, build, load_builder and the CLI."""

from absl import flags
from absl.testing import flagsaver
import pytest
import tensorflow_datasets as tfds

from flamingo_jax.data import formats
from flamingo_jax.data.formats import __main__ as cli
from tests.data.formats import util


@pytest.fixture
def table(tmp_path):
  util.write(tmp_path / 'src' / 'a.png', util.encode(util.image(0)))
  return util.write(tmp_path / 'src' / 'pairs.jsonl',
                    '{"image": "a.png", "caption": "A thing."}\n')


def test_cli_builds_with_a_progress_line(table, tmp_path, capsys):
  flags.FLAGS.unparse_flags()
  argv = ['formats', '--format', 'table_pairs', '--source', table,
          '--data_dir', str(tmp_path / 'out'), '--name', 'mine',
          '--option', 'max_image_size=8', '--num_workers', '1']
  with flagsaver.flagsaver():
    flags.FLAGS(argv)
    cli.main(['formats'])
  out = capsys.readouterr().out
  assert 'table_pairs/mine train: 1 examples (0 s)' in out
  assert "Read it as builder='table_pairs/mine'" in out
  # Readers need no source: the prepared files say everything.
  for builder in (formats.load_builder('table_pairs/mine', tmp_path / 'out'),
                  tfds.builder('table_pairs/mine', data_dir=tmp_path / 'out')):
    (example,) = builder.as_data_source(split='train')
    assert example['image'].shape == (5, 8, 3)  # 16x24, shrunk.
  with flagsaver.flagsaver():  # A rerun reuses it.
    flags.FLAGS(argv)
    cli.main(['formats'])
  assert 'is already prepared' in capsys.readouterr().out


def test_parse_source_and_options():
  assert cli.parse_source(['gs://b/x-{0..9}.tar']) == 'gs://b/x-{0..9}.tar'
  assert cli.parse_source(['train=/a', 'validation=gs://b']) == {
      'train': '/a', 'validation': 'gs://b'}
  assert cli.parse_options(['max_images=16', 'image_dir=/d', 'x=null',
                            'splits={"query": "val"}']) == {
                                'max_images': 16, 'image_dir': '/d',
                                'x': None, 'splits': {'query': 'val'}}


def test_make_builder_errors(table, tmp_path):
  with pytest.raises(ValueError, match="Unknown format 'parquet'"):
    formats.make_builder('parquet', table, tmp_path)
  with pytest.raises(ValueError, match=r"Unknown options \['max_imgs'\] for "
                     "format 'interleaved_jsonl'.*'max_images'"):
    formats.make_builder('interleaved_jsonl', table, tmp_path, max_imgs=3)
  with pytest.raises(ValueError, match="on_error must be one of"):
    formats.make_builder('table_pairs', table, tmp_path, on_error='ignore')
  with pytest.raises(FileNotFoundError, match=r'--format table_pairs --source '
                     r'PATH --data_dir .* --name nope'):
    formats.load_builder('table_pairs/nope', tmp_path)
  util.build('table_pairs', table, tmp_path, name='t')
  with pytest.raises(ValueError, match=r'was built with options .*'
                     r"'max_image_size': None.*not .*'max_image_size': 8"):
    formats.make_builder('table_pairs', table, tmp_path, name='t',
                         max_image_size=8)


def test_interleaved_is_an_alias_of_interleaved_jsonl(tmp_path):
  assert 'interleaved' in formats.format_names()
  assert formats.builder_class('interleaved') is formats.FORMATS[
      'interleaved_jsonl']
  util.write(tmp_path / 'src' / 'a.png', util.encode(util.image(0)))
  util.write(tmp_path / 'src' / 'docs.jsonl',
             '{"texts": ["A thing.", null], "images": [null, "a.png"]}\n')
  builder, stats = util.build('interleaved', tmp_path / 'src',
                              tmp_path / 'out', name='docs')
  assert stats == {'train': {'examples': 1}}
  # Stored under the format's own name; read back by either name.
  assert (tmp_path / 'out' / 'interleaved_jsonl' / 'docs').is_dir()
  assert not (tmp_path / 'out' / 'interleaved').exists()
  for name in ('interleaved/docs', 'interleaved_jsonl/docs'):
    (doc,) = formats.open_source(name, tmp_path / 'out', 'train')
    assert list(doc['chunks']['image']) == [-1, 0]
  assert builder.info.name == 'interleaved_jsonl'


def test_default_names_differ_by_options(table):
  first = formats.default_name(table, {})
  assert first.startswith('pairs_') and len(first) == len('pairs_') + 8
  assert formats.default_name(table, {'max_image_size': 8}) != first
