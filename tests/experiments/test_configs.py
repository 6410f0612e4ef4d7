"""The training configs: full sizes complete, ablations, flag overrides, the
paper's per-step sampling (a random 256-token M3W window, 8-frame clips).

Full-size configs are checked with `jax.eval_shape` only: the train state,
its shardings on the config's mesh and the optimizer come from the loop's
own builders, so a field the loop reads and the config lacks fails here.
The train step itself is traced on `flamingo.py:tiny`, whose non-model
sections are built by the same code as the full sizes'.
"""

import functools
import io
import math
import os

from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np
import pytest

from experiments import ablations
from experiments import flamingo as flamingo_config
from experiments import tiny
from flamingo_jax.data import pipeline
from flamingo_jax.models import flamingo
from flamingo_jax.orchestration.ablation import plan as ablation_plan
from flamingo_jax.training import loop
from flamingo_jax.training import optim
from flamingo_jax.training import sharding

EXPERIMENTS = os.path.join(os.path.dirname(__file__), '..', '..',
                           'experiments')
# What the pipeline reads of a dataset spec (`data_dir` is optional).
DATASET_KEYS = ('builder', 'split', 'kind', 'weight', 'batch_size', 'seq_len',
                'max_media', 'frames', 'image_size', 'p_next')
TRAINING_ABLATIONS = sorted(
    name for name, ablation in ablations.ABLATIONS.items()
    if ablation.train is not None)


def _abstract_mesh(config, data_parallel: int = 2):
  """The config's mesh axes at their sizes, 'data' (-1) = data_parallel."""
  fixed = math.prod(n for _, n in config.mesh if n != -1)
  names, sizes = sharding.mesh_shape(config.mesh, data_parallel * fixed)
  return jax.sharding.AbstractMesh(sizes, names)


def _abstract_batches(config):
  batches = {}
  for name, spec in config.data.datasets.items():
    b, l, n = spec.batch_size, spec.seq_len, spec.max_media
    shape = lambda *s, dtype: jax.ShapeDtypeStruct(s, dtype)
    batches[name] = dict(
        tokens=shape(b, l, dtype=jnp.int32),
        targets=shape(b, l, dtype=jnp.int32),
        loss_mask=shape(b, l, dtype=jnp.float32),
        media=shape(b, n, spec.frames, spec.image_size, spec.image_size, 3,
                    dtype=jnp.uint8),
        media_mask=shape(b, n, dtype=jnp.bool_),
        media_index=shape(b, l, dtype=jnp.int32))
  return batches


def _check_data_section(config):
  data = config.data
  assert data.data_dir and data.tokenizer and data.sizes
  assert data.vocab_size == config.model.lm.vocab_size
  for name, spec in config.data.datasets.items():
    missing = [key for key in DATASET_KEYS if key not in spec]
    assert not missing, (name, missing)
    assert spec.kind in pipeline.READERS, name
    assert spec.image_size == config.model.image_size, name
    assert spec.frames <= config.model.resampler.max_frames, name


@functools.cache
def _full_size(size: str):
  """(locked config, model, optimizer, abstract train state) of a size."""
  config = flamingo_config.get_config(size)
  config.lock()  # As config_flags hands it over: no field can appear.
  model = flamingo.transform(config.model)
  optimizer = loop.make_optimizer(config)
  return config, model, optimizer, loop.abstract_train_state(
      config, model, optimizer)


