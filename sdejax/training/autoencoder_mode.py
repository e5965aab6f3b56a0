"""`sdejax --mode=train_autoencoder`: the KL or VQ autoencoder of latent diffusion (`sdejax.training.latent`),
trained on the run's image data with its own checkpoints in `<autoencoder dir>/checkpoints` (default
`<workdir>/autoencoder`; resumable as every run), logs there (`train_log.jsonl`, TensorBoard: the loss,
and at `training.eval_freq` the held-out reconstruction and KL, or for VQ the quantisation error, codebook
usage and perplexity), and, once trained, the latent scale `latent_scale.json` and the test-split report
`metrics.json`.

Loss (pixel only), per example: KL (`autoencoder.kind = "kl"`, `sdejax.autoencoders.vae_loss`) with
z = μ + σ ε, VQ (`"vq"`, `sdejax.autoencoders.vq_vae_loss`, learned codebook) with z_q = e_k,
k = argmin_j ‖z_e − e_j‖² and a straight-through gradient:

    L(x) = Σ_pixels (x − D(z))² + β KL(q(z|x) ‖ N(0, I)),                    β = `autoencoder.beta`
    L(x) = Σ_pixels (x − D(z_q))² + ‖sg(z_e) − e_k‖² + β ‖z_e − sg(e_k)‖²,   β = `autoencoder.commitment`.

(The library's EMA codebook needs state outside the gradient step; the driver trains the learned one.)

The perceptual (LPIPS) and adversarial terms of LDM's autoencoders need pretrained weights that cannot be
downloaded here: they are not shipped; a `recon_loss(x, x̂) -> (B,)` plugs into `autoencoder_setup`.

Steps and batch size are `autoencoder.n_iters` / `autoencoder.batch_size`, the optimizer
`latent.optimizer_config`, no EMA (as LDM's first stage); log, eval and checkpoint frequencies are the
run's `training` ones. The scale s = 1/std of the latents (the encoder mean, or samples with
`latent.use_mean = False`) over the `autoencoder.scale_batches` training batches after the last step is
written once; a rerun never recomputes or overwrites it, and training past its step is refused (it
would change the encoder under the scale and under any diffusion model trained on its latents).
"""
from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from sdejax import autoencoders
from sdejax.training import build, config as config_lib, latent, objective as objective_lib, parallel, preemption
from sdejax.training import sources, trainer, workdir_lock
from sdejax.training.modes import to_host, write_json
from sdejax.training.writer import MetricWriter

# the run's `training` keys the autoencoder's loop reads as they are (how often to log, evaluate, save)
RUN_KEYS = ("log_freq", "eval_freq", "snapshot_freq", "snapshot_freq_for_preemption", "n_jitted_steps",
            "keep_checkpoints", "unroll_steps", "parallelism")


def run_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config the trainer runs the autoencoder with: the run's data, seed, eval batch size and
    `RUN_KEYS`, `autoencoder.batch_size` / `n_iters`, the autoencoder's optimizer, no EMA."""
    a, t = latent.autoencoder_settings(config), config.training
    training = {k: t[k] for k in RUN_KEYS if k in t}
    training.update(batch_size=a["batch_size"], n_iters=a["n_iters"])
    return ml_collections.ConfigDict({
        "training": training, "optim": latent.optimizer_config(config).to_dict(), "model": {"ema_rate": 0.0},
        "data": config.data.to_dict(), "eval": {"batch_size": config.eval.batch_size}, "seed": config.seed})


def autoencoder_setup(config: ml_collections.ConfigDict, ae_dir: pathlib.Path, allow_config_change: tuple[str, ...] = (),
                      recon_loss: autoencoders.ReconLoss = autoencoders.squared_error) -> tuple[build.Setup, Any]:
    """(setup, module) of the autoencoder run, restored from its newest intact checkpoint if any."""
    config_lib.check_config(config)
    if "autoencoder" not in config:
        raise ValueError("--mode=train_autoencoder needs config.autoencoder (e.g. configs/digits_ldm.py)")
    c = run_config(config)
    placement = parallel.get_placement(c.training.get("parallelism", "jit"))
    data = sources.get_source(c, build.stream_key(c, "split"), build.stream_key(c, "batches"))
    module, state = latent.initial_state(config, data.heldout["x"], build.stream_key(config, "autoencoder"))
    loss = latent.kind(config).loss(module, latent.autoencoder_settings(config), recon_loss)
    t = c.training
    ckpt = latent.checkpointer(config, ae_dir, allow_config_change, keep=t.get("keep_checkpoints", 1),
                               keep_period=t.snapshot_freq if t.snapshot_freq > 0 else None)
    restored = ckpt.restore(state, sharding=placement.state_sharding())
    if restored is not None:
        state, data_state = restored
        data.set_state(data_state)
    s = build.Setup(c, None, data, module.apply, latent.optimizer(config), state, ckpt, placement,
                    objective_fn=lambda train: objective_lib.from_loss(loss), workdir=ae_dir)
    return s, module


def make_heldout_metrics(s: build.Setup, kind: latent.Kind) -> Callable[[Any, np.ndarray, jax.Array],
                                                                         tuple[dict, dict]]:
    """`metrics(params, x, key)` -> (means, sums) on the (global) rows x, z sampled from `key`: means
    {"loss": the objective, and the kind's `Kind.batch_metrics`: KL "recon" Σ (x − x̂)², "kl"; VQ "recon",
    "quantization" Σ ‖z_e − e‖²} as floats, sums (VQ: the code "counts") as arrays."""
    objective = s.objective(train=False)

    def metrics(params, x, key):
        loss, aux = objective(params, key, {"x": x}, None)
        means, sums = kind.batch_metrics(aux)
        return {"loss": loss, **means}, sums

    fn = s.compiled.setdefault("autoencoder_metrics", jax.jit(metrics))

    def host(params, x, key):
        means, sums = fn(s.placement.on_mesh(params), s.placement.rows_on_mesh(x), key)
        return {k: float(to_host(v)) for k, v in means.items()}, {k: to_host(v) for k, v in sums.items()}

    return host


