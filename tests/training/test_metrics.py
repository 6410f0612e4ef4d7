"""metrics.jsonl: a resumed run drops the rows past its checkpoint."""

import json
import logging

from flamingo_jax.training import metrics


def test_a_resumed_logger_drops_later_rows_and_torn_lines(tmp_path):
  rows = [{'step': s, 'loss': 1.0 / s} for s in (1, 2, 3, 4)]
  (tmp_path / 'metrics.jsonl').write_text(
      ''.join(json.dumps(r) + '\n' for r in rows) + '{"step": 5, "lo')
  logger = metrics.MetricLogger(str(tmp_path), total_steps=6, first_step=2)
  logger.write(3, {'loss': 0.25})
  logger.close()
  assert metrics.read_metrics(str(tmp_path)) == rows[:2] + [
      {'step': 3, 'loss': 0.25}]


def test_plots_and_report_survive_damaged_lines(tmp_path):
  """A torn or garbled line (a kill mid-write, a full disk) costs its row,
  not the run's plots and report."""
  # pylint: disable=g-import-not-at-top
  from flamingo_jax.orchestration import plots
  from flamingo_jax.orchestration import report
  # pylint: enable=g-import-not-at-top
  rows = [json.dumps({'step': s, 'loss': 1.0 / s}) for s in (1, 2, 3)]
  (tmp_path / 'metrics.jsonl').write_text('\n'.join(
      [rows[0], '\x00\x00garbage', rows[1], '[1, 2]', rows[2],
       '{"step": 4, "lo']))
  assert [r['step'] for r in metrics.read_metrics(str(tmp_path))] == [1, 2, 3]
  paths = plots.write_plots(str(tmp_path))
  assert str(tmp_path / 'plots' / 'loss.png') in paths
  assert (tmp_path / 'plots' / 'loss.png').stat().st_size > 0
  with open(report.write_report(str(tmp_path))) as f:
    assert '| loss |' in f.read()


def test_a_row_without_loss_prints_its_own_values(tmp_path, caplog):
  logger = metrics.MetricLogger(str(tmp_path), total_steps=10)
  with caplog.at_level(logging.INFO, logger='absl'):
    logger.write(5, {'probe/text_margin': 1.5, 'probe/text_accuracy': 0.5})
    logger.write(6, {'loss': 2.0, 'steps_per_sec': 1.0})
  logger.close()
  assert 'step 5/10: probe/text_accuracy 0.5, probe/text_margin 1.5' in (
      caplog.text)
  assert 'loss nan' not in caplog.text
  assert 'step 6/10 (60%) loss 2.0000 | 1.00 steps/s | ETA 0m04s' in caplog.text
