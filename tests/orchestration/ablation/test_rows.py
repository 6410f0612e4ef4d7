"""Every ablation row changes exactly the config keys it says (3B configs)."""

import functools

import pytest

from experiments import ablations
from experiments import flamingo as flamingo_config
from flamingo_jax.orchestration.ablation import plan

_VISION = ('model.vision.encoder', 'model.vision.variant',
           'model.vision.image_size', 'model.image_size', 'init_from',
           'data.datasets.m3w.image_size', 'data.datasets.align.image_size',
           'data.datasets.ltip.image_size', 'data.datasets.vtp.image_size')
# row -> the config keys (dotted) it changes against the 3B baseline.
EXPECTED = {
    'no_video_pairs': ['data.datasets.vtp'],
    'no_image_pairs': ['data.datasets.align', 'data.datasets.ltip'],
    'laion_pairs': ['data.datasets.align', 'data.datasets.laion',
                    'data.datasets.ltip'],
    'no_m3w': ['data.datasets.m3w'],
    'round_robin': ['optim.dataset_updates'],
    'no_tanh_gating': ['model.xattn.gating'],
    'vanilla_xattn': ['model.xattn.xattn_type'],
    'grafting': ['model.xattn.xattn_type'],
    'xattn_single_in_middle': ['model.xattn.placement'],
    'xattn_every_4': ['model.xattn.every'],
    'xattn_every_2': ['model.xattn.every'],
    'resampler_mlp': ['model.resampler.resampler_type'],
    'resampler_transformer': ['model.resampler.resampler_type'],
    'vision_clip_vit_l14': list(_VISION),
    'vision_nfnet_f0': ['init_from', 'model.vision.variant'],
    'lm_unfrozen': ['freeze'],
    'lm_from_scratch': ['freeze', 'init_from'],
    'resampler_small': ['model.resampler.num_layers'],
    'resampler_large': ['model.resampler.num_layers'],
    'all_previous_images': ['model.xattn.attend'],
    'p_next_0': ['data.datasets.m3w.p_next'],
    'p_next_1': ['data.datasets.m3w.p_next'],
    'vision_unfrozen': ['freeze', 'model.stop_vision_gradient'],
    'vision_from_scratch': ['freeze', 'init_from',
                            'model.stop_vision_gradient'],
    'lm_cotrain_text': ['data.datasets.massivetext', 'freeze',
                        'optim.lr_multipliers'],
    'resampler_kv96': ['model.resampler.head_size'],
    'xattn_heads_32': ['model.xattn.num_heads'],
}


@functools.cache
def _config(arg):
  return flamingo_config.get_config(arg)


def test_every_row_has_an_expected_diff():
  assert set(EXPECTED) == set(ablations.ABLATIONS)


@pytest.mark.parametrize('name', sorted(EXPECTED))
def test_row_changes_exactly_its_keys(name):
  diff = plan.config_diff(_config('3B'), _config(f'3B,{name}'))
  assert diff == sorted(EXPECTED[name])


def test_changed_values_are_the_papers():
  """The values behind the keys, where the paper gives them."""
  base = _config('3B')
  cotrain = _config('3B,lm_cotrain_text')
  assert cotrain.data.datasets.massivetext.seq_len == 2048  # v1 §4.4.3.
  assert [tuple(r) for r in cotrain.optim.lr_multipliers] == list(
      ablations.COTRAIN_LM_MULTIPLIERS)
  assert dict(ablations.COTRAIN_LM_MULTIPLIERS)['lm/.*'] == 0.1
  assert _config('3B,vanilla_xattn').model.xattn.gating == 'tanh'
  assert _config('3B,p_next_1').data.datasets.m3w.p_next == 1.0
  assert base.model.resampler.num_layers == 6  # Medium, Table 4.
  assert (_config('3B,resampler_small').model.resampler.num_layers,
          _config('3B,resampler_large').model.resampler.num_layers) == (2, 12)
  assert _config('9B').model.xattn.num_heads == 16  # Table 5's count.


def test_labels_and_paper_figures():
  rows = ablations.ABLATIONS
  for name, ablation in rows.items():
    table = ablation.row.split(' (')[0]
    assert table in ('Table 3', 'Table 10') or ablation.row.startswith(
        'Choice'), (name, ablation.row)
    assert (ablation.paper is None) == ablation.row.startswith('Choice'), name
  assert rows['lm_cotrain_text'].row.startswith('Table 10 (vi)')
  assert rows['vision_unfrozen'].row.startswith('Table 10 (v)')
  assert rows['vision_from_scratch'].row.startswith('Table 10 (v)')
  assert rows['p_next_1'].row.startswith('Table 10 (iii)')
  assert rows['grafting'].paper.params == 3.3
  assert [rows[n].paper.params for n in ('resampler_small',
                                         'resampler_large')] == [3.1, 3.4]
  assert ablations.PAPER_BASELINE.overall == 70.7


def test_row_names_expand_and_bad_ones_are_named():
  table3 = plan.expand_rows(['table3'])
  assert len(table3) == 17 and 'vanilla_xattn' in table3
  table10 = plan.expand_rows(['table10'])
  assert set(table10) == {
      'resampler_small', 'resampler_large', 'all_previous_images',
      'p_next_0', 'p_next_1', 'vision_unfrozen', 'vision_from_scratch',
      'lm_cotrain_text'}
  assert plan.expand_rows(['no_m3w', 'laion_pairs+vision_clip_vit_l14',
                           'no_m3w']) == ['no_m3w',
                                          'laion_pairs+vision_clip_vit_l14']
  with pytest.raises(ValueError, match="'bogus'.*'no_m3w\\+nope'"):
    plan.expand_rows(['bogus', 'no_m3w+nope'])
  assert plan.config_arg('experiments/tiny.py:smoke', 'a+b') == (
      'experiments/tiny.py:smoke,a,b')
  assert plan.config_arg('experiments/tiny.py', 'a') == 'experiments/tiny.py:a'
