"""Samples/s of a network sampled by DPM-Solver++ at 10 NFE against PC at 1000 steps (the GPU check).

Random weights (speed does not depend on them), the config's SDE and preconditioner, one batch per
call after one warm-up (compile time reported apart). Default: CIFAR-size DDPM++ (continuous VP),
batch 256, as the issue asks; `--config tiny/ddpmpp_vp --batch 4` is a CPU smoke run.

    python experiments/bench_sampler_speed.py [--config vp/cifar10_ddpmpp_continuous] [--batch 256] [--dtype bfloat16]
"""
from __future__ import annotations

import argparse
import importlib
import pathlib
import sys
import time

import jax

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sdejax.models import dummy_inputs, get_model, make_apply_fn  # noqa: E402
from sdejax.sampling import methods  # noqa: E402
from sdejax.training import build  # noqa: E402

RUNS = {"DPM-Solver++(2M), 10 NFE": ("dpm_solver", {"num_steps": 10, "order": 2}),
        "UniPC-2, 10 NFE": ("unipc", {"num_steps": 10, "order": 2}),
        "PC reverse diffusion, 1000 steps": ("pc", {"corrector": "none"})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="vp/cifar10_ddpmpp_continuous")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    config = importlib.import_module("configs." + args.config.replace("/", ".")).get_config()
    config.model.dtype = args.dtype
    model = get_model(config)
    x1, labels1 = dummy_inputs(config, 1)
    variables = jax.jit(lambda k: model.init({"params": k}, x1, labels1))(jax.random.PRNGKey(0))
    sde, apply_fn, shape = build.build_sde(config), make_apply_fn(model), (args.batch,) + x1.shape[1:]
    print(f"device: {jax.devices()[0].device_kind}, {args.config}, batch {args.batch}, {args.dtype}, jax {jax.__version__}")
    print("| sampler | NFE | compile (s) | s / batch | samples/s |\n|---|---|---|---|---|")
    for label, (method, options) in RUNS.items():
        def draw(params, rng, method=method, options=options):
            score_fn = build.build_score_fn(config, sde, apply_fn, params)
            return methods.sample(method, rng, sde, score_fn, shape, **options)

        start = time.perf_counter()
        compiled = jax.jit(draw).lower(variables, jax.random.PRNGKey(1)).compile()
        compile_s = time.perf_counter() - start
        jax.block_until_ready(compiled(variables, jax.random.PRNGKey(2)))
        start = time.perf_counter()
        _, nfe = jax.block_until_ready(compiled(variables, jax.random.PRNGKey(3)))
        wall = time.perf_counter() - start
        print(f"| {label} | {int(nfe)} | {compile_s:.1f} | {wall:.3f} | {args.batch / wall:.1f} |", flush=True)


if __name__ == "__main__":
    main()
