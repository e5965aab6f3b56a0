"""Orbax checkpoints of a training run: train state, data-iterator position and the config.

One `orbax.checkpoint.CheckpointManager` (no pickle) under `<workdir>/checkpoints`, saving
asynchronously; retention: the newest `keep` checkpoints (the rolling preemption checkpoints) plus
every multiple of `keep_period` (the snapshots). What cannot fool it:

- Half-written saves. Orbax writes each save into `<step>.orbax-checkpoint-tmp` and renames it
  into place once complete; before the rename the folder is sealed with the checksums of its files
  (`sdejax.training.integrity`). Leftover temporary folders are deleted only while holding the
  workdir lock (`sdejax.training.workdir_lock`), so no process deletes another's save in flight.
- Damage. Before a restore the newest step's checksums are verified. A damaged step (flipped bit,
  missing or garbage file, empty or partial folder) is reported with what is damaged, and the
  newest intact step is restored; the damaged folders are moved to `checkpoints/damaged/` (by the
  lock holder) so that training can write those steps again. With no intact step left the restore
  refuses (CheckpointDamagedError) and moves nothing: it never starts afresh over checkpoints.
  Folders with no checksums at all (saved before sdejax sealed them) are restored unverified, with
  a warning.
- NaN. Every state is checked to be finite before it is saved; NonFiniteError waits for the save
  in flight and names the newest intact step.
- A changed config. The config saved with the checkpoint is compared with the current one
  (`compare_configs`): a change to anything outside `MAY_CHANGE` (the model, SDE, preconditioning,
  objective, data, seed) refuses the restore listing the keys, unless the keys are named in
  `allow_config_change`. A changed parameter tree or shape is refused in any case.
"""
from __future__ import annotations

import itertools
import json
import pathlib
import shutil
from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from sdejax.training import integrity, workdir_lock
from sdejax.training.state import TrainState

ITEMS = ("state", "data", "config")
TMP_SUFFIX = ".orbax-checkpoint-tmp"
DAMAGED = "damaged"
# Config keys that may differ between a checkpoint and the run that restores it (a key, or a section
# prefix ending in "."): how long and how fast to train, what to log, evaluate and sample, where the
# data files are read from. Everything else defines the model, SDE, preconditioning, objective or data.
MAY_CHANGE = (
    "training.n_iters", "training.log_freq", "training.eval_freq", "training.snapshot_freq",
    "training.snapshot_freq_for_preemption", "training.snapshot_sampling", "training.snapshot_num_samples",
    "training.digits_monitor", "training.keep_checkpoints", "training.n_jitted_steps", "training.unroll_steps",
    "training.parallelism", "training.grad_accum_steps",
    "optim.lr", "optim.warmup", "optim.grad_clip", "model.ema_rate", "model.ema_warmup",
    "model.flax_checkpoint", "superres.aug_level", "superres.base_workdir",
    "eval.", "sampling.", "classifier.",
    "data.data_dir", "data.download", "data.num_threads", "data.prefetch", "data.num_workers",
)
_ABSENT = "<absent>"


class NonFiniteError(FloatingPointError):
    """Training produced a NaN/inf loss, gradient or parameter; the state was not saved."""


class CheckpointDamagedError(RuntimeError):
    """The checkpoint asked for is damaged, or no intact checkpoint is left."""


class ConfigChangedError(ValueError):
    """The config differs from the checkpoint's in keys that define the run."""


class ConfigChange(NamedTuple):
    key: str
    saved: Any
    current: Any

    def __str__(self) -> str:
        return f"{self.key}: {self.saved!r} (checkpoint) vs {self.current!r} (config)"


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def _matches(key: str, patterns: Sequence[str]) -> bool:
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in patterns)


def _same(a: Any, b: Any) -> bool:
    return a == b and isinstance(a, bool) == isinstance(b, bool)


def compare_configs(saved: dict, current: dict) -> list[ConfigChange]:
    """The keys outside `MAY_CHANGE` whose values differ (or exist on one side only), sorted; both
    configs are compared as JSON (tuples and lists alike)."""
    a, b = (_flatten(json.loads(json.dumps(c, default=str))) for c in (saved, current))
    keys = sorted(k for k in set(a) | set(b) if not _matches(k, MAY_CHANGE))
    return [ConfigChange(k, a.get(k, _ABSENT), b.get(k, _ABSENT)) for k in keys
            if k not in a or k not in b or not _same(a[k], b[k])]


