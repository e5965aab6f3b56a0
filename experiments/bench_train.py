"""Training throughput of a config: steps/s and examples/s with 1 and with N devices, jit and pmap.

    python experiments/bench_train.py --config=configs/default_toy.py --devices=1,8 --steps=400

Each row runs the real training loop (`sdejax.training.trainer.train_model`) in a fresh process, so that
`--devices=N` can emulate N CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=N) when
there is no accelerator; on a GPU/TPU host pass the real device count. The rate is read from the
loop's own log over the second half of the run, after compilation. On CPU, emulated devices share
the same cores, so the 8-device rows check that the scaling code runs, not that it scales: compare
rates only on real devices, and only as ratios within one run.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent

CHILD = r"""
import json, pathlib, sys
sys.path.insert(0, {root!r})
from ml_collections import config_flags
import jax
from absl import flags
from sdejax.training import trainer

_CONFIG = config_flags.DEFINE_config_file("config", {config!r})
flags.FLAGS(["bench"])
config = _CONFIG.value
config.unlock()
t = config.training
t.n_iters, t.log_freq, t.eval_freq = {steps}, {steps} // 2, 0
t.snapshot_freq, t.snapshot_freq_for_preemption, t.parallelism = 0, {steps}, {mode!r}
config.eval.after_training = False
for key, value in {overrides!r}.items():
    section, name = key.split(".")
    config[section][name] = type(config[section][name])(value)
trainer.train_model(config, {workdir!r})
log = [json.loads(l) for l in (pathlib.Path({workdir!r}) / "train_log.jsonl").read_text().splitlines()]
last = [r for r in log if "steps_per_s" in r][-1]
print("RESULT", json.dumps({{"devices": jax.device_count(), "platform": jax.devices()[0].platform,
      "steps_per_s": last["steps_per_s"], "examples_per_s": last["examples_per_s"]}}))
"""


def run(config: str, devices: int, mode: str, steps: int, overrides: dict, emulate: bool) -> dict:
    env = dict(os.environ)
    if emulate:
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
        env["JAX_PLATFORMS"] = "cpu"
    with tempfile.TemporaryDirectory() as workdir:
        code = CHILD.format(root=str(ROOT), config=config, steps=steps, mode=mode, overrides=overrides,
                            workdir=workdir)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"benchmark run failed ({devices} devices, {mode}):\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "default_toy.py"))
    parser.add_argument("--devices", default="1,8", help="comma-separated device counts")
    parser.add_argument("--modes", default="jit,pmap", help="comma-separated: jit, pmap")
    parser.add_argument("--steps", type=int, default=400, help="training steps per run (rate from the 2nd half)")
    parser.add_argument("--real_devices", action="store_true", help="use the host's devices, do not emulate")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="config override, e.g. --set training.batch_size=256")
    args = parser.parse_args()
    overrides = dict(item.split("=", 1) for item in args.set)
    rows = []
    for devices in (int(d) for d in args.devices.split(",")):
        for mode in args.modes.split(","):
            rows.append({"mode": mode, **run(args.config, devices, mode, args.steps, overrides, not args.real_devices)})
    base = {r["mode"]: r["steps_per_s"] for r in rows if r["devices"] == min(x["devices"] for x in rows)}
    print(f"config: {args.config}  steps: {args.steps}  overrides: {overrides or '-'}")
    print(f"{'platform':8s} {'devices':>7s} {'mode':>5s} {'steps/s':>9s} {'examples/s':>11s} {'vs fewest':>9s}")
    for r in rows:
        print(f"{r['platform']:8s} {r['devices']:7d} {r['mode']:>5s} {r['steps_per_s']:9.1f} "
              f"{r['examples_per_s']:11.0f} {r['steps_per_s'] / base[r['mode']]:9.2f}")


if __name__ == "__main__":
    main()
