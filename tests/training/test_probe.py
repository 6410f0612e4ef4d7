"""The binding probe: its episodes, its scores, and 0 for a blind model."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flamingo_jax import checkpoint
from flamingo_jax.data import tokenizer as tokenizer_lib
from flamingo_jax.data.world import probe as probe_data
from flamingo_jax.models import flamingo
from flamingo_jax.models import precision
from flamingo_jax.training import probe

EPISODES, WAYS, SHOTS = 2, 3, 2


def _config_and_tokenizer(workdir):
  config = json.loads((workdir / 'config.json').read_text())
  return config, tokenizer_lib.Tokenizer.load(config['data']['tokenizer'])


@pytest.fixture(scope='module')
def setup(smoke_workdir):
  config, tokenizer = _config_and_tokenizer(smoke_workdir)
  batch = probe_data.probe_batch(
      tokenizer, num_episodes=EPISODES, ways=WAYS, shots=SHOTS,
      image_size=config['model']['image_size'], seq_len=128)
  model = precision.with_compute_dtype(flamingo.transform(config['model']),
                                      jnp.float32)
  params = checkpoint.load_params(str(smoke_workdir))
  run = probe.make_probe_fn(model.apply, {probe.BINDING: batch})
  return tokenizer, batch, run, params


def _with_gates(params, value):
  return jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.full_like(x, value) if jax.tree_util.keystr(
          path).endswith("_gate']") else x, params)


def test_probe_rows_share_their_support_and_score_the_word(setup):
  tokenizer, batch, _, _ = setup
  rows = EPISODES * WAYS * WAYS
  num_media = WAYS * SHOTS + 1
  assert batch['tokens'].shape == batch['score_mask'].shape == (rows, 128)
  assert batch['media'].shape == (rows, num_media, 1, 64, 64, 3)
  assert batch['media_mask'].all()
  media = batch['media'].reshape(EPISODES, WAYS, WAYS, num_media, -1)
  tokens = batch['tokens'].reshape(EPISODES, WAYS, WAYS, -1)
  for e in range(EPISODES):
    # One support per episode; a query's picture is the same for every
    # candidate and differs between queries.
    assert (media[e, :, :, :-1] == media[e, 0, 0, :-1]).all()
    for q in range(WAYS):
      assert (media[e, q, :, -1] == media[e, q, 0, -1]).all()
      # The text does not depend on the query: only the candidate moves it.
      assert (tokens[e, q] == tokens[e, 0]).all()
    assert (media[e, 0, 0, -1] != media[e, 1, 0, -1]).any()
  # The scored targets are the candidate word, the rest of its line, <EOC>.
  for row in range(WAYS):
    scored = batch['targets'][row][batch['score_mask'][row] > 0]
    assert scored[-1] == tokenizer.eoc_id
    text = tokenizer.decode([int(t) for t in scored[:-1]])
    assert text.strip().rstrip('.!') and text.strip()[-1] in '.!'
  words = {tokenizer.decode([int(t) for t in batch['targets'][r][
      batch['score_mask'][r] > 0][:-1]]) for r in range(WAYS)}
  assert len(words) == WAYS


def test_blind_model_has_zero_margin(setup):
  """Cross-attention zeroed (tanh gates 0): the pictures cannot matter."""
  _, _, run, params = setup
  blind = run(_with_gates(params, 0.0))
  assert abs(blind['probe/binding_margin']) < 1e-4
  seeing = run(params)  # The smoke checkpoint's gates are open.
  assert abs(seeing['probe/binding_margin']) > 1e-3


def test_binding_scores_hand_computed():
  # One episode, 3 ways; log p of each row's continuation, put in one
  # token's logits: row (q, c) scores lp[q, c].
  lp = np.array([[-1.0, -3.0, -2.0],
                 [-2.0, -1.5, -1.0],
                 [-4.0, -4.0, -1.0]])
  logits = np.full((9, 2, 2), -1e9, np.float32)
  logits[:, 0, 0] = lp.reshape(-1)  # log_softmax of [lp, -inf] is lp ...
  logits[:, 0, 1] = np.log1p(-np.exp(lp.reshape(-1)))  # ... with the rest.
  targets = np.zeros((9, 2), np.int32)
  mask = np.zeros((9, 2), np.float32)
  mask[:, 0] = 1.0
  out = probe.binding_scores(jnp.asarray(logits), jnp.asarray(targets),
                             jnp.asarray(mask), 3)
  margins = [-1.0 - (-2.5), -1.5 - (-1.5), -1.0 - (-4.0)]
  assert float(out['probe/binding_margin']) == pytest.approx(
      np.mean(margins), abs=1e-5)
  assert float(out['probe/binding_accuracy']) == pytest.approx(2 / 3)
  with pytest.raises(ValueError, match='multiple of'):
    probe.binding_scores(jnp.zeros((4, 2, 2)), jnp.zeros((4, 2), jnp.int32),
                         jnp.zeros((4, 2)), 3)


def test_bad_probe_arguments_raise(setup):
  tokenizer = setup[0]
  with pytest.raises(ValueError, match='ways >= 2'):
    probe_data.probe_batch(tokenizer, ways=1)
  with pytest.raises(ValueError, match='raise it'):
    probe_data.probe_batch(tokenizer, num_episodes=1, seq_len=24)


def test_probe_is_plotted_and_linked_from_the_report(tmp_path):
  # pylint: disable=g-import-not-at-top
  from flamingo_jax.orchestration import plots
  from flamingo_jax.orchestration import report
  # pylint: enable=g-import-not-at-top
  rows = [{'step': 0, 'probe/binding_margin': 0.0,
           'probe/binding_accuracy': 1 / 3},
          {'step': 10, 'loss': 2.0},
          {'step': 10, 'probe/binding_margin': 0.5,
           'probe/binding_accuracy': 0.5, 'probe/keyed_margin': 9.0,
           'probe/keyed_accuracy': 1.0}]
  (tmp_path / 'metrics.jsonl').write_text(
      ''.join(json.dumps(r) + '\n' for r in rows))
  paths = plots.write_plots(str(tmp_path))
  assert str(tmp_path / 'plots' / 'probe.png') in paths
  assert str(tmp_path / 'plots' / 'keyed_probe.png') in paths
  assert str(tmp_path / 'plots' / 'text_probe.png') not in paths
  # An LM stage's text probe, in W/lm.
  lm_rows = [{'step': 0, 'probe/text_margin': 0.0,
              'probe/text_accuracy': 1 / 3},
             {'step': 10, 'loss': 3.0},
             {'step': 10, 'probe/text_margin': 2.5,
              'probe/text_accuracy': 0.75}]
  (tmp_path / 'lm').mkdir()
  (tmp_path / 'lm' / 'metrics.jsonl').write_text(
      ''.join(json.dumps(r) + '\n' for r in lm_rows))
  assert plots.write_plots(str(tmp_path / 'lm')) == [
      str(tmp_path / 'lm' / 'plots' / name)
      for name in ('loss.png', 'text_probe.png')]
  with open(report.write_report(str(tmp_path))) as f:
    text = f.read()
  assert '](plots/probe.png)' in text
  assert '](plots/keyed_probe.png)' in text
  assert '| probe/binding_margin | 0 | 0.5 |' in text
  assert '](lm/plots/text_probe.png)' in text
  assert '| probe/text_margin | 0 | 2.5 |' in text
  assert '| probe/text_accuracy | 0.3333 | 0.75 |' in text


def test_the_loop_runs_the_text_probe_in_an_lm_run(smoke_workdir):
  # pylint: disable=g-import-not-at-top
  import ml_collections
  from flamingo_jax.training import loop
  # pylint: enable=g-import-not-at-top
  config = ml_collections.ConfigDict(
      json.loads((smoke_workdir / 'config.json').read_text()))
  config.probe = dict(every=10, episodes=1, seed=0, ways=WAYS, shots=SHOTS,
                      seq_len=_TEXT_LEN)
  make_probe = probe.from_config
  config.task = 'lm'
  run, every = make_probe(config,
                          loop.task_of(config).transform(config.model))
  out = run(checkpoint.load_params(str(smoke_workdir)))  # Its lm/... alone.
  assert every == 10
  assert set(out) == {'probe/text_margin', 'probe/text_accuracy'}
  assert np.isfinite(out['probe/text_margin'])
  assert out['probe/text_accuracy'] * WAYS == pytest.approx(
      round(out['probe/text_accuracy'] * WAYS))  # One episode, 3 queries.


def test_the_loop_runs_the_binding_and_keyed_probes_in_a_flamingo_run(
    smoke_workdir):
  # pylint: disable=g-import-not-at-top
  import ml_collections
  from flamingo_jax.training import loop
  # pylint: enable=g-import-not-at-top
  config = ml_collections.ConfigDict(
      json.loads((smoke_workdir / 'config.json').read_text()))
  config.probe = dict(every=10, episodes=1, seed=0, ways=WAYS, shots=SHOTS,
                      seq_len=128)
  run, _ = probe.from_config(
      config, loop.task_of(config).transform(config.model))
  params = checkpoint.load_params(str(smoke_workdir))
  out = run(params)
  assert set(out) == {'probe/binding_margin', 'probe/binding_accuracy',
                      'probe/keyed_margin', 'probe/keyed_accuracy'}
  # Gates at 0: the plain probe is blind (margin 0), the keyed one is the
  # LM's alone, which reads the keys in the text.
  blind = run(_with_gates(params, 0.0))
  assert abs(blind['probe/binding_margin']) < 1e-4
  assert abs(blind['probe/keyed_margin']) > 1e-3


# ------------------------------------------------------------ text probe --


def _table_lm(params, rng, tokens, media, media_mask, media_index,
              is_training=False):
  """A bigram LM: the next token's logits are row `tokens` of `params`."""
  del rng, media, media_mask, media_index, is_training
  return params[tokens]  # [R, L, V]


