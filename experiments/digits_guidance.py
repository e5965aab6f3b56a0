"""End to end on the digits: classifier-free guidance of a class-conditional model trained with label
dropout, and classifier guidance of an unconditional model, scored by the in-project digits classifier
(`sdejax.evaluation.digits_monitor`, the monitor's CNN, not used in training): the fraction of samples of
class y that it classifies as y, per guidance weight, with a sample grid per setting.

    python experiments/digits_guidance.py --out=experiments/results/digits_guidance [--steps=1500]

Stages resume from their checkpoints (run it again after an interruption):
  1. configs/digits_ddpmpp_cond.py trained `--steps` steps (label dropout 0.1) in <out>/cond;
  2. configs/digits_ddpmpp.py trained `--steps` steps (unconditional) in <out>/uncond, and its
     noise-conditional classifier (`--mode=train_classifier`, conv net) `--classifier_steps` steps;
  3. `--num_samples` samples (classes i mod 10) per setting by DPM-Solver++(2M), 20 steps:
     CFG w ∈ {0, 1, 3} and classifier guidance γ ∈ {0, 1, 3}.
"""
from __future__ import annotations

import argparse
import copy
import json
import pathlib
import platform
import sys
import time

import jax
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from configs.digits_ddpmpp import get_config as uncond_config  # noqa: E402
from configs.digits_ddpmpp_cond import get_config as cond_config  # noqa: E402
from sdejax.data import datasets  # noqa: E402
from sdejax.evaluation import digits_monitor  # noqa: E402
from sdejax.models import classifier as classifier_models  # noqa: E402
from sdejax.training import build, classifier_mode, modes, trainer  # noqa: E402

WEIGHTS = (0.0, 1.0, 3.0)


def common(config, args):
    c = config
    c.training.n_iters = args.steps
    c.training.batch_size = args.batch_size
    c.training.snapshot_freq = 0
    c.training.snapshot_sampling = False
    c.training.digits_monitor = False
    c.training.eval_freq = 0
    c.training.log_freq = 100
    c.training.snapshot_freq_for_preemption = 250
    c.eval.after_training = False
    c.eval.num_samples = args.num_samples
    c.sampling.method = "dpm_solver"
    c.sampling.num_steps = 20
    c.sampling.order = 2
    c.data.data_dir = args.data_dir
    return c


def settings_conditional(config) -> bool:
    """Whether the samples have classes (a conditional model, or classifier guidance)."""
    return bool(config.model.get("num_classes", 0) or config.sampling.get("classifier_scale", 0) > 0)


def score_samples(config, workdir, clf_params, settings: dict) -> tuple[dict, np.ndarray]:
    """Samples with `settings` and the monitor classifier's accuracy on them (labels i mod 10), a grid of
    all of them (classes in turn) and one grid per class."""
    c = copy.deepcopy(config)
    for k, v in settings.items():
        c.sampling[k] = v
    s = modes.restored_setup(c, workdir)
    start = time.perf_counter()
    x, info = modes.draw_samples(s, "dpm_solver", c.eval.num_samples, build.stream_key(c, "sample"))
    images = np.clip(np.asarray(datasets.get_data_inverse_scaler(c)(x)), 0, 1)
    logits = digits_monitor.DigitsClassifier().apply(clf_params, images)[1]
    y = np.arange(len(x)) % 10
    acc = float(np.mean(np.argmax(np.asarray(logits), -1) == y))
    per_class = {f"class{k}": x[y == k] for k in range(10)} if settings_conditional(c) else {}
    modes.save_samples(s, workdir / "guidance" / "_".join(f"{k}={v:g}" for k, v in settings.items()),
                       {"samples": x, **per_class})
    return {**settings, "accuracy": acc, "accuracy_se": float(np.sqrt(acc * (1 - acc) / len(x))),
            "nfe": info["nfe"], "wall_s": time.perf_counter() - start}, x


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="experiments/results/digits_guidance")
    p.add_argument("--data_dir", default=None)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--classifier_steps", type=int, default=1500)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--num_samples", type=int, default=500)
    args = p.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    clf_params = digits_monitor.train_digits_classifier(jax.random.PRNGKey(123))
    test_x, test_y = digits_monitor.digits_split("test")
    real_acc = float(np.mean(np.argmax(np.asarray(digits_monitor.DigitsClassifier().apply(clf_params, test_x)[1]), -1)
                             == test_y))
    results = {"machine": f"{platform.machine()}, {jax.device_count()} {jax.default_backend()} device(s)",
               "steps": args.steps, "classifier_steps": args.classifier_steps, "batch_size": args.batch_size,
               "num_samples": args.num_samples, "monitor_accuracy_on_test_digits": real_acc}
    cond = common(cond_config(), args)
    t0 = time.perf_counter()
    results["cond_train"] = trainer.train_model(cond, out / "cond")
    results["cond_train_wall_s"] = time.perf_counter() - t0
    results["cfg"] = [score_samples(cond, out / "cond", clf_params, {"guidance_weight": w})[0] for w in WEIGHTS]
    print(json.dumps(results["cfg"], indent=1), flush=True)

    uncond = common(uncond_config(), args)
    uncond.classifier = classifier_models.default_config("conv")
    t0 = time.perf_counter()
    results["uncond_train"] = trainer.train_model(uncond, out / "uncond")
    results["uncond_train_wall_s"] = time.perf_counter() - t0
    clf = copy.deepcopy(uncond)
    clf.training.n_iters = args.classifier_steps
    results["classifier_train"] = classifier_mode.train_classifier(clf, out / "uncond")
    results["classifier_guidance"] = [score_samples(uncond, out / "uncond", clf_params, {"classifier_scale": g})[0]
                                      for g in WEIGHTS]
    print(json.dumps(results["classifier_guidance"], indent=1), flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
