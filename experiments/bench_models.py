"""Speed of the score networks: params, compile time, forward and train step (fwd+bwd+Adam).

One row per distinct architecture. Forward and train-step times are the median over `--repeats`
timed calls after one warm-up; images/s = batch / time. Peak memory is the process RSS on CPU,
the device's peak bytes in use on GPU/TPU. FLOPs per image come from XLA's cost analysis of the
forward pass; utilisation = forward FLOP/s ÷ `--peak_tflops`.

    python experiments/bench_models.py --batch 8 --dtype float32
    python experiments/bench_models.py --batch 128 --dtype bfloat16 --peak_tflops 989   # H100 dense bf16
"""
from __future__ import annotations

import argparse
import importlib
import pathlib
import resource
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import optax

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sdejax.models import count_params, dummy_inputs, get_model, make_apply_fn  # noqa: E402

ARCHS = {
    "NCSN++ cont.": "ve/cifar10_ncsnpp_continuous",
    "NCSN++ cont. deep": "ve/cifar10_ncsnpp_deep_continuous",
    "DDPM++ cont.": "vp/cifar10_ddpmpp_continuous",
    "DDPM": "vp/ddpm/cifar10",
    "NCSNv2": "ve/ncsnv2/cifar10",
    "CelebA-HQ 256 NCSN++": "ve/celebahq_256_ncsnpp_continuous",
}


def peak_memory_gb() -> float:
    device = jax.devices()[0]
    if device.platform == "cpu":
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB -> GiB
    return device.memory_stats().get("peak_bytes_in_use", 0) / 2 ** 30


def timed(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench(name: str, config_name: str, batch: int, dtype: str, repeats: int, peak_tflops: float) -> dict:
    config = importlib.import_module("configs." + config_name.replace("/", ".")).get_config()
    config.model.dtype = dtype
    model = get_model(config)
    apply_fn = make_apply_fn(model)
    x1, labels1 = dummy_inputs(config, 1)
    variables = jax.jit(lambda k: model.init({"params": k}, x1, labels1))(jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (batch,) + x1.shape[1:])
    labels = jnp.ones((batch,), labels1.dtype)
    opt = optax.adam(2e-4)
    opt_state = opt.init(variables)

    forward = jax.jit(lambda v, x, l: apply_fn(v, x, l))

    @jax.jit
    def train_step(v, s, x, l, rng):
        def loss_fn(v):
            return jnp.mean(apply_fn(v, x, l, train=True, rng=rng) ** 2)
        grads = jax.grad(loss_fn)(v)
        updates, s = opt.update(grads, s, v)
        return optax.apply_updates(v, updates), s

    start = time.perf_counter()
    lowered = forward.lower(variables, x, labels)
    compiled_fwd = lowered.compile()
    compile_fwd = time.perf_counter() - start
    start = time.perf_counter()
    compiled_step = train_step.lower(variables, opt_state, x, labels, jax.random.PRNGKey(2)).compile()
    compile_step = time.perf_counter() - start
    cost = compiled_fwd.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", 0.0)) / batch

    t_fwd = timed(compiled_fwd, variables, x, labels, repeats=repeats)
    t_step = timed(compiled_step, variables, opt_state, x, labels, jax.random.PRNGKey(2), repeats=repeats)
    return dict(name=name, params=count_params(variables), compile_fwd=compile_fwd, compile_step=compile_step,
                fwd=t_fwd, step=t_step, fwd_ips=batch / t_fwd, step_ips=batch / t_step,
                gflops=flops / 1e9, util=(flops * batch / t_fwd) / (peak_tflops * 1e12) if peak_tflops else None,
                mem=peak_memory_gb())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peak_tflops", type=float, default=0.0, help="device peak for utilisation (0: skip)")
    parser.add_argument("--only", nargs="*", default=None, help="subset of architecture names")
    args = parser.parse_args()
    print(f"device: {jax.devices()[0].device_kind} ({jax.devices()[0].platform}), batch {args.batch}, "
          f"dtype {args.dtype}, jax {jax.__version__}")
    header = ("| model | params | compile fwd / step (s) | forward (s) | train step (s) | img/s fwd / train "
              "| GFLOP/img fwd | util | peak mem (GiB) |")
    print(header)
    print("|" + "---|" * 9)
    for name, config_name in ARCHS.items():
        if args.only and name not in args.only:
            continue
        r = bench(name, config_name, args.batch, args.dtype, args.repeats, args.peak_tflops)
        util = f"{100 * r['util']:.0f}%" if r["util"] is not None else "-"
        print(f"| {r['name']} | {r['params']:,} | {r['compile_fwd']:.1f} / {r['compile_step']:.1f} | "
              f"{r['fwd']:.3f} | {r['step']:.3f} | {r['fwd_ips']:.1f} / {r['step_ips']:.1f} | "
              f"{r['gflops']:.1f} | {util} | {r['mem']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