def _line_copying_lm(line_ends):
  """A hand-built binder of line-keyed text: at a token of a line, the
  token that followed the same token in the latest earlier line that began
  with the same key (its first two tokens: a key may take two pieces) gets
  logit `params` (a scalar), every other token 0. `line_ends`: bool [V],
  the ids after which a line starts (<BOS>, pieces ending '.' or '!')."""
  def lm(params, rng, tokens, media, media_mask, media_index,
         is_training=False):
    del rng, media, media_mask, media_index, is_training
    length = tokens.shape[1]
    pos = jnp.arange(length)
    starts = jnp.pad(line_ends[tokens], ((0, 0), (1, 0)))[:, :-1]  # [R, L]
    start = jax.lax.cummax(jnp.where(starts, pos, 0), axis=1)  # [R, L]
    first = jnp.take_along_axis(tokens, start, axis=1)
    second = jnp.take_along_axis(tokens, jnp.minimum(start + 1, length - 1),
                                 axis=1)
    # The second token only once it has been read (causal).
    key = jnp.where(pos > start, first * _VOCAB + second, -1 - first)
    # [R, t, s]: s < t, in an earlier line of the same key, the same token.
    match = ((key[:, :, None] == key[:, None, :]) &
             (tokens[:, :, None] == tokens[:, None, :]) &
             (start[:, :, None] > start[:, None, :]) &
             (pos[None, :, None] > pos[None, None, :]))
    latest = jnp.max(jnp.where(match, pos, -1), axis=-1)  # [R, t]
    follower = jnp.take_along_axis(
        tokens, jnp.clip(latest + 1, 0, length - 1), axis=1)  # [R, t]
    logits = jax.nn.one_hot(follower, _VOCAB) * params  # [R, t, V]
    return jnp.where((latest >= 0)[..., None], logits, 0.0)
  return lm