def check_config_unchanged(saved: dict, current: dict, allow: Sequence[str] = (), where: str = "the checkpoint") \
        -> list[ConfigChange]:
    """Raise ConfigChangedError listing the changes (`compare_configs`) not named in `allow` (keys or
    section prefixes ending in "."); return the allowed ones, which are logged."""
    changes = compare_configs(saved, current)
    refused = [c for c in changes if not _matches(c.key, allow)]
    if refused:
        keys = ",".join(c.key for c in refused)
        raise ConfigChangedError(
            f"the config differs from the one saved with {where} in keys that define the model, SDE, "
            f"preconditioning, objective or data: {'; '.join(map(str, refused))}. Restore those values, use a "
            f"fresh --workdir, or, if the change is deliberate, pass --allow_config_change={keys}")
    for change in changes:
        logging.warning("config change allowed by allow_config_change: %s", change)
    return changes


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


def _from_process_0(value: int) -> int:
    """`value` as process 0 has it (every process must call this)."""
    if jax.process_count() == 1:
        return value
    return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _step_folders(directory: pathlib.Path) -> list[int]:
    """Steps that have a folder (complete or not), newest first."""
    if not directory.is_dir():
        return []
    return sorted((int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit()), reverse=True)


def _remove_partial_saves(directory: pathlib.Path) -> None:
    """Delete the temporary folders of saves that never completed, if this process holds the workdir
    lock or can take it (process 0, then a barrier)."""
    if jax.process_index() == 0 and directory.is_dir():
        with workdir_lock.exclusive_access(directory.parent) as exclusive:
            for path in directory.glob(f"*{TMP_SUFFIX}*") if exclusive else ():
                shutil.rmtree(path, ignore_errors=True)
    _barrier(f"sdejax-checkpoint-cleanup:{directory}")


def _move_aside(directory: pathlib.Path, step: int) -> pathlib.Path:
    """Move the folder of `step` to `damaged/<step>` (or `<step>-1`, ... if taken); its new path."""
    target = directory / DAMAGED
    target.mkdir(exist_ok=True)
    names = (f"{step}-{i}" if i else str(step) for i in itertools.count())
    dest = next(target / name for name in names if not (target / name).exists())
    shutil.move(str(directory / str(step)), str(dest))
    return dest


