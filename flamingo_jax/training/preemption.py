"""Preemption: SIGTERM or a first Ctrl-C asks the training loop to save and
exit (see loop.py); a second Ctrl-C interrupts at once."""

import signal
import threading

from absl import logging


class PreemptionFlag:
  """Set by SIGTERM (how Cloud TPU and most schedulers announce preemption)
  or by a first Ctrl-C (SIGINT); a second Ctrl-C interrupts at once."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self._event = threading.Event()
    self._previous = {}

  def install(self) -> 'PreemptionFlag':
    if threading.current_thread() is threading.main_thread():
      for signum in self.SIGNALS:
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame  # Unused.
    if signum == signal.SIGINT and self._event.is_set():
      raise KeyboardInterrupt
    logging.warning('Received %s: will save a checkpoint and exit%s.',
                    signal.Signals(signum).name,
                    ' (Ctrl-C again to stop at once, without saving)'
                    if signum == signal.SIGINT else '')
    self._event.set()

  def uninstall(self) -> None:
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous = {}

  def is_set(self) -> bool:
    return self._event.is_set()