@pytest.mark.parametrize('size', ['3B', '9B', '80B'])
def test_full_size_config_is_complete(size):
  config, model, optimizer, abstract = _full_size(size)
  _check_data_section(config)
  mesh = _abstract_mesh(config)
  assert dict(mesh.shape)['model'] == flamingo_config.MODEL_PARALLEL[size]
  shardings = loop.state_shardings(abstract, config, mesh)
  loop._check_batch_sizes(config, mesh)  # pylint: disable=protected-access
  loop.make_step_fn(config, model, optimizer)
  assert jax.tree.structure(shardings) == jax.tree.structure(abstract)
  # The paper's frozen / trainable split, dtypes and optimizer values.
  assert set(abstract.trainable['lm']) == {'eoc_embedding',
                                           'eoc_unembedding'}
  assert all(m.startswith(('lm/', 'vision_encoder/')) for m in abstract.frozen)
  assert {x.dtype for x in jax.tree.leaves(abstract.frozen)} == {
      jnp.dtype(jnp.bfloat16)}
  assert {x.dtype for x in jax.tree.leaves(abstract.trainable)} == {
      jnp.dtype(jnp.float32)}
  assert config.compute_dtype == 'bfloat16' and config.zero_axis == 'data'
  o = config.optim
  assert (o.learning_rate, o.warmup_steps, o.schedule, o.clip_norm,
          o.weight_decay, o.dataset_updates) == (
              1e-4, 5000, 'constant', 1.0, 0.1, 'accumulate')
  decay = optim.weight_decay_mask(abstract.trainable, o.weight_decay_rules)
  assert not any(any(decay[m].values()) for m in decay
                 if m.startswith('perceiver_resampler'))
  assert decay['gated_xattn/block/ffw/hidden']['w']
  datasets = config.data.datasets
  assert {n: (s.weight, s.batch_size, s.seq_len) for n, s in
          datasets.items()} == {
              'm3w': (1.0, 256, 256), 'align': (0.2, 512, 32),
              'ltip': (0.2, 512, 32), 'vtp': (0.03, 64, 32)}
  assert (datasets.m3w.max_media, datasets.m3w.p_next, datasets.vtp.frames,
          datasets.vtp.fps, datasets.m3w.image_size) == (5, 0.5, 8, 1.0, 320)
  assert all(spec.data_dir == '' for spec in datasets.values())
  assert config.total_steps == 500_000 and config.checkpoint.every > 0


def test_train_step_traces_on_the_config():
  config = flamingo_config.get_config('tiny,round_robin')
  config.optim.microbatches = 2
  config.lock()
  model = flamingo.transform(config.model)
  optimizer = loop.make_optimizer(config)
  abstract = loop.abstract_train_state(config, model, optimizer)
  step = loop.make_step_fn(config, model, optimizer)
  state, metrics = jax.eval_shape(step, abstract, _abstract_batches(config))
  assert jax.tree.structure(state) == jax.tree.structure(abstract)
  assert {f'loss/{name}' for name in config.data.datasets} <= set(metrics)


@pytest.mark.parametrize('name', TRAINING_ABLATIONS)
def test_training_ablation_changes_what_it_says(name):
  base = flamingo_config.get_config('3B')
  config = flamingo_config.get_config(f'3B,{name}')
  assert config.model.to_dict() == dict(
      base.model.to_dict(),
      stop_vision_gradient=not name.startswith('vision_'))
  state = _full_size('3B')[-1]
  params = optim.merge(state.trainable, state.frozen)
  trainable, _ = optim.partition(params, config.freeze)
  trains = lambda top: any(m.startswith(top) for m in trainable)
  sources = [s['workdir'] for s in config.init_from]
  assert trains('lm/blocks') == name.startswith('lm_')
  assert trains('vision_encoder/') == name.startswith('vision_')
  assert (flamingo_config.PRETRAINED_LM in sources) == (
      name != 'lm_from_scratch')
  assert (len(sources) == 2) == (not name.endswith('from_scratch'))
  kinds = sorted(s.kind for s in config.data.datasets.values())
  assert kinds == {
      'no_video_pairs': ['documents', 'pairs', 'pairs'],
      'no_image_pairs': ['documents', 'video_pairs'],
      'laion_pairs': ['documents', 'pairs', 'video_pairs'],
      'no_m3w': ['pairs', 'pairs', 'video_pairs'],
      'lm_cotrain_text': ['documents', 'pairs', 'pairs', 'text',
                          'video_pairs'],
  }.get(name, ['documents', 'pairs', 'pairs', 'video_pairs'])
  assert config.optim.dataset_updates == (
      'round_robin' if name == 'round_robin' else 'accumulate')
  assert config.data.datasets.get('m3w', {}).get('p_next', 0.5) == {
      'p_next_0': 0.0, 'p_next_1': 1.0}.get(name, 0.5)


@pytest.mark.parametrize('arg,message', [
    ('3B,no_image_pairs,laion_pairs', 'no such dataset'),
    ('3B,no_m3w,no_image_pairs,no_video_pairs', 'leaves no dataset'),
    ('3B,bogus', "Unknown config arg.*'bogus'"),
])
def test_impossible_ablations_are_named(arg, message):
  with pytest.raises(ValueError, match=message):
    flamingo_config.get_config(arg)


@functools.cache
def _tiny_abstract_params():
  return flamingo.abstract_params(tiny.get_config('smoke').model)


