"""The binding probe: its episodes, its scores, and 0 for a blind model."""

import json

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


@pytest.fixture(scope='module')
def setup(smoke_workdir):
  config = json.loads((smoke_workdir / 'config.json').read_text())
  tokenizer = tokenizer_lib.Tokenizer.load(config['data']['tokenizer'])
  batch = probe_data.probe_batch(
      tokenizer, num_episodes=EPISODES, ways=WAYS, shots=SHOTS,
      image_size=config['model']['image_size'], seq_len=128)
  model = precision.with_compute_dtype(flamingo.transform(config['model']),
                                      jnp.float32)
  params = checkpoint.load_params(str(smoke_workdir))
  return tokenizer, batch, probe.make_probe_fn(model.apply, batch), params


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
           'probe/binding_accuracy': 0.5}]
  (tmp_path / 'metrics.jsonl').write_text(
      ''.join(json.dumps(r) + '\n' for r in rows))
  paths = plots.write_plots(str(tmp_path))
  assert str(tmp_path / 'plots' / 'probe.png') in paths
  with open(report.write_report(str(tmp_path))) as f:
    text = f.read()
  assert '](plots/probe.png)' in text
  assert '| probe/binding_margin | 0 | 0.5 |' in text
