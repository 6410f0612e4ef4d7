r"""`python -m flamingo_jax.train` that signals itself at a step (for tests).

  FLAMINGO_JAX_TEST_SIGNAL=lm:3:SIGTERM python -m tests.faults.signalled_train \
      --config ... --workdir W

The process sends itself the signal right after it has logged step 3 of the
stage whose workdir is W/lm ('.' names the main stage, W itself), so a test
interrupts training at a known step of a known stage, however fast the steps
run (an outside process polling metrics.jsonl can miss a whole run of tiny
steps). The signal is a real one: SIGKILL ends the process where it stands,
SIGTERM and SIGINT go through the loop's preemption handler.
"""

import os
import signal

from absl import app
from absl import flags

from flamingo_jax import cli
from flamingo_jax import train
from flamingo_jax.training import metrics


def _signal_after(stage: str, step: int, signum: int) -> None:
  """Patches the metric logger to send `signum` once `stage` logs `step`."""
  init, write = metrics.MetricLogger.__init__, metrics.MetricLogger.write

  def init_and_remember(self, workdir, *args, **kwargs):
    init(self, workdir, *args, **kwargs)
    self.test_stage = os.path.relpath(workdir, flags.FLAGS.workdir)

  def write_then_signal(self, logged_step, scalars):
    write(self, logged_step, scalars)
    if logged_step == step and self.test_stage == stage:
      os.kill(os.getpid(), signum)

  metrics.MetricLogger.__init__ = init_and_remember
  metrics.MetricLogger.write = write_then_signal


if __name__ == '__main__':
  where, at, name = os.environ['FLAMINGO_JAX_TEST_SIGNAL'].split(':')
  _signal_after(where, int(at), getattr(signal, name))
  app.run(train.main, flags_parser=cli.parse_flags)