@pytest.mark.parametrize('name', sorted(ablations.ABLATIONS))
def test_tiny_recipe_takes_every_ablation(name):
  config = tiny.get_config(f'smoke,{name}')
  assert config.ablations == name
  _check_data_section(config)
  if ablations.ABLATIONS[name].train is not None:
    optim.partition(_tiny_abstract_params(), config.freeze)  # Covers all.
  # Every init_from source is a stage of the recipe.
  assert {s['workdir'] for s in config.init_from} == set(config.stages)
  dropped = {'lm_from_scratch': 'lm', 'vision_from_scratch': 'vision'}
  assert set(config.stages) == {'lm', 'vision'} - {dropped.get(name)}


def test_tiny_icl_variant_adds_what_it_says():
  default, icl = tiny.get_config('default'), tiny.get_config('icl')
  _check_data_section(icl)
  assert set(icl.data.datasets) == set(default.data.datasets) | {'episodes'}
  episodes = icl.data.datasets.episodes
  assert (episodes.builder, episodes.kind, episodes.p_next) == (
      'world_episodes', 'documents', 0.0)  # The evaluation's layout.
  assert episodes.max_media >= 9  # 8 shots and the query.
  assert set(icl.stages.lm.data.datasets) == {'text', 'episode_text'}
  assert icl.probe.every % icl.log_every == 0
  # The LM stage logs the text probe (an 'lm' task), as often, on rows
  # that fit its text's length.
  lm = icl.stages.lm
  assert lm.task == 'lm' and lm.probe.every == icl.probe.every
  assert lm.probe.seq_len <= lm.data.datasets.episode_text.seq_len
  assert lm.total_steps == tiny.ICL_LM_STEPS  # Where its binding appeared.
  # The vision stage learns shape too: more pairs a batch, more steps.
  vision = icl.stages.vision
  assert vision.data.datasets.pairs.batch_size == tiny.ICL_VISION_BATCH
  assert vision.total_steps == tiny.ICL_VISION_STEPS > (
      default.stages.vision.total_steps)
  assert list(icl.eval.shots) == [0, 2, 4, 8]
  assert icl.eval.num_queries >= 256
  # Its model: the tied LM and the wider resampler, nothing else. The
  # resampler trains in the Flamingo stage, so no stage has to match it.
  assert ablation_plan.config_diff(default.model, icl.model) == [
      'lm.tied_embeddings', 'resampler.num_heads', 'resampler.width']
  assert not any(rule['include'][0].startswith('perceiver_resampler')
                 for rule in icl.init_from)
  # A resampler ablation still changes what it names, and only that.
  assert tiny.get_config('icl,resampler_mlp').model.resampler.width == (
      tiny.ICL_RESAMPLER['width'])
  assert ablation_plan.config_diff(
      icl.model, tiny.get_config('icl,resampler_large').model) == [
          'resampler.num_layers']
  # The default recipe is unchanged.
  assert 'probe' not in default and 'probe' not in default.stages.lm
  assert default.total_steps == 800 and default.stages.lm.total_steps == 1500
  # Ablations follow the variant.
  assert tiny.get_config('icl,lm_unfrozen').data.datasets.episodes


@pytest.mark.parametrize('variant', ['default', 'icl'])
def test_tiny_resampler_sizes_change_its_depth_only(variant):
  """Small < the tiny resampler < Large in depth, as 2 < 6 < 12 layers."""
  base = tiny.get_config(variant).model
  depth = {}
  for row in ('resampler_small', 'resampler_large'):
    model = tiny.get_config(f'{variant},{row}').model
    assert ablation_plan.config_diff(base, model) == ['resampler.num_layers']
    depth[row] = model.resampler.num_layers
  assert depth['resampler_small'] < base.resampler.num_layers < (
      depth['resampler_large'])


def test_tiny_vit_standin_matches_its_pretraining_stage():
  config = tiny.get_config('smoke,vision_clip_vit_l14')
  assert config.model.vision.encoder == 'vit'
  main = flamingo.abstract_params(config.model)
  stage = config.stages.vision
  pretrained = loop.task_of(stage).transform(stage.model)
  stage_params = jax.eval_shape(
      pretrained.init, jax.random.PRNGKey(0),
      *loop.task_of(stage).example_inputs(stage.model))
  vision = lambda params: {m: jax.tree.map(lambda x: x.shape, v)
                           for m, v in params.items()
                           if m.startswith('vision_encoder/')}
  assert vision(main) and vision(main) == vision(stage_params)


