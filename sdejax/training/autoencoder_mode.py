"""`sdejax --mode=train_autoencoder`: the KL autoencoder of latent diffusion (`sdejax.training.latent`),
trained on the run's image data with its own checkpoints in `<autoencoder dir>/checkpoints` (default
`<workdir>/autoencoder`; resumable as every run), logs there (`train_log.jsonl`, TensorBoard: the loss,
and at `training.eval_freq` the held-out reconstruction and KL), and, once trained, the latent scale
`latent_scale.json` and the test-split report `metrics.json`.

Loss (pixel only; `sdejax.autoencoders.vae_loss`), per example with z = μ + σ ε:

    L(x) = Σ_pixels (x − D(z))² + β KL(q(z|x) ‖ N(0, I)),   β = `autoencoder.beta`.

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
import jax.numpy as jnp
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
    loss = autoencoders.vae_loss(lambda p, x: module.apply(p, x, method="encode"),
                                 lambda p, z: module.apply(p, z, method="decode"),
                                 beta=float(latent.autoencoder_settings(config)["beta"]), recon_loss=recon_loss)
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


def make_heldout_metrics(s: build.Setup) -> Callable[[Any, np.ndarray, jax.Array], dict]:
    """`metrics(params, x, key)` -> {"eval_loss", "eval_recon", "eval_kl"}: batch means of the objective,
    Σ (x − x̂)² and KL on the (global) rows x, z sampled from `key`."""
    objective = s.objective(train=False)

    def metrics(params, x, key):
        loss, aux = objective(params, key, {"x": x}, None)
        return {"eval_loss": loss, "eval_recon": jnp.mean(aux["recon"]), "eval_kl": jnp.mean(aux["kl"])}

    fn = s.compiled.setdefault("autoencoder_metrics", jax.jit(metrics))
    return lambda params, x, key: {k: float(to_host(v)) for k, v in fn(s.placement.on_mesh(params),
                                                                        s.placement.rows_on_mesh(x), key).items()}


def heldout_report(s: build.Setup) -> dict:
    """Means over the test split: recon Σ (x − x̂)², its per-dimension mean, KL and the objective."""
    metrics, rows = make_heldout_metrics(s), []
    key = build.stream_key(s.config, "eval")
    for i, batch in enumerate(s.data.eval_batches(s.config.eval.batch_size)):
        rows.append(metrics(s.state.params, batch["x"], jax.random.fold_in(key, i)))
    mean = {k[len("eval_"):]: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    dim = int(np.prod(np.shape(s.data.heldout["x"])[1:]))
    return {**mean, "mse_per_dim": mean["recon"] / dim, "num_batches": len(rows)}


def estimate_scale(s: build.Setup, module: Any, config: ml_collections.ConfigDict) -> dict:
    """s = 1/std of every entry of the latents (`latent.encoder`) of the next `autoencoder.scale_batches`
    training batches (all processes' rows; float64 statistics)."""
    n, mean_only = int(latent.autoencoder_settings(config)["scale_batches"]), latent.use_mean(config)
    encode, key = latent.encoder(module, mean_only), jax.random.fold_in(build.stream_key(config, "latent"), 3)
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
    writer, watcher = MetricWriter(ae_dir), preemption.PreemptionWatcher()
    heldout, key = make_heldout_metrics(s), build.stream_key(s.config, "eval")
    try:
        metrics = trainer.run_steps(s, ae_dir, writer, watcher,
                                    heldout_metrics=lambda params, step: heldout(params, s.data.heldout["x"], key))
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
    metrics.update(test=heldout_report(s), latent_scale=json.loads(scale_path.read_text()))
    if jax.process_index() == 0:
        write_json(ae_dir / "metrics.json", metrics)
    return metrics


def train_autoencoder(config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
                      allow_config_change: tuple[str, ...] = ()) -> dict:
    """Train the autoencoder to `autoencoder.n_iters` (resuming its newest checkpoint), then write the latent
    scale (once) and the test-split report; holds the autoencoder directory's lock meanwhile."""
    ae_dir = latent.autoencoder_dir(config, workdir)
    return workdir_lock.exclusive(_train)(config, ae_dir, tuple(allow_config_change))
