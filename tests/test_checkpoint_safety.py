"""Checkpoints that cannot be fooled (issue 14, section 3), each fault injected for real:

- two training processes on one workdir: one runs, the other fails at once naming the holder; a
  lock left by a killed run is taken over with a warning; nobody deletes another's save in flight;
- a damaged newest checkpoint (flipped bit, deleted or garbage metadata, garbage checksum file,
  empty or partial newer folder) is reported and the run resumes from the newest intact one,
  ending bitwise equal to the undamaged run; with nothing intact it refuses and moves nothing;
- a non-finite state at save time waits for the save in flight and names the true newest intact step;
- a changed SDE / prediction / schedule parameter is refused on resume and in sample mode (listing
  the keys), allowed with the override; a changed learning rate passes.
"""
import json
import logging
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from configs_helper import TINY, tiny_config
from helpers import ROOT, assert_states_equal, run_cli, subprocess_env
from sdejax.training import build, checkpoint, integrity, modes, trainer, workdir_lock

STEPS = (10, 20, 30)
OVERRIDES = {"training.n_iters": 30, "training.keep_checkpoints": 3, "training.eval_freq": 0}
IN_FLIGHT = "99.orbax-checkpoint-tmp"  # stands for another process's save being written

# A training run that, at its first save, marks a save in flight, announces "holding <pid>" and
# waits until the file argv[2] exists (so the parent controls how long it holds the workdir).
WORKER = textwrap.dedent(f"""
    import os, pathlib, sys, time
    from test_checkpoint_safety import config
    from sdejax.training import checkpoint, trainer
    release = pathlib.Path(sys.argv[2])
    save = checkpoint.Checkpointer.save
    def held_save(self, state, *args, **kwargs):
        (self.directory / "{IN_FLIGHT}").mkdir(exist_ok=True)
        print("holding", os.getpid(), flush=True)
        while not release.exists():
            time.sleep(0.05)
        return save(self, state, *args, **kwargs)
    checkpoint.Checkpointer.save = held_save
    trainer.train_model(config(), sys.argv[1])
    print("done", flush=True)
""")


