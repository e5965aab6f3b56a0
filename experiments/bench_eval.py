"""Throughput of sample evaluation: Inception features (images/s), streaming statistics, FID.

    python experiments/bench_eval.py --batch_size=32 --batches=5 [--weights=inception_fid.npz]

Runs data-parallel over all local devices (CPU or accelerator) on CIFAR-sized (32x32) float
inputs resized inside the jitted network, and extrapolates the time to evaluate FID on
--samples (default 50,000) samples. Without --weights the network has random weights, which
does not change the speed. Prints one JSON object.
"""
import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from sdejax.evaluation import features, inception, metrics, stats


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_size", type=int, default=32, help="global batch")
    parser.add_argument("--batches", type=int, default=5, help="timed batches after the warm-up one")
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--samples", type=int, default=50_000, help="sample count to extrapolate to")
    parser.add_argument("--weights", default=None, help=".npz/.pth weights (default: random init)")
    args = parser.parse_args()

    if args.weights:
        variables = inception.load_weights(args.weights)
    else:
        shape = jnp.zeros((1, inception.SIZE, inception.SIZE, 3))
        variables = jax.jit(inception.FIDInceptionV3().init)(jax.random.key(0), shape)
    feature_fn = features.inception_feature_fn(variables, args.batch_size)
    rng = np.random.default_rng(0)
    images = rng.random((args.batch_size, args.image_size, args.image_size, 3)).astype(np.float32)

    out, first = timed(feature_fn, images)  # compile + one batch
    per_batch = [timed(feature_fn, images)[1] for _ in range(args.batches)]
    feature_rate = args.batch_size / np.median(per_batch)
    pool3 = out["pool3"]
    _, moments_time = timed(stats.moments_of, pool3)
    a = stats.finalize(stats.moments_of(rng.normal(size=(4096, 2048))))
    b = stats.finalize(stats.moments_of(rng.normal(size=(4096, 2048)) + 0.1))
    _, fid_time = timed(metrics.frechet_distance, a["mu"], a["sigma"], b["mu"], b["sigma"])
    steps = -(-args.samples // args.batch_size)
    total = steps * (np.median(per_batch) + moments_time) + fid_time
    print(json.dumps({
        "device": str(jax.devices()[0].device_kind), "devices": jax.device_count(),
        "batch_size": args.batch_size, "image_size": args.image_size,
        "compile_plus_first_batch_s": round(first, 2),
        "inception_images_per_s": round(float(feature_rate), 2),
        "float64_moments_per_batch_s": round(moments_time, 4),
        "frechet_distance_2048_s": round(fid_time, 2),
        f"fid_{args.samples}_samples_estimated_s": round(float(total), 1),
    }, indent=1))


if __name__ == "__main__":
    main()
