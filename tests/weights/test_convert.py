"""The convert CLI: --help, a workdir that init_from takes, nothing half."""

import json
import os
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flamingo_jax import checkpoint as checkpoint_lib
from flamingo_jax import checkpoint_parts
from flamingo_jax.training import init_from
from flamingo_jax.training import train_step
from flamingo_jax.weights import convert
from flamingo_jax.weights import hf_clip
from flamingo_jax.weights import safetensors_file
from tests.weights import fixtures


def test_help_lists_every_source(capsys):
  with pytest.raises(SystemExit) as exit_info:
    convert.main(['--help'])
  assert exit_info.value.code == 0
  out = capsys.readouterr().out
  for kind in ('hf_clip', 'open_clip', 'nfnet_npz', 'timm_nfnet', 'hf_llama',
               'hf_gpt_neox', 'hf_mpt', 'hf_mosaic_gpt', 'hf_gpt2',
               'open_flamingo'):
    assert kind in out
  with pytest.raises(SystemExit):
    convert.main(['open_clip', '--help'])
  out = capsys.readouterr().out
  assert '--activation' in out and '--tokens' in out and '--workdir' in out


def test_list_prints_the_tensors(capsys):
  assert convert.main(['hf_clip', fixtures.path('hf_clip'), '--list']) == 0
  out = capsys.readouterr().out
  assert 'vision_model.embeddings.patch_embedding.weight\t[16, 3, 4, 4]' in out


@pytest.fixture(name='workdir', scope='module')
def _workdir(tmp_path_factory) -> str:
  workdir = str(tmp_path_factory.mktemp('convert') / 'clip')
  code = convert.main(['hf_clip', fixtures.path('hf_clip'), '--workdir',
                       workdir, '--tokens=last_block', '--step=7'])
  assert code == 0
  return workdir


def test_workdir_layout(workdir):
  with open(os.path.join(workdir, 'config.json')) as f:
    config = json.load(f)
  assert config['task'] == 'import'
  assert config['model']['vision']['tokens'] == 'last_block'
  assert config['weights']['source'] == 'hf_clip'
  assert checkpoint_lib.saved_steps(workdir) == [7]
  assert not [n for n in os.listdir(os.path.dirname(workdir))
              if 'partial' in n]


def test_workdir_holds_the_imported_parameters(workdir):
  store = hf_clip.read(fixtures.path('hf_clip'))
  config = hf_clip.config_from(fixtures.path('hf_clip'), store,
                               tokens='last_block')
  expected = hf_clip.to_params(store, config)
  loaded = checkpoint_lib.load_params(workdir)
  assert jax.tree.structure(loaded) == jax.tree.structure(expected)
  jax.tree.map(np.testing.assert_array_equal, loaded, expected)


def test_workdir_initialises_a_run(workdir):
  """training.loop's init_from takes the workdir as it is."""
  loaded = checkpoint_lib.load_params(workdir)
  frozen = jax.tree.map(jnp.zeros_like, loaded)
  frozen['lm'] = {'w': jnp.ones(3)}  # A part the import does not touch.
  state = train_step.new_state(step=jnp.zeros([], jnp.int32), trainable={},
                               frozen=frozen, opt_state=None, rng=None)
  config = {'init_from': [{'workdir': workdir,
                           'include': ['vision_encoder/.*']}]}
  state = init_from.apply(state, config, '/unused')
  jax.tree.map(np.testing.assert_array_equal,
               {k: v for k, v in state.frozen.items() if k != 'lm'}, loaded)
  np.testing.assert_array_equal(state.frozen['lm']['w'], np.ones(3))


def test_bfloat16_output(tmp_path):
  workdir = str(tmp_path / 'bf16')
  assert convert.main(['open_clip', fixtures.path('open_clip'), '--workdir',
                       workdir, '--dtype=bfloat16']) == 0
  leaves = jax.tree.leaves(checkpoint_lib.load_params(workdir))
  assert {str(x.dtype) for x in leaves} == {'bfloat16'}


def test_mismatch_writes_nothing(tmp_path, capsys):
  directory = tmp_path / 'broken'
  directory.mkdir()
  store = hf_clip.read(fixtures.path('hf_clip'))
  arrays = {n: np.asarray(store[n]) for n in store
            if not n.endswith('layer_norm2.weight')}
  safetensors_file.write(str(directory / 'model.safetensors'), arrays)
  os.symlink(fixtures.path('hf_clip', 'config.json'),
             directory / 'config.json')
  workdir = tmp_path / 'out'
  assert convert.main(['hf_clip', str(directory), '--workdir',
                       str(workdir)]) == 1
  err = capsys.readouterr().err
  assert 'ln_2/scale (3, 16): no tensor fills it' in err
  assert sorted(os.listdir(tmp_path)) == ['broken']


def test_existing_workdir_needs_overwrite(workdir, capsys):
  assert convert.main(['hf_clip', fixtures.path('hf_clip'), '--workdir',
                       workdir]) == 1
  assert '--overwrite' in capsys.readouterr().err