_VOCAB = 520  # > the smoke tokenizer's ids, markers included (checked).


def _line_ends(tokenizer, marker_ids):
  """bool [V]: the ids after which a line starts (`_line_copying_lm`):
  pieces ending '.' or '!', and `marker_ids`."""
  line_ends = np.zeros(_VOCAB, bool)
  for i in range(tokenizer.vocab_size):
    line_ends[i] = tokenizer.decode([i]).rstrip().endswith(('.', '!'))
  line_ends[marker_ids] = True
  return jnp.asarray(line_ends)
_TEXT_LEN = 128


@pytest.fixture(scope='module')
def text_setup(smoke_workdir):
  _, tokenizer = _config_and_tokenizer(smoke_workdir)
  batch = probe_data.text_probe_batch(
      tokenizer, num_episodes=EPISODES, ways=WAYS, shots=SHOTS,
      seq_len=_TEXT_LEN)
  assert batch['tokens'].max() < _VOCAB
  line_ends = _line_ends(tokenizer, [tokenizer.bos_id])
  return (tokenizer, batch,
          probe.make_probe_fn(_table_lm, {probe.TEXT: batch}),
          probe.make_probe_fn(_line_copying_lm(line_ends),
                              {probe.TEXT: batch}))


def test_text_probe_rows_end_with_the_key_and_score_the_word(text_setup):
  tokenizer, batch, _, _ = text_setup
  rows = EPISODES * WAYS * WAYS
  assert batch['tokens'].shape == batch['score_mask'].shape == (
      rows, _TEXT_LEN)
  assert batch['media'].shape[:2] == (rows, 1)
  assert not batch['media_mask'].any()  # No picture: text alone.
  decode = lambda ids: tokenizer.decode([int(t) for t in ids])
  scored = batch['score_mask'].reshape(EPISODES, WAYS, WAYS, -1) > 0
  targets = batch['targets'].reshape(EPISODES, WAYS, WAYS, -1)
  keys = {}
  for e in range(EPISODES):
    words = [decode(targets[e, 0, c][scored[e, 0, c]]).strip()[:-1]
             for c in range(WAYS)]
    assert len(set(words)) == WAYS
    for q in range(WAYS):
      for c in range(WAYS):
        start = int(np.argmax(scored[e, q, c]))
        # The same prompt for every candidate; the candidate's word after it.
        assert (targets[e, q, c, :start] == targets[e, q, 0, :start]).all()
        assert decode(targets[e, q, c][scored[e, q, c]]).strip() in (
            words[c] + '.', words[c] + '!')
        prompt = decode(targets[e, q, c, :start])
        # The query's line starts with its key, which started the support's
        # lines of word q, and only those.
        *support, query = re.split(r'(?<=[.!]) ', prompt.strip())
        key = query.split()[0]
        keyed = [line.split()[-1][:-1] for line in support
                 if line.split()[0] == key]
        assert keyed and set(keyed) == {words[q]}
        keys[e, q] = key
    assert len({keys[e, q] for q in range(WAYS)}) == WAYS