def config(**extra):
    return tiny_config(**{**OVERRIDES, **extra})


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An undamaged run with checkpoints at steps 10, 20, 30 (never modified by the tests)."""
    workdir = tmp_path_factory.mktemp("straight")
    trainer.train_model(config(), workdir)
    return workdir


@pytest.fixture(scope="module")
def states(straight):
    """The undamaged state of every step."""
    s = build.setup(config(), straight)
    return {step: jax.device_get(s.checkpointer.restore(s.state, step=step)[0]) for step in STEPS}


def copy(straight, tmp_path) -> pathlib.Path:
    workdir = tmp_path / "run"
    shutil.copytree(straight, workdir)
    return workdir


def worker(workdir, release, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WORKER, str(workdir), str(release)], cwd=ROOT,
                            env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def wait_for_line(proc: subprocess.Popen, prefix: str) -> str:
    for line in proc.stdout:
        if line.startswith(prefix):
            return line.strip()
    raise AssertionError(f"the worker exited ({proc.wait()}) before printing {prefix!r}: {proc.stderr.read()[-3000:]}")


# --- one process per workdir ---------------------------------------------------------------------

def test_two_runs_started_together_one_fails_naming_the_other(tmp_path):
    """Both start at once; the one that loses the lock exits with an error naming the winner's pid
    while the winner is still blocked at its first save; then the winner completes alone."""
    workdir, release = tmp_path / "shared", tmp_path / "release"
    procs = [worker(workdir, release) for _ in range(2)]
    try:
        deadline = time.monotonic() + 120
        while all(p.poll() is None for p in procs):
            assert time.monotonic() < deadline, "neither run failed: both hold the workdir"
            time.sleep(0.1)
        loser, winner = procs if procs[0].poll() is not None else procs[::-1]
        stderr = loser.stderr.read()
        assert loser.returncode != 0 and winner.poll() is None
        assert "WorkdirLockedError" in stderr and f"in use by pid {winner.pid} on host" in stderr, stderr[-3000:]
        release.touch()
        out, err = winner.communicate(timeout=120)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert winner.returncode == 0 and out.strip().endswith("done"), err[-3000:]
    steps = [line for line in (workdir / "train_log.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(steps) == 3  # one run's log lines (steps 10, 20, 30), not two interleaved
    assert (workdir / workdir_lock.LOCK_FILE).read_text() == ""  # released


def test_locked_workdir_is_refused_and_a_killed_holder_is_taken_over(straight, tmp_path, caplog):
    """While a run holds the workdir (a save of its in flight), a second training run fails at once
    naming it, and a reader (eval/sample setup) leaves its save in flight alone. Once the holder is
    killed with SIGKILL, its lock is recognised as stale and taken over with a warning, its
    half-written save is cleaned up, and the resumed run ends bitwise equal to an undamaged one."""
    workdir, release = tmp_path / "run", tmp_path / "release"
    holder = worker(workdir, release)
    try:
        pid = int(wait_for_line(holder, "holding").split()[1])
        start = time.perf_counter()
        with pytest.raises(workdir_lock.WorkdirLockedError, match=rf"in use by pid {pid} on host "):
            trainer.train_model(config(), workdir)
        assert time.perf_counter() - start < 1.0  # refused before building anything
        build.setup(config(), workdir)
        assert (workdir / "checkpoints" / IN_FLIGHT).is_dir()
    finally:
        holder.kill()
        holder.wait()
    assert holder.returncode == -signal.SIGKILL
    with caplog.at_level(logging.WARNING):
        trainer.train_model(config(), workdir)
    assert f"taking over the lock {workdir / workdir_lock.LOCK_FILE}: its holder pid {pid} on host" in caplog.text
    assert not (workdir / "checkpoints" / IN_FLIGHT).exists()
    assert_states_equal(build.setup(config(), workdir).state, build.setup(config(), straight).state)


def test_lock_from_another_host_is_not_taken_over(tmp_path):
    lock = tmp_path / workdir_lock.LOCK_FILE
    lock.write_text('{"host": "elsewhere", "pid": 1, "started": "yesterday", "command": "sdejax"}')
    with pytest.raises(workdir_lock.WorkdirLockedError, match=rf"pid 1 on host elsewhere .* delete {lock}"):
        workdir_lock.WorkdirLock(tmp_path).acquire()


# --- damaged checkpoints -------------------------------------------------------------------------

def flip_bit(path: pathlib.Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def largest_array_file(step_dir: pathlib.Path) -> pathlib.Path:
    return max((step_dir / "state").rglob("ocdbt.process_0/d/*"), key=lambda p: p.stat().st_size)


def partial_folder(ckpt: pathlib.Path) -> None:
    """A newer step folder holding the state of step 30 only (a save cut short, or a careless copy)."""
    shutil.copytree(ckpt / "30" / "state", ckpt / "40" / "state")


DAMAGE = {  # name: (inject into <workdir>/checkpoints, step that must be restored, the report)
    "flipped_bit": (lambda c: flip_bit(largest_array_file(c / "30")), 20,
                    r"step 30 .* is damaged: state/ocdbt.process_0/d/\w+ differs from its checksum"),
    "deleted_metadata": (lambda c: (c / "30" / "state" / "_METADATA").unlink(), 20,
                         r"step 30 .* is damaged: state/_METADATA is missing"),
    "garbage_metadata": (lambda c: (c / "30" / "state" / "_METADATA").write_text("{garbage"), 20,
                         r"step 30 .* is damaged: state/_METADATA differs from its checksum"),
    "garbage_step_metadata": (lambda c: (c / "30" / "_CHECKPOINT_METADATA").write_text("\x00{"), 20,
                              r"step 30 .* is damaged: _CHECKPOINT_METADATA is unreadable \(JSONDecodeError"),
    "garbage_checksums": (lambda c: (c / "30" / integrity.CHECKSUM_FILE).write_text("not json"), 20,
                          r"step 30 .* is damaged: its checksum file sdejax_checksums.json is unreadable"),
    "deleted_data_state": (lambda c: (c / "30" / "data" / "metadata").unlink(), 20,
                           r"step 30 .* is damaged: data/metadata is missing"),
    "empty_newer_folder": (lambda c: (c / "40").mkdir(), 30, r"step 40 .* is damaged: the folder is empty"),
    "partial_newer_folder": (partial_folder, 30, r"step 40 .* is damaged: it has no checksum file"),
}


@pytest.mark.parametrize("name", list(DAMAGE))
def test_damaged_newest_is_reported_and_the_newest_intact_restored(name, straight, states, tmp_path, caplog):
    inject, good_step, report = DAMAGE[name]
    workdir = copy(straight, tmp_path)
    ckpt = workdir / "checkpoints"
    inject(ckpt)
    damaged_step = 40 if good_step == 30 else 30
    with caplog.at_level(logging.WARNING):
        s = build.setup(config(), workdir)
    assert_states_equal(s.state, states[good_step])
    assert caplog.text.count("is damaged") == 1
    moved = re.escape(f"; moved to {ckpt / 'damaged' / str(damaged_step)}. Using step {good_step}, the newest intact")
    assert re.search(report + ".*" + moved, caplog.text), caplog.text
    assert not (ckpt / str(damaged_step)).exists() and (ckpt / "damaged" / str(damaged_step)).is_dir()


def test_resume_after_a_flipped_bit_ends_bitwise_equal(straight, states, tmp_path, caplog):
    """Steps 20 -> 30 are trained again and saved where the damaged step 30 was."""
    workdir = copy(straight, tmp_path)
    flip_bit(largest_array_file(workdir / "checkpoints" / "30"))
    with caplog.at_level(logging.WARNING):
        metrics = trainer.train_model(config(), workdir)
    assert metrics["steps"] == 30 and "step 30" in caplog.text and "is damaged" in caplog.text
    s = build.setup(config(), workdir)
    assert s.checkpointer.all_steps() == list(STEPS)
    assert integrity.verify(workdir / "checkpoints" / "30", 30) is None
    assert_states_equal(s.state, states[30])


def test_sample_mode_uses_the_newest_intact_checkpoint(straight, tmp_path, caplog):
    workdir = copy(straight, tmp_path)
    (workdir / "checkpoints" / "30" / "state" / "_METADATA").unlink()
    with caplog.at_level(logging.WARNING):
        out = modes.run_sample(config(**{"eval.num_samples": 8}), workdir)
    assert out["step"] == 20 and "step 30" in caplog.text and "_METADATA is missing" in caplog.text


def test_nothing_intact_refuses_and_moves_nothing(straight, tmp_path):
    workdir = copy(straight, tmp_path)
    for step in STEPS:
        (workdir / "checkpoints" / str(step) / "state" / "_METADATA").write_text("{}")
    for _ in range(2):  # refused again: the damaged steps were not moved out of the way
        with pytest.raises(checkpoint.CheckpointDamagedError,
                           match=r"no intact checkpoint in .*: step 30: state/_METADATA differs .*; step 20: .*; "
                                 r"step 10: .*Not starting afresh"):
            trainer.train_model(config(), workdir)
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == list(STEPS)


def test_checkpoints_without_any_checksums_are_restored_unverified(straight, states, tmp_path, caplog):
    workdir = copy(straight, tmp_path)
    for step in STEPS:
        (workdir / "checkpoints" / str(step) / integrity.CHECKSUM_FILE).unlink()
    with caplog.at_level(logging.WARNING):
        s = build.setup(config(), workdir)
    assert_states_equal(s.state, states[30])
    assert "step 30" in caplog.text and "carries no checksums" in caplog.text


# --- non-finite state at save time ---------------------------------------------------------------

def nan_state(state, step):
    return state.replace(step=np.int32(step), ema_params=jax.tree_util.tree_map(lambda x: x * np.nan,
                                                                                  state.ema_params))


def test_nonfinite_save_waits_for_the_save_in_flight(states, tmp_path):
    """A good save of step 31 is in flight when the NaN state of step 32 arrives: the error names
    step 31, which is complete and sealed when the error is raised (no temporary folder left)."""
    ckpt = checkpoint.Checkpointer(tmp_path / "checkpoints", keep=3, config=config().to_dict())
    ckpt.save(states[30].replace(step=np.int32(31)))
    with pytest.raises(checkpoint.NonFiniteError, match=r"ema_params.* at step 32; not saved. Newest intact checkpoint: "
                                                  r"step 31 in "):
        ckpt.save(nan_state(states[30], 32))
    assert not list((tmp_path / "checkpoints").glob("*tmp*"))
    assert integrity.verify(tmp_path / "checkpoints" / "31", 31) is None


def test_nonfinite_save_names_the_newest_intact_step_not_a_damaged_one(straight, states, tmp_path):
    workdir = copy(straight, tmp_path)
    flip_bit(largest_array_file(workdir / "checkpoints" / "30"))
    ckpt = checkpoint.Checkpointer(workdir / "checkpoints", keep=3, config=config().to_dict())
    with pytest.raises(checkpoint.NonFiniteError, match=r"at step 31; not saved. Newest intact checkpoint: step 20 in"):
        ckpt.save(nan_state(states[30], 31))


# --- config changes ------------------------------------------------------------------------------

def test_compare_configs_lists_what_defines_the_run():
    saved = {"training": {"sde": "vpsde", "n_iters": 10, "continuous": True}, "model": {"features": (16, 16)},
             "optim": {"lr": 1e-3, "beta1": 0.9}, "eval": {"num_samples": 4}, "seed": 1}
    current = {"training": {"sde": "vesde", "n_iters": 99, "continuous": 1}, "model": {"features": [16, 16],
               "precond": "edm"}, "optim": {"lr": 5e-4, "beta1": 0.9}, "eval": {"num_samples": 8}, "seed": 1}
    assert [str(c) for c in checkpoint.compare_configs(saved, current)] == [
        "model.precond: '<absent>' (checkpoint) vs 'edm' (config)",
        "training.continuous: True (checkpoint) vs 1 (config)",
        "training.sde: 'vpsde' (checkpoint) vs 'vesde' (config)"]
    assert checkpoint.compare_configs(saved, saved) == []
    allowed = checkpoint.check_config_unchanged(saved, current, allow=("training.", "model.precond"))
    assert [c.key for c in allowed] == ["model.precond", "training.continuous", "training.sde"]
    with pytest.raises(checkpoint.ConfigChangedError, match=r"training.sde: 'vpsde' \(checkpoint\) vs 'vesde'.*"
                                                            r"--allow_config_change=training.continuous,training.sde$"):
        checkpoint.check_config_unchanged(saved, current, allow=("model.",))


@pytest.mark.parametrize("key,value,old", [("training.sde", "vesde", "vpsde"), ("model.prediction", "score", "eps"),
                                           ("training.likelihood_weighting", True, False)])
def test_resume_with_a_changed_definition_is_refused(key, value, old, straight, tmp_path):
    workdir = copy(straight, tmp_path)
    with pytest.raises(checkpoint.ConfigChangedError,
                       match=rf"{key}: {old!r} \(checkpoint\) vs {value!r} \(config\).*--allow_config_change={key}$"):
        trainer.train_model(config(**{key: value, "training.n_iters": 40}), workdir)
    assert build.setup(config(), workdir).checkpointer.all_steps() == list(STEPS)  # nothing written


def test_sample_mode_with_a_changed_sde_is_refused_unless_allowed(straight, tmp_path, monkeypatch, capsys):
    workdir = copy(straight, tmp_path)
    changed = config(**{"model.beta_max": 5.0, "eval.num_samples": 8})
    with pytest.raises(checkpoint.ConfigChangedError, match=r"model.beta_max: 20.0 \(checkpoint\) vs 5.0 \(config\)"):
        modes.run_sample(changed, workdir)
    settings = {**TINY, **OVERRIDES, "model.beta_max": 5.0, "eval.num_samples": 8}
    flags = [f"--config.{k}={v}" for k, v in settings.items()]
    run_cli(monkeypatch, f"--workdir={workdir}", "--mode=sample", "--allow_config_change=model.beta_max", *flags)
    assert np.load(workdir / "samples" / "samples_30.npz")["samples"].shape == (8, 2)
    capsys.readouterr()


def test_deliberate_change_on_resume_is_allowed_with_the_override(straight, tmp_path, caplog):
    workdir = copy(straight, tmp_path)
    changed = config(**{"model.prediction": "score", "training.n_iters": 40})
    with caplog.at_level(logging.WARNING):
        assert trainer.train_model(changed, workdir, allow_config_change=("model.prediction",))["steps"] == 40
    assert "allowed by allow_config_change: model.prediction: 'eps' (checkpoint) vs 'score'" in caplog.text
    assert build.setup(changed, workdir).state.step == 40  # the new config was saved: no override needed now


def test_changed_learning_rate_and_length_resume(straight, tmp_path):
    """Allowed changes pass, and take effect: the steps after the resume log the new learning rate."""
    workdir = copy(straight, tmp_path)
    assert trainer.train_model(config(**{"optim.lr": 1e-4, "training.n_iters": 40}), workdir)["steps"] == 40
    last = json.loads((workdir / "train_log.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 40 and last["learning_rate"] == pytest.approx(1e-4)
