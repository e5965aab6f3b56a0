"""Data parallelism: 8 emulated CPU devices (jit + Mesh, pmap, gradient accumulation) and a real
two-process run (jax.distributed over gloo) reproduce the single-device trajectory.

The multi-device runs need XLA_FLAGS / jax.distributed set before JAX starts, so they run in
subprocesses (sharing the persistent compilation cache); the 1-device reference runs here.

Tolerance: every run draws the same batches and the same per-example noise (fold_in with the
global example index), so the runs differ only by float32 summation order in the gradient
all-reduce (relative rounding ~ sqrt(n) · 2^-24 ≈ 1e-6 on sums of n ≤ 64 terms). Adam's first
steps divide g by |g| per coordinate, which can amplify this for coordinates with |g| near
rounding noise; over 8 steps each coordinate moves at most 8 lr = 0.016, so params are compared
with atol 1e-5 (≈ 0.1% of one step) and rtol 1e-4; losses (means of 32 values) with rtol 1e-5.
"""
import json
import pathlib
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from configs_helper import TINY, tiny_config
from helpers import ROOT, free_port, subprocess_env
from sdejax.training import build, trainer

STEPS = 8
OVERRIDES = {"training.n_iters": STEPS, "training.n_jitted_steps": 2, "training.log_freq": 2,
             "training.eval_freq": 0, "training.snapshot_freq": 0, "training.snapshot_freq_for_preemption": 0,
             "training.batch_size": 32}
VARIANTS = {  # name -> overrides, run on 8 emulated devices
    "jit": {},
    "pmap": {"training.parallelism": "pmap"},
    "jit_accum": {"training.grad_accum_steps": 2},
    "pmap_accum": {"training.parallelism": "pmap", "training.grad_accum_steps": 2},
}


def config(**extra):
    return tiny_config(**{**OVERRIDES, **extra})


def trajectory(workdir: pathlib.Path) -> np.ndarray:
    lines = (workdir / "train_log.jsonl").read_text().splitlines()
    return np.array([json.loads(line)["loss"] for line in lines if "loss" in json.loads(line)])


def final_state(cfg, workdir):
    return jax.device_get(build.setup(cfg, workdir).state)


def assert_close(ref_dir, ref_cfg, other_dir, other_cfg):
    np.testing.assert_allclose(trajectory(other_dir), trajectory(ref_dir), rtol=1e-5)
    ref, other = final_state(ref_cfg, ref_dir), final_state(other_cfg, other_dir)
    assert int(other.step) == STEPS
    for name in ("params", "ema_params"):
        for (path, a), (_, b) in zip(*(jax.tree_util.tree_flatten_with_path(getattr(s, name))[0] for s in (ref, other))):
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5, err_msg=f"{name}{jax.tree_util.keystr(path)}")
    np.testing.assert_array_equal(other.rng, ref.rng)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("one_device")
    trainer.train_model(config(), workdir)
    assert len(trajectory(workdir)) == STEPS // 2
    return workdir


EIGHT_DEVICES = textwrap.dedent("""
    import sys, json
    import jax
    assert jax.device_count() == 8, jax.devices()
    from test_parallel import config, VARIANTS
    from sdejax.training import trainer
    for name, extra in VARIANTS.items():
        trainer.train_model(config(**extra), sys.argv[1] + "/" + name)
    print("ok")
""")


def test_eight_devices_match_one_device(reference, tmp_path):
    """jit+Mesh, pmap, and both with 2-way gradient accumulation, on 8 devices == 1 device."""
    out = subprocess.run([sys.executable, "-c", EIGHT_DEVICES, str(tmp_path)], cwd=ROOT, capture_output=True,
                         text=True, timeout=300,
                         env=subprocess_env(XLA_FLAGS="--xla_force_host_platform_device_count=8"))
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-4000:]
    for name, extra in VARIANTS.items():
        assert_close(reference, config(), tmp_path / name, config(**extra))


def test_two_processes_match_one_process(reference, tmp_path):
    """The CLI on two processes (one CPU device each, gloo collectives), each feeding its own half
    of every batch, writes the same checkpoint as one process."""
    port, workdir = free_port(), tmp_path / "two_proc"
    overrides = [f"--config.{k}={v}" for k, v in {**OVERRIDES, **_tiny_flags()}.items()]
    procs = [subprocess.Popen(
        [sys.executable, "-m", "sdejax.cli", f"--workdir={workdir}", f"--coordinator_address=127.0.0.1:{port}",
         "--num_processes=2", f"--process_id={i}", *overrides],
        cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, stderr) in zip(procs, outs):
        assert p.returncode == 0, stderr[-4000:]
    stdout = outs[0][0]  # process 0 prints the result (after gloo's connection messages)
    assert json.loads(stdout[stdout.index("{"):])["steps"] == STEPS and "{" not in outs[1][0]
    assert_close(reference, config(), workdir, config())


def _tiny_flags() -> dict:
    return {k: v for k, v in TINY.items() if k not in OVERRIDES}
