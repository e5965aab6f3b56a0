"""The digits config end to end from the CLI through TFDS (offline, a temporary data_dir): train
with snapshot sampling, TensorBoard and a checkpointed data-iterator position; eval (bits/dim on
the test split); sample (image grid); fid_stats and eval with sampling (FID/KID/IS through the
Inception network, here with the fixture's synthetic weights). A tiny U-Net and 2 steps keep it
cheap; the maths of each piece is tested elsewhere, here only the wiring and the outputs' ranges.
"""
import json
import math
import pathlib
import sys

import numpy as np
from PIL import Image

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from test_inception import regenerate_state_dict  # noqa: E402
from test_training import _cli  # noqa: E402

from sdejax.evaluation import inception_weights  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "digits_ddpmpp.py"
TINY = {"training.n_iters": 2, "training.n_jitted_steps": 1, "training.batch_size": 8, "training.log_freq": 1,
        "training.eval_freq": 2, "training.snapshot_freq": 2, "training.snapshot_num_samples": 4,
        "model.nf": 16, "model.ch_mult": "(1,2)", "model.num_res_blocks": 1, "model.attn_resolutions": "(8,)",
        "model.num_scales": 25, "eval.num_samples": 4, "eval.batch_size": 10, "eval.num_bpd_batches": 1,
        "eval.rtol": 1e-2, "eval.atol": 1e-2}


def test_digits_train_eval_sample(tmp_path, monkeypatch, capsys, fixtures_dir):
    workdir = tmp_path / "run"
    flags = [f"--workdir={workdir}", f"--config.data.data_dir={tmp_path / 'tfds'}",
             *(f"--config.{k}={v}" for k, v in TINY.items())]
    _cli(monkeypatch, *flags, "--mode=train", config=CONFIG)
    data_state = json.loads((workdir / "checkpoints" / "2" / "data" / "metadata").read_text())
    assert data_state == {"next_index": 2}  # the grain iterator's position is checkpointed
    log = [json.loads(line) for line in (workdir / "train_log.jsonl").read_text().splitlines()]
    assert {"loss", "grad_norm", "learning_rate", "steps_per_s", "examples_per_s"} <= set(log[-1])
    assert log[-1]["step"] == 2 and np.isfinite(log[-1]["loss"]) and "eval_loss" in log[-1]
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    grid = np.asarray(Image.open(workdir / "samples" / "snapshot_2.png"))
    assert grid.shape == (2 * 17 + 1, 2 * 17 + 1)  # 4 samples of 16x16, 1-pixel borders

    _cli(monkeypatch, *flags, "--mode=eval", config=CONFIG)
    bpd = json.loads((workdir / "eval_metrics.json").read_text())["heldout"]
    # Any density on [-1, 1]^D: bits/dim = −log2 p/D − 1 + log2 17 (data_range (−1, 1), 17 levels);
    # an untrained network's is finite and above 0; one batch of 10 test digits.
    assert bpd["num_points"] == 10 and math.isfinite(bpd["bits_per_dim"]) and bpd["bits_per_dim"] > 0

    _cli(monkeypatch, *flags, "--mode=sample", config=CONFIG)
    samples = np.load(workdir / "samples" / "samples_2.npz")["samples"]
    assert samples.shape == (4, 16, 16, 1) and np.all(np.isfinite(samples))
    assert (workdir / "samples" / "samples_2.png").is_file()

    weights = tmp_path / "inception.npz"
    inception_weights.save_state_dict(regenerate_state_dict(fixtures_dir / "inception_fid" / "params_spec.json"),
                                      weights)
    fid_flags = [*flags, f"--config.eval.inception_weights={weights}", "--config.eval.fid_num_samples=20",
                 "--config.eval.num_samples=10", "--config.eval.enable_sampling=True"]
    _cli(monkeypatch, *fid_flags, "--mode=fid_stats", config=CONFIG)
    stats = np.load(workdir / "fid_stats" / "digits_train.npz")
    assert stats["mu"].shape == (2048,) and stats["sigma"].shape == (2048, 2048)
    _cli(monkeypatch, *fid_flags, "--mode=eval", config=CONFIG)
    result = json.loads((workdir / "eval" / "fid_2.json").read_text())
    assert result["n_samples"] == 10 and math.isfinite(result["fid"]) and result["fid"] >= 0
    assert result["comparable_to_literature"] is False and result["sampler"]["method"] == "pc"
    capsys.readouterr()
