r"""Shows what the model is fed: a PNG grid of batch rows with their text.

  python -m flamingo_jax.data.show --config experiments/tiny.py \
      --dataset documents --out /tmp/documents.png [--rows 4]

Each row is one training sequence exactly as the pipeline yields it: its
media slots (first and last frame of a video), then the decoded tokens with
the tokens whose target is not supervised (an <image> target) in
parentheses, and {k} wherever the attended slot phi changes to k.
"""

import textwrap

from absl import app
from absl import flags
import matplotlib

matplotlib.use('Agg')  # No display needed.
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
from ml_collections import config_flags  # pylint: disable=g-import-not-at-top,wrong-import-position

from flamingo_jax import cli  # pylint: disable=g-import-not-at-top,wrong-import-position
from flamingo_jax.data import pipeline  # pylint: disable=g-import-not-at-top,wrong-import-position
from flamingo_jax.data import prepare  # pylint: disable=g-import-not-at-top,wrong-import-position
from flamingo_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top,wrong-import-position

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Training config whose data to show (default '
    'experiments/tiny.py).', lock_config=True)
_DATASET = flags.DEFINE_string('dataset', None, 'A key of config.data.datasets.')
_OUT = flags.DEFINE_string('out', None, 'PNG path to write.')
_ROWS = flags.DEFINE_integer('rows', 4, 'Sequences to show.')
_STEP = flags.DEFINE_integer('step', 0, 'Training step whose batch to show.')


def describe_row(batch, row: int, tokenizer) -> str:
  """The decoded sequence; {k} where phi changes to k, masked targets in ()."""
  pieces, last_phi = [], 0
  for token, target_kept, phi in zip(batch['tokens'][row],
                                     batch['loss_mask'][row],
                                     batch['media_index'][row]):
    if token == tokenizer.pad_id:
      break
    if phi != last_phi:
      pieces.append(f'{{{phi}}}')
      last_phi = phi
    text = tokenizer.decode([int(token)]).replace('\n', ' ')
    pieces.append(text if target_kept else f'({text})')
  return ''.join(pieces)


def render(batch, tokenizer, rows: int, title: str, path: str) -> None:
  """Writes the grid: media on the left, wrapped text on the right."""
  rows = min(rows, batch['tokens'].shape[0])
  slots = batch['media'].shape[1]
  frames = 2 if batch['media'].shape[2] > 1 else 1
  columns = slots * frames + 1
  fig, axes = plt.subplots(rows, columns, squeeze=False,
                           figsize=(1.6 * (columns - 1) + 7, 1.9 * rows))
  for row in range(rows):
    for slot in range(slots):
      for f, frame in enumerate([0, -1][:frames]):
        ax = axes[row, slot * frames + f]
        ax.axis('off')
        if batch['media_mask'][row, slot]:
          ax.imshow(batch['media'][row, slot, frame])
          ax.set_title(f'slot {slot + 1}' + (f' t={frame}' if frames > 1
                                              else ''), fontsize=7)
    ax = axes[row, -1]
    ax.axis('off')
    text = textwrap.fill(describe_row(batch, row, tokenizer), 95)
    ax.text(0, 1, text, va='top', ha='left', fontsize=6, family='monospace',
            transform=ax.transAxes)
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config = _CONFIG.value
  if _DATASET.value not in config.data.datasets:
    raise app.UsageError(f'--dataset must be one of '
                         f'{sorted(config.data.datasets)}; got '
                         f'{_DATASET.value!r}.')
  prepare.ensure_data(config)
  with config.unlocked():
    config.data.datasets = {_DATASET.value:
                            config.data.datasets[_DATASET.value]}
  data = pipeline.make_train_data(config, _STEP.value)
  batch = next(data)[_DATASET.value]
  data.close()
  tokenizer = tokenizer_lib.Tokenizer.load(config.data.tokenizer)
  render(batch, tokenizer, _ROWS.value,
         f'{_DATASET.value}, step {_STEP.value}: {{phi}} text, (unsupervised)',
         _OUT.value)
  print(_OUT.value)


if __name__ == '__main__':
  flags.mark_flags_as_required(['dataset', 'out'])
  app.run(main, flags_parser=cli.parse_flags_with_default_config(
      'experiments/tiny.py'))
