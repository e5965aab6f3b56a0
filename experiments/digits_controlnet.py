"""ControlNet on the digits: a frozen digits EDM U-Net (configs/digits_edm.py, NCSN++ module) steered by
blurred digits. The control is c = G_σ ∗ x (Gaussian blur, `sdejax.degradations.blur`, σ = --blur_sigma
pixels); only the ControlNet (the encoder copy, the hint encoder and the zero projections) trains,
with the base's own DSM loss (EDM preconditioning, log-normal σ) on (x, c) pairs of the training
digits. Then samples are drawn with the base's sampler (Heun, 35 NFE) for the controls of the 300
test digits and re-blurred: ‖G_σ ∗ x̂ − c‖ (RMS per pixel, [0, 1] units) says how well they agree with
their control. Baselines in the same run: the base alone (the ControlNet at initialisation, bitwise the
base) against the same controls, and test digits paired with another digit's control. Also the
digits monitor's Fréchet distance (NOT FID) of the controlled samples.

    sdejax --config=configs/digits_edm.py --workdir=/work/runs/digits_edm --config.training.n_iters=1200
    python experiments/digits_controlnet.py --base /work/runs/digits_edm --steps 600
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from configs import digits_edm  # noqa: E402
from digits_consistency import make_monitor  # noqa: E402  (this script's folder is on sys.path)
from sdejax import degradations  # noqa: E402
from sdejax.data import datasets  # noqa: E402
from sdejax.models import registry  # noqa: E402
from sdejax.models.controlnet import ControlNet, ControlNetParams, controlnet_apply_fn, init_controlnet  # noqa: E402
from sdejax.training import build, modes, plots  # noqa: E402


def rms(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)))


def train(s, net, base, blur, steps: int, lr: float, rng) -> tuple[dict, list[float], float]:
    """Adam on the ControlNet variables only; the base enters as a constant."""
    apply_fn = controlnet_apply_fn(net)
    loss_fn = build.build_loss_fn(s.config, s.sde, apply_fn, train=True)
    first = jax.tree_util.tree_map(lambda v: jnp.asarray(v[0]), s.data.chunk(0, 1))
    x0 = first["x"]
    control = init_controlnet(rng, net, base, x0, jnp.zeros((x0.shape[0],)), blur(x0))
    tx = optax.adam(lr)
    opt = tx.init(control)

    @jax.jit
    def step(control, opt, rng, batch):
        def loss(c):
            return loss_fn(ControlNetParams(base, c, blur(batch["x"])), rng, batch)[0]

        value, grads = jax.value_and_grad(loss)(control)
        updates, opt = tx.update(grads, opt, control)
        return optax.apply_updates(control, updates), opt, value

    log, start = [], time.perf_counter()
    for k in range(steps):
        batch = jax.tree_util.tree_map(lambda v: jnp.asarray(v[0]), s.data.chunk(k, 1))
        batch["index"] = jnp.arange(x0.shape[0]) + k * x0.shape[0]
        control, opt, value = step(control, opt, jax.random.fold_in(rng, k), batch)
        log.append(float(value))
        if k % 50 == 0:
            print(f"step {k} loss {np.mean(log[-50:]):.4f}", flush=True)
    return control, log, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--base", required=True, help="a configs/digits_edm.py workdir")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--blur_sigma", type=float, default=1.5)
    p.add_argument("--num_test", type=int, default=300)
    p.add_argument("--out", default="experiments/results/digits_controlnet")
    a = p.parse_args()
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    config = digits_edm.get_config()
    s = modes.restored_setup(config, a.base)
    base = s.state.ema_params
    net = ControlNet(registry.get_model(config), hint_channels=(16, 32))
    deg = degradations.blur(sigma_max=a.blur_sigma, schedule="linear")  # σ(1) = blur_sigma
    blur = jax.jit(lambda x: deg.apply(x, None, jnp.ones((x.shape[0],), x.dtype)))
    control, log, train_s = train(s, net, base, blur, a.steps, a.lr, jax.random.PRNGKey(0))

    to_unit = datasets.get_data_inverse_scaler(config)
    test = np.concatenate([np.asarray(b["x"]) for b in s.data.eval_batches(100)])[:a.num_test]
    c = blur(jnp.asarray(test))
    n = test.shape[0]
    fresh = init_controlnet(jax.random.PRNGKey(0), net, base, c, jnp.zeros((n,)), c)
    s.apply_fn = controlnet_apply_fn(net)
    monitor = make_monitor()
    key = build.stream_key(config, "sample")
    unit_c = np.asarray(to_unit(c))
    results = {"steps": a.steps, "lr": a.lr, "blur_sigma": a.blur_sigma, "train_wall_s": train_s,
               "final_loss_mean_last50": float(np.mean(log[-50:])), "first_loss_mean_50": float(np.mean(log[:50])),
               "num_test": n, "runs": {}}
    for name, params in (("controlnet", control), ("base_alone", fresh)):
        s.state = s.state.replace(ema_params=ControlNetParams(base, params, c))
        x, info = modes.draw_samples(s, config.sampling.method, n, key)
        images = np.clip(np.asarray(to_unit(x), np.float32), 0, 1)
        reblur = np.asarray(to_unit(blur(jnp.asarray(x))))
        results["runs"][name] = {"reblur_rms": rms(reblur, unit_c), "rms_to_source_digit": rms(images, to_unit(test)),
                                 "digits_frechet_distance": float(monitor(images)), "nfe": info["nfe"],
                                 "sample_wall_s": info["wall_s"]}
        k = min(50, n)
        pairs = np.stack([unit_c[:k], images[:k]], 1).reshape(2 * k, *images.shape[1:])  # control, sample
        plots.save_image_grid(out / f"{name}.png", plots.image_grid(pairs))
        print(name, results["runs"][name], flush=True)
    shuffled = np.roll(unit_c, 1, axis=0)
    results["unrelated_control_rms"] = rms(unit_c, shuffled)  # another test digit's control
    results["time"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
