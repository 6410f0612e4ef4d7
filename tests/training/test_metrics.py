"""metrics.jsonl: a resumed run drops the rows past its checkpoint."""

import json

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