def heldout_log(s: build.Setup, kind: latent.Kind) -> Callable[[Any, int], dict]:
    """The loop's held-out record `eval_<name>` of `make_heldout_metrics` on the held-out batch, with the
    kind's `Kind.split_metrics` of it (VQ: the batch's codebook usage and perplexity)."""
    metrics, key = make_heldout_metrics(s, kind), build.stream_key(s.config, "eval")

    def record(params, step):
        means, sums = metrics(params, s.data.heldout["x"], key)
        return {f"eval_{k}": v for k, v in {**means, **kind.split_metrics(sums)}.items()}

    return record


def heldout_report(s: build.Setup, kind: latent.Kind) -> dict:
    """Over the test split: batch means of the objective and the kind's metrics (recon Σ (x − x̂)², KL or the
    quantisation error), recon per dimension, and the kind's `Kind.split_metrics` of the summed arrays (VQ:
    codes used, K and perplexity of the test split's code histogram)."""
    metrics, means, sums = make_heldout_metrics(s, kind), [], []
    key = build.stream_key(s.config, "eval")
    for i, batch in enumerate(s.data.eval_batches(s.config.eval.batch_size)):
        m, c = metrics(s.state.params, batch["x"], jax.random.fold_in(key, i))
        means.append(m)
        sums.append(c)
    mean = {k: float(np.mean([r[k] for r in means])) for k in means[0]}
    total = {k: np.sum([np.asarray(r[k], np.float64) for r in sums], axis=0) for k in sums[0]}
    dim = int(np.prod(np.shape(s.data.heldout["x"])[1:]))
    return {**mean, "mse_per_dim": mean["recon"] / dim, **kind.split_metrics(total), "num_batches": len(means)}


def estimate_scale(s: build.Setup, module: Any, config: ml_collections.ConfigDict) -> dict:
    """s = 1/std of every entry of the latents (the kind's `Kind.latents`: KL μ(x) or a sample, VQ z_e) of the
    next `autoencoder.scale_batches` training batches (all processes' rows; float64 statistics)."""
    n, mean_only = int(latent.autoencoder_settings(config)["scale_batches"]), latent.use_mean(config)
    encode = latent.kind(config).latents(module, mean_only)
    key = jax.random.fold_in(build.stream_key(config, "latent"), 3)
    chunk = s.data.chunk(int(s.state.step), n)
    rows = chunk["x"].shape[1]
    z = np.stack([np.asarray(encode(s.state.params, chunk["x"][i], jax.random.fold_in(key, i),
                                    jax.process_index() * rows)) for i in range(n)])
    if jax.process_count() > 1:
        z = np.asarray(multihost_utils.process_allgather(z, tiled=False))
    std = float(np.std(z.astype(np.float64)))
    return {"scale": 1.0 / std, "std": std, "mean": float(np.mean(z.astype(np.float64))), "use_mean": mean_only,
            "autoencoder_step": int(s.state.step), "num_batches": n, "num_values": int(z.size),
            "latent_shape": list(z.shape[-3:])}


def _write_once(path: pathlib.Path, obj: dict) -> None:
    """Write `obj` as JSON to `path` atomically (process 0)."""
    if jax.process_index() == 0:
        tmp = path.with_suffix(".json.tmp")
        write_json(tmp, obj)
        os.replace(tmp, path)


def _check_scale_step(config: ml_collections.ConfigDict, ae_dir: pathlib.Path) -> None:
    path = ae_dir / latent.SCALE_FILE
    if path.is_file():
        step, n_iters = json.loads(path.read_text())["autoencoder_step"], latent.autoencoder_settings(config)["n_iters"]
        if n_iters > step:
            raise ValueError(f"autoencoder.n_iters = {n_iters}, but the latent scale in {path} was estimated at "
                             f"autoencoder step {step} and is never recomputed: training on would change the encoder "
                             f"under it. Set autoencoder.n_iters = {step}, or use a fresh latent.autoencoder_workdir")


def _train(config: ml_collections.ConfigDict, ae_dir: pathlib.Path, allow_config_change: tuple[str, ...]) -> dict:
    _check_scale_step(config, ae_dir)
    s, module = autoencoder_setup(config, ae_dir, allow_config_change)
    writer, watcher, kind = MetricWriter(ae_dir), preemption.PreemptionWatcher(), latent.kind(config)
    try:
        metrics = trainer.run_steps(s, ae_dir, writer, watcher, heldout_metrics=heldout_log(s, kind))
    finally:
        watcher.close()
        writer.close()
    if metrics["preempted"]:
        return metrics
    scale_path = ae_dir / latent.SCALE_FILE
    if not scale_path.is_file():
        _write_once(scale_path, estimate_scale(s, module, config))
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("sdejax-latent-scale")
    metrics.update(test=heldout_report(s, kind), latent_scale=json.loads(scale_path.read_text()))
    if jax.process_index() == 0:
        write_json(ae_dir / "metrics.json", metrics)
    return metrics


def train_autoencoder(config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
                      allow_config_change: tuple[str, ...] = ()) -> dict:
    """Train the autoencoder to `autoencoder.n_iters` (resuming its newest checkpoint), then write the latent
    scale (once) and the test-split report; holds the autoencoder directory's lock meanwhile."""
    ae_dir = latent.autoencoder_dir(config, workdir)
    return workdir_lock.exclusive(_train)(config, ae_dir, tuple(allow_config_change))