def test_context_blind_model_scores_chance(text_setup):
  """Next-token logits that ignore the context: margin 0, the same word
  wins every query (accuracy 1 / ways)."""
  _, _, table_probe, _ = text_setup
  row = np.random.default_rng(0).normal(size=_VOCAB).astype(np.float32)
  out = table_probe(jnp.asarray(np.tile(row, (_VOCAB, 1))))
  assert set(out) == {'probe/text_margin', 'probe/text_accuracy'}
  assert abs(out['probe/text_margin']) < 1e-4
  assert out['probe/text_accuracy'] == pytest.approx(1 / WAYS)


def test_text_probe_equals_a_hand_computation(text_setup):
  _, batch, table_probe, _ = text_setup
  table = np.random.default_rng(1).normal(
      size=(_VOCAB, _VOCAB)).astype(np.float32)
  out = table_probe(jnp.asarray(table))
  logits = table[batch['tokens']].astype(np.float64)  # [R, L, V]
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  lp = np.take_along_axis(log_probs, batch['targets'][..., None], -1)[..., 0]
  scores = (lp * batch['score_mask']).sum(-1).reshape(-1, WAYS, WAYS)
  margins, hits = [], []
  for episode in scores:
    for q in range(WAYS):
      others = [episode[q, c] for c in range(WAYS) if c != q]
      margins.append(episode[q, q] - np.mean(others))
      hits.append(np.argmax(episode[q]) == q)
  assert out['probe/text_margin'] == pytest.approx(np.mean(margins),
                                                   abs=1e-3)
  assert out['probe/text_accuracy'] == pytest.approx(np.mean(hits))


