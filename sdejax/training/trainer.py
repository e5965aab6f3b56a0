"""The training loop behind `sdejax --mode=train`: data-parallel over all devices of all processes
(`sdejax.training.parallel`), several steps per dispatch, orbax checkpoints (resuming from the
newest, data-iterator position included), logs, eval loss, snapshot samples, and the report after
training (`sdejax.training.modes`).
"""
from __future__ import annotations

import pathlib
import time
from typing import Any, Callable, Optional

import jax
import ml_collections
import numpy as np
from absl import logging
from tqdm.auto import tqdm

from sdejax.training import build, config as config_lib, modes, parallel, preemption, state as state_lib
from sdejax.training import step as step_lib, workdir_lock
from sdejax.training.build import Setup
from sdejax.training.checkpoint import NonFiniteError
from sdejax.training.writer import MetricWriter


def chunk_length(step: int, t: ml_collections.ConfigDict) -> int:
    """Steps until the next log/eval/snapshot/end event, at most `n_jitted_steps`."""
    freqs = [t.log_freq, t.eval_freq, t.snapshot_freq, t.snapshot_freq_for_preemption]
    nxt = min([t.n_iters] + [(step // f + 1) * f for f in freqs if f > 0])
    return min(nxt - step, t.get("n_jitted_steps", 1))


def _due(step: int, freq: int) -> bool:
    return freq > 0 and step % freq == 0


def check_finite(metrics: dict, first_step: int) -> None:
    """Raise NonFiniteError naming the first step whose loss or gradient norm is NaN/inf."""
    values = {k: np.asarray(metrics[k]) for k in ("loss", "grad_norm")}
    bad = np.zeros_like(values["loss"], bool)
    for v in values.values():
        bad |= ~np.isfinite(v)
    if bad.any():
        i = int(np.argmax(bad))
        which = ", ".join(f"{k} = {v[i]}" for k, v in values.items() if not np.isfinite(v[i]))
        raise NonFiniteError(
            f"non-finite {which} at training step {first_step + i}; training stopped without saving.")


def make_multi_step(s: Setup):
    """The placed `multi_step(state, batches) -> (state, metrics)` of the configured objective,
    optimizer, EMA (and consistency target θ⁻, `build.target_rate`), gradient accumulation and
    unrolling. A distillation teacher's parameters (`s.teacher_params`) are an argument of the
    compiled program, placed once: they travel beside the (donated) state and come back unchanged."""
    config, t = s.config, s.config.training
    accum = t.get("grad_accum_steps", 1)
    parallel.check_batch_size(t.batch_size, accum, s.placement)
    unroll = t.get("unroll_steps", None)
    unroll = jax.default_backend() == "cpu" if unroll is None else unroll  # see sdejax.training.step
    train_step = step_lib.make_train_step(s.objective(train=True), s.tx,
                                          config.model.ema_rate, ema_warmup=config.model.get("ema_warmup", False),
                                          grad_accum_steps=accum,
                                          axis_name=parallel.AXIS if s.placement.mode == "pmap" else None,
                                          unroll=unroll, target_rate=build.target_rate(config))
    multi_step = step_lib.make_multi_step(train_step, unroll)
    if s.teacher_params is None:
        return s.placement.compile(multi_step)

    def with_teacher(carry, batches):
        state, teacher_params = carry
        state, metrics = multi_step(state, batches, teacher_params)
        return (state, teacher_params), metrics

    # a copy of its own (from the host): the program donates it, and the setup's stay readable (eval, sampling)
    placed, held = s.placement.compile(with_teacher), [s.placement.replicate(jax.device_get(s.teacher_params))]

    def run(state, batches):
        (state, held[0]), metrics = placed((state, held[0]), batches)
        return state, metrics

    return run


class _Log:
    """Per-`log_freq` averages of the step metrics and throughput since the last record."""

    def __init__(self, config: ml_collections.ConfigDict, step: int):
        self.config, self.tick, self.tick_step, self.window = config, time.perf_counter(), step, []

    def record(self, step: int) -> dict:
        now = time.perf_counter()
        steps_per_s = (step - self.tick_step) / (now - self.tick)
        out = dict(loss=float(np.mean([np.mean(m["loss"]) for m in self.window])),
                   grad_norm=float(np.mean([np.mean(m["grad_norm"]) for m in self.window])),
                   learning_rate=float(state_lib.get_lr_schedule(self.config.optim)(step - 1)),
                   steps_per_s=steps_per_s, examples_per_s=steps_per_s * self.config.training.batch_size)
        self.tick, self.tick_step, self.window = now, step, []
        return out


def run_steps(s: Setup, workdir: pathlib.Path, writer: MetricWriter, watcher: preemption.PreemptionWatcher,
              heldout_metrics: Optional[Callable[[Any, int], dict]] = None) -> dict:
    """Steps from the restored state to `training.n_iters` (or a preemption), with checkpoints,
    logs, held-out metrics every `eval_freq` steps (`heldout_metrics(ema_params, step)`, default
    {"eval_loss": the objective on the held-out batch}) and snapshots; the final state is left in `s.state`."""
    t = s.config.training
    multi_step = make_multi_step(s)
    if heldout_metrics is None:
        eval_loss = modes.make_eval_loss(s)
        heldout_metrics = lambda params, step: {"eval_loss": eval_loss(params, step)}  # noqa: E731
    state, step = s.placement.replicate(s.state), int(s.state.step)
    if (idle := config_lib.nothing_to_train(step, t.n_iters)) is not None:
        logging.warning(idle)
    snapshot_sampling = t.get("snapshot_sampling", False) and t.snapshot_freq > 0
    monitor = modes.make_monitor(s.config) if snapshot_sampling else None
    log, last_loss, preempted = _Log(s.config, step), None, False
    with tqdm(total=t.n_iters, initial=step, desc="train", unit="step", disable=jax.process_index() > 0) as pbar:
        while step < t.n_iters and not preempted:
            k = chunk_length(step, t)
            new_state, metrics = multi_step(state, s.placement.shard_batches(s.data.chunk(step, k)))
            try:
                check_finite(metrics, step)
            except NonFiniteError as e:
                newest = s.checkpointer.latest_step()  # waits for the save in flight, verifies checksums
                raise NonFiniteError(f"{e} Newest intact checkpoint: "
                                     f"{'none' if newest is None else f'step {newest}'}.") from None
            state, step = new_state, step + k
            log.window.append(metrics)
            last_loss = float(np.mean(metrics["loss"]))  # mean over this dispatch's steps
            pbar.update(k)
            preempted = watcher.reached()
            record = heldout_metrics(s.placement.unreplicate(state).ema_params, step) if _due(step, t.eval_freq) else {}
            if _due(step, t.log_freq) or step == t.n_iters:
                record.update(log.record(step))
            if record:
                pbar.set_postfix({key: f"{v:.4g}" for key, v in record.items() if "loss" in key})
                logging.info("step %d: %s", step, record)
                writer.scalars(step, record)
            snapshot = _due(step, t.snapshot_freq)
            if snapshot or _due(step, t.snapshot_freq_for_preemption) or step == t.n_iters or preempted:
                s.state = s.placement.unreplicate(state)
                s.checkpointer.save(s.state, s.data.get_state(), force=preempted)
                if snapshot and snapshot_sampling:
                    modes.snapshot_samples(s, workdir, writer, monitor)
    s.checkpointer.wait()
    s.state = s.placement.unreplicate(state)
    return {"steps": step, "final_loss": last_loss, "preempted": preempted}


@workdir_lock.exclusive
def train_model(config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
                allow_config_change: tuple[str, ...] = ()) -> dict:
    """Train to `training.n_iters` (resuming from the latest checkpoint in `workdir`).

    Checkpoints: rolling ones every `snapshot_freq_for_preemption` steps (the newest
    `keep_checkpoints` kept), retained snapshots every `snapshot_freq` steps (with sample grids if
    `snapshot_sampling`), the final step, and on SIGTERM (all processes at the same step, then
    return with `preempted = True`). Logs to TensorBoard and `train_log.jsonl` every `log_freq`
    steps; eval loss every `eval_freq`. With `eval.after_training`, writes the eval/sampling report.
    """
    workdir = pathlib.Path(workdir)
    s = build.setup(config, workdir, allow_config_change)
    writer, watcher = MetricWriter(workdir), preemption.PreemptionWatcher()
    start = time.perf_counter()
    try:
        metrics = run_steps(s, workdir, writer, watcher)
    finally:
        watcher.close()
        writer.close()
    metrics["train_wall_s"] = time.perf_counter() - start
    if metrics["preempted"]:
        logging.warning("preempted: saved step %d; rerun the same command to resume", metrics["steps"])
    elif config.eval.get("after_training", False):
        metrics.update(modes.report(s, workdir))
        if jax.process_index() == 0:
            modes.write_json(workdir / "metrics.json", metrics)
    return metrics