class Checkpointer:
    """Checkpoints of (TrainState, data-iterator state, config) under `directory`, named by step.

    `config` (a dict) is saved with every checkpoint and compared with the saved one on restore
    (None: neither); `allow_config_change` names the keys that may nonetheless differ."""

    def __init__(self, directory: str | pathlib.Path, keep: Optional[int] = 1, keep_period: Optional[int] = None,
                 config: Optional[dict] = None, allow_config_change: Sequence[str] = ()):
        if keep is not None and keep < 1:
            raise ValueError(f"keep (training.keep_checkpoints) must be >= 1 or None (keep all); got {keep}")
        self.directory = pathlib.Path(directory).absolute()
        self.config, self.allow_config_change = config, tuple(allow_config_change)
        self._in_flight: Optional[int] = None
        self._verdicts: dict[int, Optional[str]] = {}  # step -> what is damaged (None: intact)
        self._reported: set[int] = set()  # damaged steps already logged
        _remove_partial_saves(self.directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, keep_period=keep_period or None, create=True, enable_async_checkpointing=True,
            async_options=ocp.AsyncOptions(post_finalization_callback=self._seal))
        handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
                    "config": ocp.JsonCheckpointHandler()}
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS,
                                             item_handlers=handlers)

    def _seal(self) -> None:
        """orbax's post-finalization callback (process 0, in the save thread, before the rename):
        write the checksums into the folder of the save in flight."""
        step = self._in_flight
        tmp = self.directory / f"{step}{TMP_SUFFIX}"
        integrity.seal(tmp if tmp.is_dir() else self.directory / str(step), step)
        self._verdicts[step] = None

    def save(self, state: TrainState, data_state: Optional[dict] = None, force: bool = False) -> bool:
        """Save at `state.step` (asynchronously, once the previous save is complete) after checking
        every leaf is finite; False if that step is already saved."""
        step = int(state.step)
        self.wait()
        if step in self.manager.all_steps():
            return False
        if bad := _nonfinite_leaves(state):
            newest = self.latest_step()
            raise NonFiniteError(f"non-finite values in {', '.join(bad[:5])} at step {step}; not saved. Newest "
                                 f"intact checkpoint: {'none' if newest is None else f'step {newest}'} in "
                                 f"{self.directory}.")
        self._in_flight = step
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state or {}),
                                  config=ocp.args.JsonSave(self.config or {}))
        return self.manager.save(step, args=args, force=force)

    def latest_step(self) -> Optional[int]:
        """The newest intact step (None if there is none); damaged newer steps are reported."""
        return self._newest_intact()[0]

    def all_steps(self) -> list[int]:
        self.wait()
        return list(self.manager.all_steps())

    def restore(self, target: TrainState, step: Optional[int] = None,
                sharding: Optional[jax.sharding.Sharding] = None) -> Optional[tuple[TrainState, dict]]:
        """(state, data_state) saved at `step` (default: the newest intact one) with the structure of
        `target`, placed with `sharding` (default: like `target`); None if there is no checkpoint.
        Raises CheckpointDamagedError (damage), ValueError (parameter tree or shapes differ) or
        ConfigChangedError (the config differs beyond `MAY_CHANGE` and `allow_config_change`)."""
        if step is None:
            step, damaged = self._newest_intact()
            if step is None and damaged:
                raise CheckpointDamagedError(
                    f"no intact checkpoint in {self.directory}: {damaged}. Not starting afresh over them: move or "
                    "delete those step folders yourself, or use a fresh --workdir.")
            if step is None:
                return None
        elif (problem := self._verdict(step)) is not None:
            raise CheckpointDamagedError(f"checkpoint step {step} in {self.directory} is damaged: {problem}")
        self._check_compatible(target, step)
        if self.config is not None:
            check_config_unchanged(self._saved_config(step), self.config, self.allow_config_change,
                                   f"checkpoint step {step} in {self.directory}")

        def abstract(x):
            return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding or getattr(x, "sharding", None))

        args = ocp.args.Composite(state=ocp.args.StandardRestore(jax.tree_util.tree_map(abstract, target)),
                                  data=ocp.args.JsonRestore())
        out = self.manager.restore(step, args=args)
        return out.state, dict(out.data or {})

    def _verdict(self, step: int, legacy: bool = False) -> Optional[str]:
        """What is damaged in the folder of `step` (None: intact), verified once. `legacy`: no step
        here carries checksums, so an unsealed folder is accepted (unverified, with a warning)."""
        if step not in self._verdicts:
            problem = integrity.verify(self.directory / str(step), step)
            if legacy and problem == integrity.UNSEALED:
                logging.warning("checkpoint step %d in %s carries no checksums (saved before sdejax sealed "
                                "checkpoints): restoring it unverified", step, self.directory)
                problem = None
            self._verdicts[step] = problem
        return self._verdicts[step]

    def _newest_intact(self) -> tuple[Optional[int], str]:
        """(newest intact step or None, report of the damaged newer steps or ""), decided by process 0.
        The damaged steps are logged and, when an intact one exists and the workdir lock is free or
        ours, moved to `damaged/`."""
        self.wait()
        newest, damaged = None, {}
        if jax.process_index() == 0:
            steps = _step_folders(self.directory)
            legacy = not any(integrity.is_sealed(self.directory / str(s)) for s in steps)
            for s in steps:
                if (problem := self._verdict(s, legacy)) is None:
                    newest = s
                    break
                damaged[s] = problem
        newest = None if (agreed := _from_process_0(-1 if newest is None else newest)) < 0 else agreed
        has_damage = bool(_from_process_0(bool(damaged)))
        report = "; ".join(f"step {s}: {p}" for s, p in damaged.items())
        if has_damage and not report:
            report = "see process 0's log"
        if has_damage and newest is not None:
            self._set_aside(damaged, newest)
        return newest, report

    def _set_aside(self, damaged: dict[int, str], newest: int) -> None:
        """Report the damaged steps newer than `newest` (once each) and move them to `damaged/` if the
        workdir lock is free or ours (process 0); then every process rereads the folder."""
        moved = False
        if jax.process_index() == 0:
            with workdir_lock.exclusive_access(self.directory.parent) as exclusive:
                for s, problem in damaged.items():
                    where = f"moved to {_move_aside(self.directory, s)}" if exclusive else "left in place"
                    if s not in self._reported:
                        logging.warning("checkpoint step %d in %s is damaged: %s; %s. Using step %d, the newest "
                                        "intact checkpoint.", s, self.directory, problem, where, newest)
                    self._reported.add(s)
                moved = exclusive
        if _from_process_0(moved):
            _barrier(f"sdejax-checkpoint-set-aside:{self.directory}")
            self.manager.reload()

    def _saved_config(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config or {}

    def saved_config(self, step: int) -> dict:
        """The config (a dict) saved with the checkpoint at `step` ({} if none was saved)."""
        return self._saved_config(step)

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
            changed = [] if self.config is None else compare_configs(self._saved_config(step), self.config)
            listed = "; ".join(map(str, changed))
            raise ValueError(
                f"checkpoint step {step} in {self.directory} does not match the config: {problems[0]}"
                + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
                + (f". Config keys that differ from the checkpoint's: {listed}" if changed else "")
                + ". Use the checkpoint's config or a fresh --workdir.")

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
