"""Ctrl-C and SIGTERM while training: the first one finishes the current optimizer step, writes a checkpoint and
stops; a second one stops at once (complete checkpoints are never damaged: each is renamed into place whole).

Colab and Kaggle end sessions with SIGTERM; torchrun forwards the signal it gets to every worker, so under several
processes a repeat within a moment is that forward, not a second request.
"""

from __future__ import annotations

import signal
import threading
import time

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
REPEAT_WINDOW_S = 0.5  # several processes: a repeat this soon is torchrun forwarding the same Ctrl-C


class StopRequests:
    def __init__(self, announce, several_processes: bool = False):
        self.signum: int | None = None
        self._first_at = 0.0
        self._announce = announce
        self._window = REPEAT_WINDOW_S if several_processes else 0.0
        self._previous: dict = {}

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        if self.signum is None:
            self.signum, self._first_at = signum, now
            self._announce(
                f"{signal.Signals(signum).name}: finishing this optimizer step, then saving a checkpoint and stopping "
                "(press Ctrl-C again to stop at once)"
            )
            return
        if now - self._first_at < self._window:
            return
        raise KeyboardInterrupt