def test_workdir_with_a_tokenizer(tmp_path):
  """A source with a tokenizer: saved beside, named by config.data."""
  tokenizers = pytest.importorskip('tokenizers')
  # pylint: disable-next=g-import-not-at-top
  from flamingo_jax.data import hf_tokenizer
  bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
  bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(
      add_prefix_space=False)
  bpe.train_from_iterator(['a red cube', 'two blue balls'] * 5,
                          tokenizers.trainers.BpeTrainer(
                              vocab_size=260, special_tokens=['<s>', '</s>']))
  bpe.save(str(tmp_path / 'tokenizer.json'))
  tok = hf_tokenizer.from_hf(str(tmp_path / 'tokenizer.json'), bos='<s>',
                             eos='</s>')
  params = {'vision_encoder': {'w': np.ones(2, np.float32)}}
  workdir = convert.write_workdir(
      convert.Converted(model={}, params=params, tokenizer=tok),
      str(tmp_path / 'w'), kind='test', dtype='float32')
  with open(os.path.join(workdir, 'config.json')) as f:
    path = json.load(f)['data']['tokenizer']
  loaded = convert.tokenizer_lib.Tokenizer.load(path)
  prompt = '<image>a red cube<EOC>'
  assert loaded.encode(prompt) == tok.encode(prompt)
  # The markers come after the vocabulary: <|endofchunk|>, <image>, <PAD>.
  assert loaded.eoc_id == tok.eoc_id == tok.vocab_size - 3


def test_lm_workdir(tmp_path):
  """An LM import: model.lm in config.json, lm/... in the checkpoint."""
  # pylint: disable-next=g-import-not-at-top
  from flamingo_jax.weights import hf_gpt_neox
  source = fixtures.path('hf_gpt_neox')
  workdir = str(tmp_path / 'neox')
  assert convert.main(['hf_gpt_neox', source, '--workdir', workdir,
                       '--dtype=bfloat16']) == 0
  with open(os.path.join(workdir, 'config.json')) as f:
    config = json.load(f)
  store = hf_gpt_neox.read(source)
  expected_config = hf_gpt_neox.config_from(source, store)
  assert config['model'] == {'lm': expected_config}
  assert 'data' not in config  # The fixture has no tokenizer.json.
  expected = hf_gpt_neox.to_params(store, expected_config,
                                   dtype=convert.DTYPES['bfloat16'])
  loaded = checkpoint_lib.load_params(workdir)
  assert jax.tree.structure(loaded) == jax.tree.structure(expected)
  jax.tree.map(np.testing.assert_array_equal, loaded, expected)


def test_parameters_are_filled_and_written_part_by_part(monkeypatch,
                                                        tmp_path):
  """An LM conversion never holds the whole model: its parameters are
  mapping.LazyArrays, each filled only when its part is made; with parts
  of one array, each partial save holds one array and no more arrays have
  been filled than written. The step reads back (checksums verified) as
  the eager mapping's parameters."""
  from orbax.checkpoint.experimental.v1 import partial  # pylint: disable=g-import-not-at-top
  from flamingo_jax.weights import hf_mosaic_gpt  # pylint: disable=g-import-not-at-top
  from flamingo_jax.weights import mapping  # pylint: disable=g-import-not-at-top
  path = fixtures.path('hf_mosaic_gpt')
  converted = convert.convert('hf_mosaic_gpt', path, no_tokenizer=True)
  lazy = [x for x in jax.tree.leaves(converted.params)
          if isinstance(x, mapping.LazyArray)]
  assert len(lazy) > 10
  expected = hf_mosaic_gpt.to_params(hf_mosaic_gpt.read(path),
                                     converted.model['lm'])
  filled, seen = [], []
  materialize, save = mapping.LazyArray.materialize, partial.save

  def counting_materialize(self):
    filled.append(self)
    return materialize(self)

  def recording_save(directory, part):
    seen.append((len(jax.tree.leaves(part.get('frozen', {}))),
                 len(filled)))
    save(directory, part)

  monkeypatch.setattr(mapping.LazyArray, 'materialize', counting_materialize)
  monkeypatch.setattr(partial, 'save', recording_save)
  monkeypatch.setattr(convert, 'PART_BYTES', 1)
  workdir = convert.write_workdir(converted, str(tmp_path / 'w'),
                                  kind='hf_mosaic_gpt', dtype='float32')
  assert seen[0] == (0, 0)  # The step first.
  assert all(n == 1 for n, _ in seen[1:])
  assert all(count <= k for k, (_, count) in enumerate(seen[1:], 1))
  assert len(filled) == len(lazy)
  loaded = checkpoint_lib.load_params(workdir)
  jax.tree.map(np.testing.assert_array_equal, loaded, expected)


class _Tracked(np.ndarray):
  """A host array that can be watched (numpy's own can't be weakly held)."""


def test_orbax_is_handed_each_part_on_the_device_alone(monkeypatch,
                                                       tmp_path):
  """save_in_parts gives orbax device arrays in place of the part's host
  arrays, which are freed before orbax copies the part for writing (one
  copy in memory, not two), even while the maker of the parts (a suspended
  generator) still holds the part's dict; the step reads back equal."""
  from orbax.checkpoint.experimental.v1 import partial  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  values = {f'm{i}': {'w': rng.normal(size=(64, 8)).astype(np.float32)}
            for i in range(3)}
  host, seen = [], []

  def parts():
    yield {'step': np.asarray(0, np.int32), 'trainable': {}}
    for module, leaves in values.items():
      part = {module: {'w': leaves['w'].copy().view(_Tracked)}}
      host.append(weakref.ref(part[module]['w']))
      yield {'frozen': part}  # `part` stays referenced here meanwhile.

  def recording_save(directory, part):
    seen.append((all(isinstance(x, jax.Array)
                     for x in jax.tree.leaves(part) if np.ndim(x)),
                 [ref() is None for ref in host]))
    save(directory, part)

  save = partial.save
  monkeypatch.setattr(partial, 'save', recording_save)
  checkpoint_parts.save_in_parts(str(tmp_path / 'c'), 0, parts(),
                               {'next_step': 0})
  assert [on_device for on_device, _ in seen] == [True] * 4
  assert all(all(freed) for _, freed in seen[1:])
  loaded = checkpoint_lib.load_params(str(tmp_path / 'c'))
  jax.tree.map(np.testing.assert_array_equal, loaded,
               jax.tree.map(np.asarray, values))
