r"""Writes a run's human summary: python -m flamingo_jax.report --workdir W.

W/report.md links every stage's metrics and plots and the few-shot results;
see `flamingo_jax.orchestration.report`. The recipe writes it too.
"""

from absl import app
from absl import flags

from flamingo_jax.orchestration import report

_WORKDIR = flags.DEFINE_string('workdir', None, 'The run\'s workdir.')
flags.mark_flag_as_required('workdir')


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  print(f'Wrote {report.write_report(_WORKDIR.value)}')


if __name__ == '__main__':
  app.run(main)
