"""The digits config end to end from the CLI through TFDS (offline, a temporary data_dir): train
with snapshot sampling, TensorBoard and a checkpointed data-iterator position; eval (bits/dim on
the test split); sample (image grid); fid_stats and eval with sampling (FID/KID/IS through the
Inception network, here with the fixture's synthetic weights), then the same eval on two processes
(gloo), which must find the same samples and numbers. A tiny U-Net and 2 steps keep it cheap; the
maths of each piece is tested elsewhere, here the wiring, the outputs' ranges and the invariance to
the number of hosts.
"""
import json
import math
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from helpers import ROOT, free_port, run_cli, subprocess_env
from inception_helper import regenerate_state_dict
from sdejax.evaluation import inception_weights, metrics, stats_file

CONFIG = ROOT / "configs" / "digits_ddpmpp.py"
TINY = {"training.n_iters": 2, "training.n_jitted_steps": 1, "training.batch_size": 8, "training.log_freq": 1,
        "training.eval_freq": 2, "training.snapshot_freq": 2, "training.snapshot_num_samples": 4,
        "model.nf": 16, "model.ch_mult": "(1,)", "model.num_res_blocks": 1, "model.attn_resolutions": "()",
        "model.num_scales": 25, "eval.num_samples": 4, "eval.batch_size": 10, "eval.num_bpd_batches": 1,
        "eval.rtol": 1e-2, "eval.atol": 1e-2}


def test_digits_train_eval_sample(tmp_path, monkeypatch, capsys, fixtures_dir):
    workdir = tmp_path / "run"
    flags = [f"--workdir={workdir}", f"--config.data.data_dir={tmp_path / 'tfds'}",
             *(f"--config.{k}={v}" for k, v in TINY.items())]
    run_cli(monkeypatch, *flags, "--mode=train", config=CONFIG)
    data_state = json.loads((workdir / "checkpoints" / "2" / "data" / "metadata").read_text())
    assert data_state == {"next_index": 2}  # the grain iterator's position is checkpointed
    log = [json.loads(line) for line in (workdir / "train_log.jsonl").read_text().splitlines()]
    last = [r for r in log if "loss" in r][-1]
    assert {"loss", "grad_norm", "learning_rate", "steps_per_s", "examples_per_s"} <= set(last)
    assert last["step"] == 2 and np.isfinite(last["loss"]) and "eval_loss" in last
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    grid = np.asarray(Image.open(workdir / "samples" / "snapshot_2.png"))
    assert grid.shape == (2 * 17 + 1, 2 * 17 + 1)  # 4 samples of 16x16, 1-pixel borders
    # The config's in-training monitor scored the snapshot (an untrained model: far from the digits).
    monitored = [r for r in log if "samples/digits_frechet_distance" in r]
    assert [r["step"] for r in monitored] == [2] and monitored[0]["samples/digits_frechet_distance"] > 0

    run_cli(monkeypatch, *flags, "--mode=eval", config=CONFIG)
    bpd = json.loads((workdir / "eval_metrics.json").read_text())["heldout"]
    # Any density on [-1, 1]^D: bits/dim = −log2 p/D − 1 + log2 17 (data_range (−1, 1), 17 levels);
    # an untrained network's is finite and above 0; one batch of 10 test digits.
    assert bpd["num_points"] == 10 and math.isfinite(bpd["bits_per_dim"]) and bpd["bits_per_dim"] > 0

    run_cli(monkeypatch, *flags, "--mode=sample", config=CONFIG)
    samples = np.load(workdir / "samples" / "samples_2.npz")["samples"]
    assert samples.shape == (4, 16, 16, 1) and np.all(np.isfinite(samples))
    assert (workdir / "samples" / "samples_2.png").is_file()

    weights = tmp_path / "inception.npz"
    inception_weights.save_state_dict(regenerate_state_dict(fixtures_dir / "inception_fid" / "params_spec.json"),
                                      weights)
    # 25 samples in batches of 10 (the last one trimmed); KID on the first 15 of them.
    fid_flags = [*flags, f"--config.eval.inception_weights={weights}", "--config.eval.fid_num_samples=20",
                 "--config.eval.num_samples=25", "--config.eval.kid_features=15", "--config.eval.enable_sampling=True"]
    run_cli(monkeypatch, *fid_flags, "--mode=fid_stats", config=CONFIG)
    stats = np.load(workdir / "fid_stats" / "digits_train.npz")
    assert stats["mu"].shape == (2048,) and stats["sigma"].shape == (2048, 2048)
    run_cli(monkeypatch, *fid_flags, "--mode=eval", config=CONFIG)
    one = json.loads((workdir / "eval" / "fid_2.json").read_text())
    one_stats = stats_file.load_stats(workdir / "eval" / "fid_2_stats.npz")
    assert one["n_samples"] == 25 and math.isfinite(one["fid"]) and one["fid"] >= 0
    assert one["kid_samples"] == 15 and math.isfinite(one["kid"]) and one["seeds"]["num_batches"] == 3
    assert one["comparable_to_literature"] is False and one["sampler"]["method"] == "pc"
    capsys.readouterr()

    # Two processes (one CPU device each): process 0 samples batch 0, process 1 batches 1 and 2 (keys
    # fold_in(PRNGKey(seed), g) either way), process 0 joins the second Inception call with no rows.
    port = free_port()
    procs = [subprocess.Popen(
        [sys.executable, "-m", "sdejax.cli", f"--config={CONFIG}", *fid_flags, "--mode=eval",
         f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
        cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, stderr) in zip(procs, outs):
        assert p.returncode == 0, stderr[-4000:]
    two = json.loads((workdir / "eval" / "fid_2.json").read_text())
    two_stats = stats_file.load_stats(workdir / "eval" / "fid_2_stats.npz")
    assert two["seeds"] == {**one["seeds"], "process_count": 2} and two["nfe"] == one["nfe"]
    assert two["n_samples"] == 25 and two["kid_samples"] == 15
    # The same samples through the same per-device Inception program (10 rows a device): the same
    # pool3 rows and logits in the same order, up to float32 rounding.
    for key in ("features", "logits"):
        np.testing.assert_allclose(two_stats[key], one_stats[key], rtol=1e-5,
                                   atol=1e-6 * np.abs(one_stats[key]).max(), err_msg=key)
    np.testing.assert_allclose(two_stats["mu"], one_stats["mu"], rtol=1e-5, atol=1e-6 * np.abs(one_stats["mu"]).max())
    # FID: smooth in (mu, sigma) except for its rounding floor D sqrt(eps) (tr S1 + tr S2) with n << D
    # (see test_fid_workflow); KID and IS are smooth in the features and logits.
    floor = 2048 * np.sqrt(np.finfo(np.float64).eps) * (np.trace(stats["sigma"]) + np.trace(one_stats["sigma"]))
    assert abs(two["fid"] - one["fid"]) <= 1e-4 * one["fid"] + 2 * floor
    for key in ("kid", "inception_score"):
        assert two[key] == pytest.approx(one[key], rel=1e-4, abs=1e-9), key
    assert two["fid"] == pytest.approx(metrics.frechet_distance(two_stats["mu"], two_stats["sigma"], stats["mu"],
                                                                stats["sigma"]), rel=0, abs=2 * floor)
