r"""Plots a run's metrics: python -m flamingo_jax.plot --workdir W.

Writes W/plots/loss.png, gates.png, probe.png and text_probe.png (when
logged) from W/metrics.jsonl; see `flamingo_jax.orchestration.plots`. The
recipe writes them at the end of every stage too.
"""

from absl import app
from absl import flags

from flamingo_jax.orchestration import plots

_WORKDIR = flags.DEFINE_string('workdir', None, 'A training workdir.')
flags.mark_flag_as_required('workdir')


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  for path in plots.write_plots(_WORKDIR.value):
    print(path)


if __name__ == '__main__':
  app.run(main)
