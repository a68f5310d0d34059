"""SIGINT (Ctrl-C) and SIGTERM (schedulers, ``kill``) as a request to stop at the next step
boundary, so the loop can save before exiting; a second signal exits at once."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
    """The run stopped on a signal after saving; ``exit_code`` is ``128 + signal``."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopRequest:
    """Set by the first SIGINT/SIGTERM while :func:`stop_on_signals` is active."""

    def __init__(self):
        self.signum: int | None = None

    def __bool__(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


@contextlib.contextmanager
def stop_on_signals(prog: str = "transformax-train"):
    """Within the block, the first SIGINT/SIGTERM sets the yielded :class:`StopRequest`; a
    second one exits at once with ``128 + signal``, saving nothing more.
    Outside the main thread, signals are left alone (the request never fires)."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handle(signum, frame):
        if request:
            sys.stderr.write(f"{prog}: second {signal.Signals(signum).name}: exiting now "
                             f"without saving\n")
            sys.stderr.flush()
            os._exit(128 + signum)
        request.signum = signum

    previous = {s: signal.signal(s, handle) for s in SIGNALS}
    try:
        yield request
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