def test_copying_model_binds(text_setup):
  """A model that copies from the earlier lines that began with the same
  key finds every query's word: the key is the query's alone."""
  _, _, _, copying_probe = text_setup
  out = copying_probe(jnp.float32(20.0))
  assert out['probe/text_accuracy'] == 1.0
  assert out['probe/text_margin'] > 10.0
  assert copying_probe(jnp.float32(0.0))['probe/text_margin'] == (
      pytest.approx(0.0, abs=1e-4))


def test_keyed_probe_keys_every_line_and_a_text_binder_solves_it(
    text_setup):
  """The keyed probe's lines begin with their pictures' keys (the query's
  too): a picture-blind model that copies from the earlier line of the same
  key finds every word, and scores exactly 0 on the plain probe."""
  tokenizer = text_setup[0]
  copying = _line_copying_lm(_line_ends(
      tokenizer, [tokenizer.bos_id, tokenizer.eoc_id, tokenizer.image_id]))
  batches = {keyed: probe_data.probe_batch(
      tokenizer, num_episodes=EPISODES, ways=WAYS, shots=SHOTS,
      image_size=16, seq_len=160, keyed=keyed) for keyed in (False, True)}
  plain, keyed = batches[False], batches[True]
  # The same pictures; the keyed text is the plain one with ' <key>' after
  # every <image>, the query's key that of its picture's word.
  np.testing.assert_array_equal(plain['media'], keyed['media'])
  decode = lambda ids: tokenizer.decode([int(t) for t in ids if t])
  for row in (e * WAYS * WAYS + q * (WAYS + 1) for e in range(EPISODES)
              for q in range(WAYS)):  # The rows (e, q, c = q).
    lines = decode(keyed['tokens'][row]).split('<image>')[1:]
    assert all(line.startswith(' ') for line in lines)
    keys = [line.split()[0] for line in lines]
    plain_lines = decode(plain['tokens'][row]).split('<image>')[1:]
    assert [' '.join(line.split()[1:]) for line in lines] == [
        ' '.join(line.split()) for line in plain_lines]
    # The query's word is the one its key's support lines name.
    word = lambda line: re.match(r'[^.!<]+', line.split()[-1]).group()
    assert {word(line) for line in lines[:-1]
            if line.split()[0] == keys[-1]} == {word(lines[-1])}
  traces = []

  def counted(*args, **kwargs):
    traces.append(1)
    return copying(*args, **kwargs)

  # Both probes from one function, traced (compiled) once: same shapes.
  out = probe.make_probe_fn(counted, {probe.KEYED: keyed,
                                      probe.BINDING: plain})(jnp.float32(20.0))
  assert len(traces) == 1
  assert out['probe/keyed_accuracy'] == 1.0
  assert out['probe/keyed_margin'] > 10.0
  assert out['probe/binding_margin'] == pytest.approx(0.0, abs=1e-4)


def test_bad_text_probe_arguments_raise(text_setup):
  tokenizer = text_setup[0]
  with pytest.raises(ValueError, match='ways >= 2'):
    probe_data.text_probe_batch(tokenizer, ways=1)
  with pytest.raises(ValueError, match='raise it'):
    probe_data.text_probe_batch(tokenizer, num_episodes=1, seq_len=24)


