"""Architectures on the digits, one recipe (EDM schedule and preconditioning, log-normal σ, x₀-prediction,
batch 64, 1200 steps, Heun 35 NFE): the pixel U-Net (configs/digits_edm.py), a small DiT on pixels
(configs/digits_dit.py) and latent diffusion (configs/digits_ldm.py: KL autoencoder f = 2, DDPM++ on
8x8x2 latents, decoded samples). Reports the digits monitor's Fréchet distance (NOT FID) of n samples
against the 300 test digits with the true-data floor, parameter counts, training wall times and the
autoencoder's test reconstruction error; a sample grid per model. Train the runs first:

    sdejax --config=configs/digits_edm.py --workdir=/work/runs/digits_edm --config.training.n_iters=1200
    sdejax --config=configs/digits_dit.py --workdir=/work/runs/digits_dit --config.training.n_iters=1200
    sdejax --config=configs/digits_ldm.py --workdir=/work/runs/digits_ldm --mode=train_autoencoder
    sdejax --config=configs/digits_ldm.py --workdir=/work/runs/digits_ldm
    python experiments/digits_architectures.py --unet /work/runs/digits_edm --dit /work/runs/digits_dit \
        --ldm /work/runs/digits_ldm
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time


sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from configs import digits_dit, digits_edm, digits_ldm  # noqa: E402
from digits_consistency import monitor_and_floor, score_setup  # noqa: E402  (this script's folder is on sys.path)
from sdejax.models import registry  # noqa: E402
from sdejax.training import modes  # noqa: E402


def train_wall_s(workdir: pathlib.Path) -> float:
    """Sum of the logged per-interval wall times: steps / steps_per_s between log lines."""
    rows = [json.loads(line) for line in (workdir / "train_log.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "steps_per_s" in r]
    return float(sum((b["step"] - a["step"]) / b["steps_per_s"] for a, b in zip([{"step": 0}] + rows, rows)))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--unet", required=True)
    p.add_argument("--dit", required=True)
    p.add_argument("--ldm", required=True)
    p.add_argument("--out", default="experiments/results/digits_architectures")
    p.add_argument("--num_samples", type=int, default=200)
    a = p.parse_args()
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    monitor, floor = monitor_and_floor(a.num_samples)
    results = {"num_samples": a.num_samples, "floor_train_vs_test": floor, "runs": []}
    for name, config, workdir in (("unet_pixels", digits_edm.get_config(), a.unet),
                                  ("dit_pixels", digits_dit.get_config(), a.dit),
                                  ("ldm_f2", digits_ldm.get_config(), a.ldm)):
        s = modes.restored_setup(config, workdir)
        row = score_setup(s, a.num_samples, monitor, out, name)
        row["params"] = registry.count_params(s.state.ema_params)
        row["train_wall_s"] = train_wall_s(pathlib.Path(workdir))
        results["runs"].append(row)
        print(row, flush=True)
    ae = pathlib.Path(a.ldm) / "autoencoder"
    results["autoencoder"] = {**json.loads((ae / "metrics.json").read_text()), "train_wall_s": train_wall_s(ae)}
    results["time"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
