"""``log.profile=START:STOP``: a ``jax.profiler`` trace of training steps START..STOP-1, written to
the run folder's ``profile/`` (open it with TensorBoard's profile plugin, XProf or Perfetto)."""

from __future__ import annotations

from pathlib import Path

import jax


def parse(spec: str) -> tuple[int, int] | None:
    """``"START:STOP"`` as ``(start, stop)`` with ``0 <= start < stop``; ``""``: ``None``.
    Raises ``ValueError`` for anything else."""
    if not spec:
        return None
    start, sep, stop = spec.partition(":")
    try:
        window = int(start), int(stop)
    except ValueError:
        window = None
    if not sep or window is None or not 0 <= window[0] < window[1]:
        raise ValueError("expected START:STOP, two step numbers with 0 <= START < STOP (quoted "
                         "in an override, log.profile='10:20': YAML reads 10:20 as 620)")
    return window


class StepTrace:
    """Starts the trace before step ``start`` and stops it once step ``stop - 1`` has run."""

    def __init__(self, spec: str, folder: Path):
        self.window, self.folder, self.active = parse(spec), folder, False

    def before(self, step: int) -> None:
        if self.window is not None and step == self.window[0]:
            jax.profiler.start_trace(str(self.folder))
            self.active = True

    def after(self, step: int, state) -> None:
        """``step`` has been dispatched; ``state`` is its output."""
        if self.active and step + 1 == self.window[1]:
            jax.block_until_ready(state)
            self.close()

    def close(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
