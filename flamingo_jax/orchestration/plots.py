"""A run's plots (`python -m flamingo_jax.plot --workdir W`).

`write_plots(W)` writes, from `W/metrics.jsonl`:
  W/plots/loss.png    the weighted total loss and each dataset's loss;
  W/plots/gates.png   |tanh(alpha)| of every cross-attention gate per layer
                      over training (the paper's Fig. 6);
  W/plots/probe.png   the binding probe (training/probe.py): margin and
                      accuracy over training, when the run logged it;
  W/plots/text_probe.png  the same for the text probe (an LM stage's);
  W/plots/vision_probe.png  the attribute probe (a vision stage's): how well
                      a linear read-out of the features tells each
                      attribute's values apart, over training.
The recipe writes them at the end of every stage too (the training loop's
`on_finished`).
"""

import matplotlib

matplotlib.use('Agg')  # No display needed.
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

# pylint: disable=g-import-not-at-top,wrong-import-position
from flamingo_jax import fs
from flamingo_jax.training import metrics as metrics_lib
from flamingo_jax.training import probe as probe_lib
# pylint: enable=g-import-not-at-top,wrong-import-position


def _series(rows, key):
  points = [(r['step'], r[key]) for r in rows if key in r]
  return [p[0] for p in points], [p[1] for p in points]


def plot_losses(rows, path: str) -> None:
  fig, ax = plt.subplots(figsize=(7, 4))
  keys = ['loss'] + sorted({k for r in rows for k in r
                            if k.startswith('loss/')})
  for key in keys:
    ax.plot(*_series(rows, key), label=key, lw=2 if key == 'loss' else 1)
  ax.set_xlabel('step')
  ax.set_ylabel('loss')
  ax.set_title('Training loss (total: lambda-weighted sum)')
  ax.legend()
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fs.save_figure(fig, path)
  plt.close(fig)


def plot_gates(rows, path: str) -> None:
  keys = sorted({k for r in rows for k in r if k.startswith('gates/')},
                key=lambda k: (k.rsplit('_', 1)[0], int(k.rsplit('_', 1)[1])))
  fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
  for ax, kind in zip(axes, ('attn_gate', 'ffw_gate')):
    for key in keys:
      if key.startswith(f'gates/{kind}_'):
        ax.plot(*_series(rows, key), label=f'layer {key.rsplit("_", 1)[1]}')
    ax.set_title(f'|tanh({kind})|')
    ax.set_xlabel('step')
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize='small')
  fig.tight_layout()
  fs.save_figure(fig, path)
  plt.close(fig)


# Each probe's plot file, metric prefix (training/probe.py) and titles.
PROBES = (
    ('probe.png', probe_lib.BINDING, 'binding margin (nats; blind = 0)',
     'binding accuracy'),
    ('text_probe.png', probe_lib.TEXT,
     'text binding margin (nats; context-blind = 0)',
     'text binding accuracy'),
    ('keyed_probe.png', probe_lib.KEYED,
     'keyed binding margin (nats; the LM alone binds it)',
     'keyed binding accuracy'),
)


def plot_probe(rows, path: str, prefix: str = probe_lib.BINDING,
               titles: tuple[str, str] = PROBES[0][2:]) -> None:
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for ax, key, title in ((axes[0], f'{prefix}_margin', titles[0]),
                         (axes[1], f'{prefix}_accuracy', titles[1])):
    ax.plot(*_series(rows, key), marker='.')
    ax.set_title(title)
    ax.set_xlabel('step')
    ax.grid(alpha=0.3)
  axes[0].axhline(0.0, color='grey', lw=1)
  fig.tight_layout()
  fs.save_figure(fig, path)
  plt.close(fig)


def plot_attribute_probe(rows, path: str) -> None:
  keys = sorted({k for r in rows for k in r
                 if k.startswith(probe_lib.VISION + '_')})
  fig, ax = plt.subplots(figsize=(7, 4))
  for key in keys:
    ax.plot(*_series(rows, key), marker='.',
            label=key[len(probe_lib.VISION) + 1:-len('_accuracy')])
  ax.set_title('linear read-out accuracy of the vision features')
  ax.set_xlabel('step')
  ax.set_ylim(0.0, 1.0)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fs.save_figure(fig, path)
  plt.close(fig)


def write_plots(workdir: str) -> list[str]:
  """Writes the plots of `workdir`; returns their paths."""
  rows = metrics_lib.read_metrics(workdir)
  out = fs.join(workdir, 'plots')
  fs.makedirs(out)
  paths = [fs.join(out, 'loss.png')]
  plot_losses(rows, paths[0])
  if any(k.startswith('gates/') for r in rows for k in r):
    paths.append(fs.join(out, 'gates.png'))
    plot_gates(rows, paths[-1])
  for name, prefix, *titles in PROBES:
    if any(f'{prefix}_margin' in r for r in rows):
      paths.append(fs.join(out, name))
      plot_probe(rows, paths[-1], prefix, tuple(titles))
  if any(k.startswith(probe_lib.VISION + '_') for r in rows for k in r):
    paths.append(fs.join(out, 'vision_probe.png'))
    plot_attribute_probe(rows, paths[-1])
  return paths

