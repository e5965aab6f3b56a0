"""Orbax checkpoints of the train state: save at chosen steps, keep the newest n, restore the latest.

A thin wrapper over `orbax.checkpoint.CheckpointManager` (no pickle). Saves are asynchronous;
`wait()` blocks until they are on disk (called before raising or exiting).
"""
from __future__ import annotations

import pathlib
from typing import Optional

import jax
import orbax.checkpoint as ocp

from sdejax.training.state import TrainState


class Checkpointer:
    """Checkpoints of `TrainState` under `directory`, named by step."""

    def __init__(self, directory: str | pathlib.Path, max_to_keep: Optional[int] = None):
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1 or None (keep all); got {max_to_keep}")
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
        self.manager = ocp.CheckpointManager(pathlib.Path(directory).absolute(), options=options)

    def save(self, state: TrainState) -> None:
        """Save `state` under its step (a no-op if that step is already saved)."""
        step = int(state.step)
        if step not in self.manager.all_steps():
            self.manager.save(step, args=ocp.args.StandardSave(state))

    def latest_step(self) -> Optional[int]:
        self.manager.wait_until_finished()
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        self.manager.wait_until_finished()
        return list(self.manager.all_steps())

    def restore(self, target: TrainState, step: Optional[int] = None) -> Optional[TrainState]:
        """The state saved at `step` (default: the latest) with the structure of `target`; None if none."""
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
        return self.manager.restore(step, args=ocp.args.StandardRestore(abstract))

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
