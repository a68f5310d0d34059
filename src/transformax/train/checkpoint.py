"""Checkpoints with orbax: the train state (params, optimizer state, step, RNG) and the config.

Orbax writes each checkpoint into a temporary folder and renames it when complete, so a save cut
short (a crash, SIGKILL) is never listed as a step; such leftovers are removed on the next start.
Saves are synchronous: the train step donates the state's buffers right after.
"""

from __future__ import annotations

from pathlib import Path

import orbax.checkpoint as ocp


class Checkpoints:
    """The checkpoints in ``directory``, keeping the last ``keep``."""

    def __init__(self, directory: str | Path, keep: int):
        self._manager = ocp.CheckpointManager(
            Path(directory).absolute(),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
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

    def close(self) -> None:
        self._manager.close()
