"""Preemption safety: a training process killed with SIGKILL, then one stopped by SIGTERM, resumed
each time, ends bitwise equal to an uninterrupted run (CPU), and so does one killed at random moments;
a half-written checkpoint is never loaded; a checkpoint restored into a changed config names the changed parameter.
"""
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from configs_helper import tiny_config
from helpers import ROOT, assert_states_equal, subprocess_env
from sdejax.training import build, checkpoint, trainer

OVERRIDES = {"training.n_iters": 60, "training.n_jitted_steps": 5, "training.log_freq": 10,
             "training.eval_freq": 0, "training.snapshot_freq": 30, "training.snapshot_freq_for_preemption": 10,
             "training.keep_checkpoints": 1}

# Runs the loop, announcing every save on stdout and pausing 0.5 s after it, so the parent can
# signal the process at a known point (while the asynchronous save may still be writing).
WORKER = textwrap.dedent("""
    import sys, time
    from test_preemption import config
    from sdejax.training import checkpoint, trainer
    save = checkpoint.Checkpointer.save
    def announced_save(self, state, *args, **kwargs):
        out = save(self, state, *args, **kwargs)
        print("saved", int(state.step), flush=True)
        time.sleep(0.5)
        return out
    checkpoint.Checkpointer.save = announced_save
    metrics = trainer.train_model(config(), sys.argv[1])
    print("done", metrics["steps"], metrics["preempted"], flush=True)
""")


# The same run with no pause: kills land wherever the process happens to be (a step, a save, a restore).
RANDOM_WORKER = WORKER.replace("        time.sleep(0.5)\n", "")


def config(**extra):
    return tiny_config(**{**OVERRIDES, **extra})


def run_until(workdir, step: int, sig: int, tmp_path) -> list[str]:
    """Start the worker, send `sig` once it announces the save of `step`; return its stdout lines."""
    with open(tmp_path / f"stderr_{sig}", "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", WORKER, str(workdir)], cwd=ROOT, env=subprocess_env(),
                                stdout=subprocess.PIPE, stderr=err, text=True)
        lines = []
        for line in proc.stdout:
            lines.append(line.strip())
            if line.strip() == f"saved {step}":
                proc.send_signal(sig)
        proc.wait(timeout=120)
    assert lines and lines[-1] != "done 60 False", f"the run finished before the signal: {lines}"
    return lines, proc.returncode


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("straight")
    trainer.train_model(config(), workdir)
    return workdir


def test_kill_and_sigterm_then_resume_is_bitwise_exact(straight, tmp_path):
    workdir = tmp_path / "run"
    lines, code = run_until(workdir, 20, signal.SIGKILL, tmp_path)
    assert code == -signal.SIGKILL and "done" not in lines[-1]
    # SIGKILL may have struck mid-save: whatever is listed must be complete; a fake half-written
    # later step (orbax's temporary-directory naming) must be ignored.
    half = workdir / "checkpoints" / "50.orbax-checkpoint-tmp-1234"
    shutil.copytree(workdir / "checkpoints" / "10", half)
    (half / "state" / "_METADATA").write_text("{truncated")
    steps = build.setup(config(), workdir).checkpointer.all_steps()
    assert 50 not in steps and max(steps) in (10, 20) and not half.exists()  # ignored, then deleted
    lines, code = run_until(workdir, 40, signal.SIGTERM, tmp_path)
    # SIGTERM during the pause after step 40: the next dispatch (5 steps) ends, saves, exits cleanly.
    assert code == 0 and lines[-2:] == ["saved 45", "done 45 True"], lines
    trainer.train_model(config(), workdir)
    s = build.setup(config(), workdir)
    assert s.checkpointer.all_steps() == [30, 60]  # snapshots kept, rolling checkpoints rotated
    assert_states_equal(s.state, build.setup(config(), straight).state)


def test_mismatched_config_names_the_parameter(straight, tmp_path):
    workdir = tmp_path / "copy"
    shutil.copytree(straight, workdir)
    with pytest.raises(ValueError, match=r"params/params/Dense_0/bias has shape \(16,\) in the checkpoint "
                                         r"but \(32,\) in the model.*model.features: 16 \(checkpoint\) vs 32"):
        build.setup(config(**{"model.features": 32}), workdir)


def test_nonfinite_state_is_never_saved(straight, tmp_path):
    s = build.setup(config(), straight)
    bad = s.state.replace(step=s.state.step + 1, ema_params=jax.tree_util.tree_map(lambda x: x * np.nan,
                                                                                   s.state.ema_params))
    with pytest.raises(checkpoint.NonFiniteError, match=r"non-finite values in .*ema_params.*at step 61; not saved"):
        s.checkpointer.save(bad)
    assert s.checkpointer.all_steps() == [30, 60]


def test_kill_at_random_moments_then_resume_is_bitwise_exact(straight, tmp_path):
    """SIGKILL at a random moment after the first save, twice (the moment drawn from U(0, 1.5 s),
    so it falls in steps, in asynchronous saves or in the restore of the next start), then a run to
    the end: the final state equals the uninterrupted run's bitwise."""
    workdir, rng, kills = tmp_path / "random", np.random.default_rng(0), 0
    for _ in range(8):
        proc = subprocess.Popen([sys.executable, "-c", RANDOM_WORKER, str(workdir)], cwd=ROOT, env=subprocess_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        first = proc.stdout.readline()
        if kills < 2 and first.startswith("saved"):
            time.sleep(rng.uniform(0.0, 1.5))
            proc.kill()
            kills += proc.wait(timeout=120) == -signal.SIGKILL
        out = proc.communicate(timeout=300)[0]
        if proc.returncode == 0 and f"done {OVERRIDES['training.n_iters']} False" in out:
            break
    assert kills == 2 and proc.returncode == 0, (kills, proc.returncode)
    assert_states_equal(build.setup(config(), workdir).state, build.setup(config(), straight).state)
