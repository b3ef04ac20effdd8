"""Ctrl-C during training: the first press asks for a clean stop at the end of the step (a checkpoint
is saved), the second interrupts at once."""

from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger("lorakit.train")


class StopOnCtrlC:
    """First Ctrl-C asks for a clean stop at the end of the step; the second one interrupts at once."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("stopping after this step (Ctrl-C again to stop at once)")

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