@pytest.mark.filterwarnings('ignore:the load_module:DeprecationWarning')
@pytest.mark.parametrize('path,overrides,expected', [
    ('flamingo.py:3B,no_video_pairs',
     ['--config.data.datasets.m3w.weight=0.5',
      '--config.data.datasets.align.batch_size=128',
      '--config.optim.dataset_updates=round_robin'],
     {'m3w': (0.5, 256), 'align': (0.2, 128), 'ltip': (0.2, 512)}),
    ('tiny.py:smoke,p_next_0',
     ['--config.data.datasets.pairs.weight=0.1',
      '--config.data.datasets.documents.batch_size=2'],
     {'documents': (1.0, 2), 'pairs': (0.1, 8), 'video_pairs': (0.03, 4)}),
])
def test_weights_and_batch_sizes_from_flags(path, overrides, expected):
  argv = ['prog', f'--config={os.path.join(EXPERIMENTS, path)}', *overrides]
  values = flags.FlagValues()
  holder = config_flags.DEFINE_config_file(
      'config', None, 'Config.', flag_values=values, lock_config=True,
      sys_argv=argv)  # As flamingo_jax.train defines it.
  values(argv)
  datasets = holder.value.data.datasets
  assert {n: (s.weight, s.batch_size) for n, s in datasets.items()} == (
      expected)
  assert isinstance(datasets[next(iter(expected))].weight, float)


@functools.cache
def _paper_loaders(size: str):
  """ExampleLoaders on each paper dataset spec of `size` (images 8x8)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from tests.data import test_tokenizer  # pylint: disable=g-import-not-at-top
  config = flamingo_config.get_config(size)
  tokenizer = test_tokenizer.train_tiny_tokenizer()

  def png(value):
    out = io.BytesIO()
    Image.fromarray(np.full([8, 8, 3], value, np.uint8)).save(out, 'PNG')
    return out.getvalue()

  # A page of 60 images and ~1000 tokens: longer than the 256-token window.
  texts, images = [], []
  for i in range(60):
    texts += ['', f' Part {i}: a red circle is next to a blue square.']
    images += [i, -1]
  document = {'chunks': {'text': texts, 'image': images},
              'images': [png(i) for i in range(60)]}
  video = {'video': [png(3 * i) for i in range(40)],  # 40 s at 1 FPS.
           'caption': b'a red circle moves'}
  loaders = {}
  for name, spec in config.data.datasets.items():
    if spec.kind not in ('documents', 'video_pairs'):
      continue
    spec = ml_collections.ConfigDict(dict(spec.to_dict(), name=name,
                                          image_size=8))
    source = [document if spec.kind == 'documents' else video]
    loaders[name] = lambda seed, s=source, sp=spec: pipeline.ExampleLoader(
        s, sp, tokenizer, seed=seed, dataset_index=0)
  return config, loaders


@pytest.mark.parametrize('size', ['3B', '9B', '80B'])
def test_paper_configs_sample_a_window_and_a_clip_per_step(size):
  """App. A.3: M3W a random 256-token window, VTP 8 frames at 1 FPS, per step.

  The paper config's own dataset specs (images shrunk to 8x8) on one long page
  and one 40-frame video: each step reads another part of it, a resumed
  loader reads the same part.
  """
  config, loaders = _paper_loaders(size)
  m3w, vtp = config.data.datasets.m3w, config.data.datasets.vtp
  assert (m3w.kind, m3w.seq_len, m3w.random_window) == ('documents', 256, True)
  assert (vtp.kind, vtp.frames, vtp.fps, vtp.random_clip) == (
      'video_pairs', 8, 1.0, True)
  assert set(loaders) == {'m3w', 'vtp'}
  # One example: position g is step g's read of it.
  m3w_rows = [loaders['m3w'](0)(g)['tokens'] for g in range(6)]
  assert len({row.tobytes() for row in m3w_rows}) == 6
  np.testing.assert_array_equal(loaders['m3w'](0)(4)['tokens'], m3w_rows[4])
  starts = []
  for g in range(6):
    clip = loaders['vtp'](0)(g)['media'][0, :, 0, 0, 0].astype(int)  # [8]
    np.testing.assert_array_equal(np.diff(clip), 3)  # 8 frames in a row.
    starts.append(clip[0])
  assert len(set(starts)) > 3
  assert loaders['vtp'](0)(3)['media'][0, 0, 0, 0, 0] == starts[3]


@pytest.mark.parametrize('name', TRAINING_ABLATIONS)
def test_training_ablations_keep_the_papers_sampling(name):
  config = flamingo_config.get_config(f'3B,{name}')
  for spec in config.data.datasets.values():
    if spec.kind == 'documents':
      assert spec.random_window and spec.seq_len == 256, name
    if spec.kind == 'video_pairs':
      assert spec.random_clip and spec.frames == 8, name
