"""Plots of evaluation results: score vs shots, one panel per task."""

from collections.abc import Mapping
import math
from typing import Any

import matplotlib

matplotlib.use('Agg')  # No display needed.
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

from flamingo_jax import fs  # pylint: disable=g-import-not-at-top,wrong-import-position


def plot_scores(results: Mapping[str, Any], path: str) -> None:
  """Writes a PNG of each task's score against the number of shots.

  Args:
    results: as `runner.evaluate` returns ({'scores': {task: {shots:
      score}}, 'metadata': {...}}).
    path: the PNG to write.
  """
  scores = results['scores']
  metadata = results.get('metadata', {})
  names = list(scores)
  columns = min(3, max(1, len(names)))
  rows = max(1, math.ceil(len(names) / columns))
  fig, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 2.8 * rows),
                           squeeze=False)
  for ax, name in zip(axes.flat, names):
    points = sorted((int(s), v) for s, v in scores[name].items())
    ax.plot([p[0] for p in points], [p[1] for p in points], 'o-')
    ax.set_xticks([p[0] for p in points])
    ax.set_title(name)
    ax.set_xlabel('shots')
    ax.set_ylabel(metadata.get('metrics', {}).get(name, 'score'))
    ax.grid(alpha=0.3)
  for ax in list(axes.flat)[len(names):]:
    ax.axis('off')
  title = 'Few-shot scores'
  if metadata.get('step') is not None:
    title += f' (step {metadata["step"]}'
    title += ', RICES)' if metadata.get('rices') else ')'
  fig.suptitle(title)
  fig.tight_layout()
  fs.save_figure(fig, path)
  plt.close(fig)
