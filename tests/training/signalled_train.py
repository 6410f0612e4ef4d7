r"""`python -m flamingo_jax.train` that signals itself at a step (for tests).

  FLAMINGO_JAX_TEST_SIGNAL=8:SIGKILL python -m tests.training.signalled_train \
      --config ... --workdir ...

The process sends itself the signal right after it has logged that step, so
a test interrupts training at a known step, however fast the steps run (an
outside process polling metrics.jsonl can miss a whole run of tiny steps).
The signal is a real one: SIGKILL ends the process where it stands, SIGTERM
goes through the loop's preemption handler.
"""

import os
import signal

from absl import app

from flamingo_jax import cli
from flamingo_jax import train
from flamingo_jax.training import metrics


def _signal_after(step: int, signum: int) -> None:
  """Patches the metric logger to send `signum` once `step` is written."""
  write = metrics.MetricLogger.write

  def write_then_signal(self, logged_step, scalars):
    write(self, logged_step, scalars)
    if logged_step == step:
      os.kill(os.getpid(), signum)

  metrics.MetricLogger.write = write_then_signal


if __name__ == '__main__':
  at, name = os.environ['FLAMINGO_JAX_TEST_SIGNAL'].split(':')
  _signal_after(int(at), getattr(signal, name))
  app.run(train.main, flags_parser=cli.parse_flags)
