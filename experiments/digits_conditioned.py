"""Image-conditioned driver runs on the digits (`sdejax.training.image_condition`), all on the EDM recipe of
configs/digits_edm.py (Heun 35 NFE per stage):

- the cascade: an 8x8 base on D_2(x) (configs/digits_lowres.py), then the 8x8 -> 16x16 super-resolution
  model (configs/digits_sr.py, augmentation s = 0.1), sampled in one call; and the SR model alone on the
  held-out D_2(x) with its error after re-downsampling ‖D_2(x̂) − D_2(x)‖;
- the ControlNet over the frozen pixel U-Net (configs/digits_controlnet.py, blur σ = 1.5 px), its re-blur
  error ‖G ∗ x̂ − G ∗ x‖ against the same for the base alone (the ControlNet at initialisation, the base
  bit for bit) and for another digit's blur.

The metric is the digits monitor's Fréchet distance (NOT FID) of n samples against the test split, beside
its true-data floor; RMS errors are per pixel in [0, 1] units. Train the runs first:

    sdejax --config=configs/digits_lowres.py --workdir=/work/runs/digits_lowres
    sdejax --config=configs/digits_sr.py --workdir=/work/runs/digits_sr
    sdejax --config=configs/digits_controlnet.py --workdir=/work/runs/digits_controlnet \\
        --config.controlnet.base_workdir=/work/runs/digits_edm
    python experiments/digits_conditioned.py --lowres /work/runs/digits_lowres --sr /work/runs/digits_sr \\
        --controlnet /work/runs/digits_controlnet --base /work/runs/digits_edm
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from configs import digits_controlnet, digits_sr  # noqa: E402
from digits_architectures import train_wall_s  # noqa: E402  (this script's folder is on sys.path)
from digits_consistency import monitor_and_floor, score_setup  # noqa: E402
from sdejax.data import transforms  # noqa: E402
from sdejax.training import build, image_condition, modes  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--lowres", required=True)
    p.add_argument("--sr", required=True)
    p.add_argument("--controlnet", required=True)
    p.add_argument("--base", required=True, help="the ControlNet's base (configs/digits_edm.py)")
    p.add_argument("--out", default="experiments/results/digits_conditioned")
    p.add_argument("--num_samples", type=int, default=200)
    a = p.parse_args()
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    monitor, floor = monitor_and_floor(a.num_samples)
    results = {"num_samples": a.num_samples, "floor_train_vs_test": floor, "runs": []}

    def add(name, s, workdir):
        row = score_setup(s, a.num_samples, monitor, out, name)
        row["train_wall_s"] = {str(w): train_wall_s(pathlib.Path(w)) for w in workdir}
        results["runs"].append(row)
        print(row, flush=True)

    cascade = digits_sr.get_config()
    cascade.superres.base_workdir = a.lowres
    add("cascade_8_to_16", modes.restored_setup(cascade, a.sr), (a.lowres, a.sr))
    add("sr_on_heldout_lowres", modes.restored_setup(digits_sr.get_config(), a.sr), (a.sr,))
    cn = digits_controlnet.get_config()
    cn.controlnet.base_workdir = a.base
    add("controlnet_blur", modes.restored_setup(cn, a.controlnet), (a.controlnet,))
    with tempfile.TemporaryDirectory() as fresh:  # the ControlNet at step 0: the base itself, same controls
        add("base_alone_same_controls", build.setup(cn, fresh), ())
    for name, config, workdir in (("unrelated_control_rms", cn, a.controlnet),
                                  ("unrelated_lowres_rms", digits_sr.get_config(), a.sr)):  # another digit's C(x)
        held = np.asarray(modes.restored_setup(config, workdir).data.heldout["x"])
        to_unit = transforms.get_data_inverse_scaler(config)
        results[name] = image_condition.agreement(config, np.roll(held, 1, axis=0), held, to_unit)
    results["time"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
