"""Checkpoints with orbax: the train state (params, optimizer state, step, RNG) and the config.

Orbax writes each checkpoint into a temporary folder and renames it when complete, so a save cut
short (a crash, SIGKILL) is never listed as a step; such leftovers are removed on the next start.
Saves are synchronous: the train step donates the state's buffers right after. A checkpoint
damaged later (a truncated file, a missing one) is skipped by :meth:`Checkpoints.restore_newest`
with a warning, falling back to the newest one that restores.
"""

from __future__ import annotations

import shutil
import time
import warnings
from pathlib import Path
from typing import Callable

import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
    """No checkpoint restores."""


class Checkpoints:
    """The checkpoints in ``directory`` (created by the first save), keeping the last ``keep``."""

    def __init__(self, directory: str | Path, keep: int):
        self.directory = Path(directory).absolute()
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=False,
                                                 enable_async_checkpointing=False))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, state, config: dict) -> bool:
        """Save ``state`` under its step (no-op, returning False, if that step exists)."""
        step = int(state.step)
        if step in self._manager.all_steps():
            return False
        return self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config)))

    def saved_config(self, step: int) -> dict:
        """The config saved with checkpoint ``step``."""
        return self._manager.restore(step, args=ocp.args.Composite(
            config=ocp.args.JsonRestore())).config

    def restore(self, abstract_state, step: int | None = None):
        """``(state, config dict)`` of ``step`` (default the latest); ``abstract_state``: a
        pytree of ``jax.ShapeDtypeStruct`` with shardings, the structure to restore into."""
        step = self.latest_step() if step is None else step
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), config=ocp.args.JsonRestore()))
        return type(abstract_state)(*restored.state), restored.config

    def restore_newest(self, abstract_state, accept: Callable[[dict], None] = lambda c: None):
        """``(state, config dict, step, damaged)`` of the newest checkpoint that restores.
        ``accept(config)`` may raise to refuse a checkpoint's config (that error propagates);
        ``damaged``: the newer steps that failed to restore, each skipped with a warning.
        Raises :class:`CheckpointError` if none restores."""
        damaged = []
        for step in sorted(self.all_steps(), reverse=True):
            try:
                config = self.saved_config(step)
            except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many kinds
                damaged.append((step, _reason(e)))
                continue
            accept(config)
            try:
                state, config = self.restore(abstract_state, step)
            except Exception as e:  # noqa: BLE001
                damaged.append((step, _reason(e)))
                continue
            for bad, reason in damaged:
                warnings.warn(f"checkpoint step {bad} in {self.directory} does not restore "
                              f"({reason}); skipped, using step {step}", RuntimeWarning,
                              stacklevel=2)
            return state, config, step, [bad for bad, _ in damaged]
        tried = "; ".join(f"step {bad}: {reason}" for bad, reason in damaged)
        raise CheckpointError(f"no checkpoint in {self.directory} restores ({tried or 'none'})")

    def set_aside(self, step: int, folder: Path) -> Path:
        """Move checkpoint ``step`` to ``folder/<step>-<time>`` (out of the step list, so a new
        checkpoint can take its step) and return where it went."""
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"{step}-{time.strftime('%Y%m%dT%H%M%S')}"
        shutil.move(self.directory / str(step), target)
        self._manager.reload()
        return target

    def close(self) -> None:
        self._manager.close()


def _reason(error: Exception) -> str:
    """An orbax / tensorstore error's gist: its type and first line, shortened."""
    first = (str(error).strip().splitlines() or [""])[0].split(" See full TensorStore")[0]
    return f"{type(error).__name__}: {first[:160]}"
