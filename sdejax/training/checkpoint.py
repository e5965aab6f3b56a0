"""Orbax checkpoints of a training run: train state, data-iterator position and the config.

One `orbax.checkpoint.CheckpointManager` (no pickle) under `<workdir>/checkpoints`, saving
asynchronously. Every save goes to a temporary directory that orbax renames into place only once
complete, so a run killed mid-save leaves a `<step>.orbax-checkpoint-tmp-*` directory that is never
listed or loaded; the next `Checkpointer` on the directory deletes such leftovers. Retention: the newest `keep` checkpoints
(the rolling preemption checkpoints) plus every multiple of `keep_period` (the snapshots).

Before every save the state is checked to be finite (NonFiniteError names the leaf), so a NaN
never replaces a good checkpoint. A restore into a config whose parameter shapes or tree differ
fails with a ValueError naming the mismatched parameter and the config keys that changed.
"""
from __future__ import annotations

import pathlib
import shutil
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from sdejax.training.state import TrainState

ITEMS = ("state", "data", "config")
# Keys that may change between a run and its resumption (schedules, logging, evaluation).
RUNTIME_KEYS = ("training.n_iters", "training.log_freq", "training.eval_freq", "training.snapshot_freq",
                "training.snapshot_freq_for_preemption", "training.snapshot_sampling", "training.n_jitted_steps",
                "training.keep_checkpoints", "training.parallelism", "eval.", "sampling.", "data.data_dir",
                "data.num_threads", "data.prefetch", "data.num_workers")


class NonFiniteError(FloatingPointError):
    """Training produced a NaN/inf loss, gradient or parameter; the state was not saved."""


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def config_diff(saved: dict, current: dict) -> list[str]:
    """'key: saved -> current' for every non-runtime config key that differs."""
    a, b = _flatten(saved), _flatten(current)
    keys = sorted(k for k in set(a) | set(b) if not k.startswith(RUNTIME_KEYS))
    return [f"{k}: {a.get(k, '<absent>')!r} (checkpoint) vs {b.get(k, '<absent>')!r} (config)"
            for k in keys if a.get(k) != b.get(k) and str(a.get(k)) != str(b.get(k))]


def _path(path: tuple) -> str:
    """'a/b/0' for a key path, whether its keys are dict keys, attributes or sequence indices (orbax
    stores dataclasses and named tuples as dicts)."""
    names = (getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path)
    return "/".join(str(n) for n in names)


def _nonfinite_leaves(tree: Any) -> list[str]:
    """Paths of the floating-point leaves that hold a NaN or inf."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    floats = [(p, x) for p, x in leaves if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)]
    flags = jax.device_get([jnp.all(jnp.isfinite(x)) for _, x in floats])
    return [jax.tree_util.keystr(p) for (p, _), ok in zip(floats, flags) if not ok]


def _remove_partial_saves(directory: pathlib.Path) -> None:
    """Delete the temporary directories of saves that never completed (process 0, then a barrier)."""
    if jax.process_index() == 0 and directory.is_dir():
        for path in directory.glob("*.orbax-checkpoint-tmp*"):
            shutil.rmtree(path, ignore_errors=True)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"sdejax-checkpoint-cleanup:{directory}")


class Checkpointer:
    """Checkpoints of (TrainState, data-iterator state, config) under `directory`, named by step."""

    def __init__(self, directory: str | pathlib.Path, keep: Optional[int] = 1, keep_period: Optional[int] = None,
                 config: Optional[dict] = None):
        if keep is not None and keep < 1:
            raise ValueError(f"keep (training.keep_checkpoints) must be >= 1 or None (keep all); got {keep}")
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, keep_period=keep_period or None, create=True,
                                               enable_async_checkpointing=True)
        handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
                    "config": ocp.JsonCheckpointHandler()}
        self.directory = pathlib.Path(directory).absolute()
        _remove_partial_saves(self.directory)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS,
                                             item_handlers=handlers)
        self.config = config or {}

    def save(self, state: TrainState, data_state: Optional[dict] = None, force: bool = False) -> bool:
        """Save at `state.step` (asynchronously) after checking every leaf is finite; False if that
        step is already saved."""
        step = int(state.step)
        if step in self.manager.all_steps():
            return False
        if bad := _nonfinite_leaves(state):
            raise NonFiniteError(f"non-finite values in {', '.join(bad[:5])} at step {step}; not saved. "
                                 f"Last good checkpoint: step {self.manager.latest_step()} (intact).")
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state or {}),
                                  config=ocp.args.JsonSave(self.config))
        return self.manager.save(step, args=args, force=force)

    def latest_step(self) -> Optional[int]:
        self.manager.wait_until_finished()
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        self.manager.wait_until_finished()
        return list(self.manager.all_steps())

    def restore(self, target: TrainState, step: Optional[int] = None,
                sharding: Optional[jax.sharding.Sharding] = None) -> Optional[tuple[TrainState, dict]]:
        """(state, data_state) saved at `step` (default: the latest) with the structure of `target`,
        placed with `sharding` (default: like `target`); None if there is no checkpoint."""
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        self._check_compatible(target, step)

        def abstract(x):
            return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding or getattr(x, "sharding", None))

        args = ocp.args.Composite(state=ocp.args.StandardRestore(jax.tree_util.tree_map(abstract, target)),
                                  data=ocp.args.JsonRestore())
        out = self.manager.restore(step, args=args)
        return out.state, dict(out.data or {})

    def _check_compatible(self, target: TrainState, step: int) -> None:
        """Raise ValueError naming the first parameter whose path or shape differs from the checkpoint."""
        saved = self.manager.item_metadata(step).state
        want = {_path(p): tuple(np.shape(x)) for p, x in jax.tree_util.tree_flatten_with_path(target)[0]}
        have = {_path(p): tuple(m.shape)
                for p, m in jax.tree_util.tree_flatten_with_path(saved)[0]}
        problems = [f"{k} is missing from the checkpoint" for k in want if k not in have]
        problems += [f"{k} is in the checkpoint but not in the model" for k in have if k not in want]
        problems += [f"{k} has shape {have[k]} in the checkpoint but {want[k]} in the model"
                     for k in want if k in have and have[k] != want[k]]
        if problems:
            saved_config = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config
            changed = config_diff(saved_config or {}, self.config)
            raise ValueError(
                f"checkpoint step {step} in {self.directory} does not match the config: {problems[0]}"
                + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
                + (f". Config keys that differ from the checkpoint's: {'; '.join(changed)}" if changed else "")
                + ". Use the checkpoint's config or a fresh --workdir.")

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
