"""Beyond Gaussian noise on the digits: masked (absorbing-state) diffusion's NELBO bits/dim (an upper
bound on the discrete NLL over the 17 levels) beside a continuous score model's PF-ODE bits/dim on the
same test digits, and the digits monitor's Fréchet distance (NOT FID) of masked, cold-blur and
cold-mask samples against the test split, with the true-data floor at the same sample count and a
sample grid per run. Train the runs first with the CLI (configs/digits_masked.py, digits_cold.py,
digits_edm.py), then

    python experiments/digits_udm.py --masked M --blur B --mask K --continuous C [--num_samples 200]
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time


sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from configs import digits_cold, digits_edm, digits_masked  # noqa: E402
from digits_consistency import monitor_and_floor, score  # noqa: E402  (this script's folder is on sys.path)
from sdejax.training import modes  # noqa: E402


def bits(config, workdir) -> dict:
    """Held-out (test split, 300 digits) bits/dim of the run's family: NELBO or PF-ODE."""
    config.eval.enable_bpd, config.eval.num_bpd_batches = True, 0
    s = modes.restored_setup(config, workdir)
    return {"step": int(s.state.step), **modes.heldout_bits_per_dim(s)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--masked", required=True)
    p.add_argument("--blur", required=True)
    p.add_argument("--mask", required=True)
    p.add_argument("--continuous", required=True, help="a digits_edm.py (DSM) workdir: its PF-ODE bits/dim")
    p.add_argument("--out", default="experiments/results/digits_udm")
    p.add_argument("--num_samples", type=int, default=200)
    a = p.parse_args()
    out = pathlib.Path(a.out)
    monitor, floor = monitor_and_floor(a.num_samples)
    results = {"num_samples": a.num_samples, "floor_train_vs_test": floor,
               "bits_per_dim": {"masked_nelbo": bits(digits_masked.get_config(), a.masked),
                                "continuous_pf_ode": bits(digits_edm.get_config(), a.continuous)},
               "runs": [score(digits_masked.get_config(), a.masked, a.num_samples, monitor, out, "masked_ancestral64"),
                        score(digits_cold.get_config("blur"), a.blur, a.num_samples, monitor, out, "cold_blur20"),
                        score(digits_cold.get_config("mask"), a.mask, a.num_samples, monitor, out, "cold_mask20")]}
    results["time"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
