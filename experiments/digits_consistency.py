"""Digits consistency models end to end: the digits monitor's Fréchet distance (NOT FID) of a DSM
teacher on the EDM schedule at 35 NFE (Heun, 18 steps) and of consistency models (CD / iCT) at 1 and
2 steps, against the test split, with the true-data floor (train digits vs the test split) at the
same sample count; a sample grid per setting.

    python experiments/digits_consistency.py --teacher T --ict I [--cd C] --out DIR --num_samples 200
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from configs import digits_cd, digits_edm, digits_ict  # noqa: E402
from sdejax.data import datasets  # noqa: E402
from sdejax.evaluation import digits_monitor  # noqa: E402
from sdejax.training import build, modes  # noqa: E402

SIGMAS = ((80.0,), (80.0, 0.821))


def make_monitor():
    """The digits monitor (`sdejax.evaluation.digits_monitor`, classifier seed 123): images in [0, 1] ->
    its Fréchet distance to the test split (NOT FID)."""
    return digits_monitor.make_digits_monitor(digits_monitor.train_digits_classifier(jax.random.PRNGKey(123)))


def monitor_and_floor(n: int):
    """(the monitor, its true-data floor: n random train digits against the test split)."""
    monitor = make_monitor()
    train_x, _ = digits_monitor.digits_split("train")
    pick = np.random.default_rng(0).choice(len(train_x), n, replace=False)
    return monitor, float(monitor(train_x[pick]))


def score(config, workdir, n, monitor, out, name) -> dict:
    """n samples of the run in `workdir` by its config's sampler, their monitor distance and a grid."""
    return score_setup(modes.restored_setup(config, workdir), n, monitor, out, name)


def score_setup(s, n, monitor, out, name) -> dict:
    """`score` of an already restored run `s`."""
    config = s.config
    x, info = modes.draw_samples(s, config.sampling.method, n, build.stream_key(config, "sample"))
    images = np.clip(np.asarray(datasets.get_data_inverse_scaler(config)(x), np.float32), 0, 1)
    modes.save_samples(s, out / name, {"samples": x[:100]})
    return {"name": name, "step": int(s.state.step), "nfe": info["nfe"], "sample_wall_s": info["wall_s"],
            "digits_frechet_distance": float(monitor(images)), **{k: v for k, v in info.items() if k == "condition_rms"}}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--teacher", required=True)
    p.add_argument("--ict", required=True)
    p.add_argument("--cd", default=None)
    p.add_argument("--out", default="experiments/results/digits_consistency")
    p.add_argument("--num_samples", type=int, default=200)
    a = p.parse_args()
    out = pathlib.Path(a.out)
    monitor, floor = monitor_and_floor(a.num_samples)
    results = {"num_samples": a.num_samples, "floor_train_vs_test": floor, "runs": []}
    results["runs"].append(score(digits_edm.get_config(), a.teacher, a.num_samples, monitor, out, "teacher_heun35"))
    runs = [("ict", digits_ict.get_config(), a.ict)] + ([("cd", digits_cd.get_config(), a.cd)] if a.cd else [])
    for name, config, workdir in runs:
        if name == "cd":
            config.training.teacher_workdir = a.teacher
        for sigmas in SIGMAS:
            config.sampling.consistency_sigmas = sigmas
            results["runs"].append(score(config, workdir, a.num_samples, monitor, out, f"{name}_{len(sigmas)}step"))
    results["time"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