# ------------------------------------------------------- attribute probe --


def test_readout_reads_what_the_features_hold():
  rng = np.random.default_rng(0)
  labels = jnp.asarray(rng.integers(8, size=512))
  noise = rng.normal(size=(512, 16)).astype(np.float32)
  told = jnp.asarray(noise * 0.1).at[:, :8].add(jax.nn.one_hot(labels, 8))
  assert probe.readout_accuracy(told, labels, 384, 8) == 1.0
  blind = probe.readout_accuracy(jnp.asarray(noise), labels, 384, 8)
  assert blind < 0.3  # Chance 1/8 (128 test rows).


def test_attribute_probe_pictures_are_seeded_and_checked():
  one = probe_data.attribute_probe_images('colour', num_images=32, seed=0)
  again = probe_data.attribute_probe_images('colour', num_images=32, seed=0)
  other = probe_data.attribute_probe_images('colour', num_images=32, seed=1)
  np.testing.assert_array_equal(one['images'], again['images'])
  assert not np.array_equal(one['images'], other['images'])
  assert one['images'].shape == (32, 64, 64, 3)
  assert (int(one['num_train']), int(one['num_classes'])) == (24, 8)
  with pytest.raises(ValueError, match='Unknown attribute'):
    probe_data.attribute_probe_images('size')
  with pytest.raises(ValueError, match='at least 8 pictures'):
    probe_data.attribute_probe_images('shape', num_images=16)


def _object_colour(params, images):
  """Hand-built features: the mean RGB of the pixels far from the corner's
  (the background's) colour, i.e. the object's."""
  del params
  x = images.astype(jnp.float32)  # [M, H, W, 3]
  far = jnp.abs(x - x[:, :1, :1]).sum(-1, keepdims=True) > 80  # [M, H, W, 1]
  return (x * far).sum((1, 2)) / jnp.maximum(far.sum((1, 2)), 1)  # [M, 3]


def test_attribute_probe_tells_colour_from_colour_features():
  pictures = {a: probe_data.attribute_probe_images(a, num_images=256)
              for a in ('shape', 'colour')}
  out = probe.make_attribute_probe_fn(_object_colour, pictures)(None)
  assert set(out) == {'probe/vision_shape_accuracy',
                      'probe/vision_colour_accuracy'}
  assert out['probe/vision_colour_accuracy'] > 0.7  # Chance 1/8.
  assert out['probe/vision_shape_accuracy'] < 0.4  # Colour says no shape.


def test_the_loop_runs_the_attribute_probe_in_a_vision_stage(tmp_path):
  # pylint: disable=g-import-not-at-top
  from experiments import tiny
  from flamingo_jax.models import contrastive
  from flamingo_jax.orchestration import plots
  # pylint: enable=g-import-not-at-top
  stage = tiny.get_config('default').stages.vision
  assert stage.task == 'contrastive' and stage.probe.every == 250
  stage.probe.images = 64
  run, every = probe.from_config(stage, None)
  # Seeded random values of the encoder's shapes (its init would compile
  # for tens of seconds on 2 cores).
  shapes = jax.eval_shape(contrastive.transform_features(stage.model).init,
                          jax.random.key(0),
                          jnp.zeros([1, 64, 64, 3], jnp.uint8))
  rng = np.random.default_rng(0)
  params = jax.tree.map(
      lambda x: 0.1 * rng.standard_normal(x.shape).astype(x.dtype), shapes)
  out = run(params)
  assert every == 250
  assert all(0.0 <= v <= 1.0 for v in out.values())
  rows = [{'step': 0, **out}, {'step': 250, **out}]
  (tmp_path / 'metrics.jsonl').write_text(
      ''.join(json.dumps(r) + '\n' for r in rows))
  assert str(tmp_path / 'plots' / 'vision_probe.png') in plots.write_plots(
      str(tmp_path))
