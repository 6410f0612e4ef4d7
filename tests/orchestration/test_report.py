"""W/report.md is written from what a run leaves on disk."""

import json

from flamingo_jax.orchestration import report


def _metrics(path, rows):
  path.mkdir(parents=True, exist_ok=True)
  (path / 'metrics.jsonl').write_text(
      ''.join(json.dumps(r) + '\n' for r in rows))


def test_report_lists_stages_metrics_plots_and_scores(tmp_path):
  _metrics(tmp_path / 'vision', [
      {'step': 10, 'loss': 3.5, 'i2t_accuracy/pairs': 0.03},
      {'step': 20, 'loss': 1.5, 'i2t_accuracy/pairs': 0.5}])
  _metrics(tmp_path, [{'step': 5, 'loss': 2.0, 'loss/pairs': 2.5},
                      {'step': 10, 'loss': 1.0, 'loss/pairs': 1.25}])
  (tmp_path / 'plots').mkdir()
  (tmp_path / 'plots' / 'loss.png').write_bytes(b'png')
  (tmp_path / 'eval').mkdir()
  (tmp_path / 'eval' / 'results.json').write_text(json.dumps({
      'scores': {'nonce': {'0': 0.0, '4': 12.5}},
      'overall_score': 0.5,
      'metadata': {'step': 10, 'metrics': {'nonce': 'exact_match'}}}))
  text = open(report.write_report(str(tmp_path))).read()
  assert '## Stage: vision' in text and '## Stage: main (Flamingo)' in text
  assert text.index('## Stage: vision') < text.index('## Stage: main')
  assert '| i2t_accuracy/pairs | 0.03 | 0.5 |' in text
  assert '| loss/pairs | 2.5 | 1.25 |' in text
  assert '![main (Flamingo) loss.png](plots/loss.png)' in text
  assert '| nonce | exact_match | 0.00 | 12.50 |' in text
  assert 'Overall score (mean of score / reference, as Table 3): 50.0%' in text


def test_report_without_evaluation_says_how_to_run_it(tmp_path):
  _metrics(tmp_path, [{'step': 1, 'loss': 1.0}])
  text = open(report.write_report(str(tmp_path))).read()
  assert 'python -m flamingo_jax.evaluate --workdir' in text


def test_a_damaged_metrics_line_is_skipped_with_a_warning(tmp_path, caplog):
  # A kill mid-write tears the last line; a bad copy garbles one inside.
  (tmp_path / 'metrics.jsonl').write_text(
      '{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n{"step": 3, "loss": 1.0}\n'
      '[1, 2]\n{"step": 4, "loss": 0.5')
  text = open(report.write_report(str(tmp_path))).read()
  assert '| loss | 2 | 1 |' in text
  assert 'skipped 3 damaged line(s): 2, 4, 5' in caplog.text
