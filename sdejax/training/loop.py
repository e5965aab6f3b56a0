"""Drivers behind `sdejax --mode=train|eval|sample`: build everything from a config, train with
orbax checkpoints (resuming from the latest), evaluate loss and bits/dim on held-out data, sample.

Randomness: every stream is `fold_in(PRNGKey(config.seed), stream)`; the batch of step s is drawn
from `fold_in(data_key, s)` and the loss noise from the state's rng, so a resumed run continues
exactly as an uninterrupted one. EMA parameters are used for evaluation and sampling.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from tqdm.auto import tqdm

from sdejax import losses, score
from sdejax import sde as sde_lib
from sdejax.data import toy
from sdejax.training import checkpoint, config as config_lib, state as state_lib, step as step_lib

Array = jax.Array

_STREAMS = {"init": 0, "state": 1, "split": 2, "batches": 3, "eval": 4, "sample": 5, "entropy": 6}
SDE_PARAMS = {"vesde": ("sigma_min", "sigma_max"), "vpsde": ("beta_min", "beta_max"),
              "subvpsde": ("beta_min", "beta_max")}
SAMPLING_METHODS = ("pc", "ode")


class NonFiniteError(FloatingPointError):
    """Training produced a NaN/inf loss or gradient; the state was not saved."""


def _key(config: ml_collections.ConfigDict, stream: str) -> Array:
    return jax.random.fold_in(jax.random.PRNGKey(config.seed), _STREAMS[stream])


def get_sde(config: ml_collections.ConfigDict) -> sde_lib.SDE:
    """`config.training.sde` with its parameters from `config.model` (score_sde's key names)."""
    name = config.training.sde.lower()
    if name not in SDE_PARAMS:
        raise ValueError(f"unknown training.sde {config.training.sde!r}; valid: {sorted(SDE_PARAMS)}")
    kwargs = {k: float(config.model[k]) for k in SDE_PARAMS[name]}
    return sde_lib.get_sde(name, N=int(config.model.num_scales), **kwargs)


def build_model(config: ml_collections.ConfigDict, rng: Array, x: Array) -> tuple[Callable[..., Array], Any]:
    """(apply_fn, variables) for `config.model.name`. "mlp" is built here; every other name is
    resolved by the U-Net registry `sdejax.models.registry` (image models)."""
    m = config.model
    if m.name == "mlp":
        from sdejax.models.mlp import MLP, make_apply_fn

        model = MLP(features=m.features, depth=m.depth, embedding_type=m.embedding_type,
                    embedding_size=m.embedding_size, fourier_scale=m.fourier_scale, nonlinearity=m.nonlinearity)
        return make_apply_fn(model), model.init({"params": rng}, x[:1], jnp.ones((1,), x.dtype))
    from sdejax.models import registry

    if m.name not in registry.MODELS:
        raise ValueError(f"unknown model.name {m.name!r}; valid: {sorted(['mlp', *registry.MODELS])}")
    model, variables = registry.init_model(config, rng)
    return registry.make_apply_fn(model), variables


def get_loss_fn(config: ml_collections.ConfigDict, sde: sde_lib.SDE, apply_fn, train: bool):
    """Continuous DSM, or for `training.continuous = False` SMLD (VE) / DDPM (VP), as the original."""
    t = config.training
    if t.continuous:
        return losses.get_sde_loss_fn(sde, apply_fn, train, reduce_mean=t.reduce_mean, continuous=True,
                                      likelihood_weighting=t.likelihood_weighting,
                                      importance_weighting=t.get("importance_weighting", False),
                                      prediction=config.model.get("prediction"))
    discrete = {"vesde": losses.get_smld_loss_fn, "vpsde": losses.get_ddpm_loss_fn}
    name = t.sde.lower()
    if name not in discrete:
        raise ValueError(f"discrete training (training.continuous=False) supports {sorted(discrete)}; got {t.sde!r}")
    return discrete[name](sde, apply_fn, train, reduce_mean=t.reduce_mean)


def get_score_fn(config, sde, apply_fn, params):
    return score.get_score_fn(sde, apply_fn, params, prediction=config.model.get("prediction"),
                              continuous=config.training.continuous)


@dataclasses.dataclass(frozen=True)
class ToyData:
    """A toy distribution, a stateless batch source `batch_fn(rng)`, and the held-out points."""

    dist: toy.ToyDistribution
    batch_fn: Callable[[Array], dict]
    heldout: Array


def get_data(config: ml_collections.ConfigDict) -> ToyData:
    """Toy data from `config.data` (TFDS image pipelines plug in here with the same interface)."""
    d = config.data
    dist = toy.get_toy_distribution(d.dataset, **dict(d.get("dataset_kwargs", {})))
    train_x, heldout = toy.train_heldout_split(dist, _key(config, "split"), d.get("num_train", 0), d.num_heldout)
    return ToyData(dist, toy.make_batch_fn(dist, train_x, config.training.batch_size), heldout)


@dataclasses.dataclass
class Setup:
    """Everything the modes share, built from a config."""

    config: ml_collections.ConfigDict
    sde: sde_lib.SDE
    data: ToyData
    apply_fn: Callable[..., Array]
    tx: Any
    state: state_lib.TrainState
    checkpointer: checkpoint.Checkpointer


def setup(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> Setup:
    """Check the config, build SDE/data/model/optimizer, and restore the latest checkpoint if any."""
    config_lib.check_config(config)
    sde = get_sde(config)
    data = get_data(config)
    apply_fn, variables = build_model(config, _key(config, "init"), data.heldout)
    tx = state_lib.get_optimizer(config.optim)
    state = state_lib.create_train_state(variables, tx, _key(config, "state"))
    ckpt = checkpoint.Checkpointer(pathlib.Path(workdir) / "checkpoints", config.training.get("keep_checkpoints"))
    restored = ckpt.restore(state)
    return Setup(config, sde, data, apply_fn, tx, state if restored is None else restored, ckpt)


def _chunk_length(step: int, t: ml_collections.ConfigDict) -> int:
    """Steps until the next log/eval/snapshot/end event, at most `n_jitted_steps`."""
    freqs = [t.log_freq, t.eval_freq, t.snapshot_freq, t.snapshot_freq_for_preemption]
    nxt = min([t.n_iters] + [(step // f + 1) * f for f in freqs if f > 0])
    return min(nxt - step, t.get("n_jitted_steps", 1))


def _due(step: int, freq: int) -> bool:
    return freq > 0 and step % freq == 0


def _check_finite(metrics: dict, first_step: int, last_saved: Optional[int]) -> None:
    """Raise NonFiniteError naming the first step whose loss or gradient norm is NaN/inf."""
    values = {k: np.asarray(metrics[k]) for k in ("loss", "grad_norm")}
    bad = np.zeros_like(values["loss"], bool)
    for v in values.values():
        bad |= ~np.isfinite(v)
    if bad.any():
        i = int(np.argmax(bad))
        which = ", ".join(f"{k} = {v[i]}" for k, v in values.items() if not np.isfinite(v[i]))
        raise NonFiniteError(
            f"non-finite {which} at training step {first_step + i}; training stopped without saving. "
            f"Last good checkpoint: {'none' if last_saved is None else f'step {last_saved}'} (intact).")


def train(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict:
    """Train to `training.n_iters` (resuming from the latest checkpoint in `workdir`), checkpointing
    at multiples of `snapshot_freq` and `snapshot_freq_for_preemption`; then, with
    `eval.after_training`, write the eval/sampling report. Returns the metrics."""
    workdir = pathlib.Path(workdir)
    s = setup(config, workdir)
    t = config.training
    loss_fn = get_loss_fn(config, s.sde, s.apply_fn, train=True)
    multi_step = jax.jit(step_lib.make_multi_step(step_lib.make_train_step(loss_fn, s.tx, config.model.ema_rate)))
    data_key = _key(config, "batches")
    batches_fn = jax.jit(lambda steps: jax.vmap(lambda i: s.data.batch_fn(jax.random.fold_in(data_key, i)))(steps))
    eval_fn = _eval_loss_fn(config, s)
    state, step, last_saved = s.state, int(s.state.step), s.checkpointer.latest_step()
    log_path = workdir / "train_log.jsonl"
    start, last_loss = time.perf_counter(), None
    with tqdm(total=t.n_iters, initial=step, desc="train", unit="step") as pbar, open(log_path, "a") as log:
        while step < t.n_iters:
            k = _chunk_length(step, t)
            new_state, metrics = multi_step(state, batches_fn(jnp.arange(step, step + k)))
            try:
                _check_finite(metrics, step, last_saved)
            except NonFiniteError:
                s.checkpointer.wait()
                raise
            state, step = new_state, step + k
            last_loss = float(jnp.mean(metrics["loss"]))  # mean over this dispatch's steps
            pbar.update(k)
            record = {"step": step, "loss": last_loss}
            if _due(step, t.eval_freq):
                record["eval_loss"] = float(eval_fn(state.ema_params))
            if _due(step, t.log_freq) or "eval_loss" in record:
                pbar.set_postfix({key: f"{v:.4g}" for key, v in record.items() if key != "step"})
                logging.info("step %d: %s", step, record)
                log.write(json.dumps(record) + "\n")
            if _due(step, t.snapshot_freq) or _due(step, t.snapshot_freq_for_preemption) or step == t.n_iters:
                s.checkpointer.save(state)
                last_saved = step
    s.checkpointer.wait()
    metrics = {"steps": step, "final_loss": last_loss, "train_wall_s": time.perf_counter() - start}
    if config.eval.get("after_training", False):
        s.state = state
        metrics.update(report(s, workdir))
        _write_json(workdir / "metrics.json", metrics)
    return metrics


def _eval_loss_fn(config, s: Setup) -> Callable[[Any], Array]:
    """params -> DSM loss on the held-out points with a fixed key (eval-mode network)."""
    loss_fn = get_loss_fn(config, s.sde, s.apply_fn, train=False)
    rng, batch = _key(config, "eval"), {"x": s.data.heldout}
    return jax.jit(lambda params: loss_fn(params, rng, batch)[0])


def _compile(fn: Callable, *args) -> tuple[Callable, float]:
    """`fn` compiled ahead of time for `args`' shapes, and the compile time in seconds."""
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, time.perf_counter() - t0


def draw_samples(s: Setup, method: str, n: int, rng: Array) -> tuple[np.ndarray, dict]:
    """n samples with EMA params by `method` ("pc": config.sampling's predictor/corrector;
    "ode": the probability-flow ODE), and {"nfe", "compile_s", "wall_s"}."""
    if method not in SAMPLING_METHODS:
        raise ValueError(f"unknown sampling method {method!r}; valid: {list(SAMPLING_METHODS)}")
    from sdejax.sampling.ode import ode_sample
    from sdejax.sampling.pc import pc_sample

    c = s.config.sampling
    shape = (n,) + s.data.heldout.shape[1:]

    def sample(params, rng):
        score_fn = get_score_fn(s.config, s.sde, s.apply_fn, params)
        if method == "pc":
            return pc_sample(rng, s.sde, score_fn, shape, predictor=c.predictor, corrector=c.corrector, snr=c.snr,
                             n_steps=c.n_steps_each, probability_flow=c.probability_flow, denoise=c.noise_removal)
        return ode_sample(rng, s.sde, score_fn, shape, rtol=c.get("rtol", 1e-5), atol=c.get("atol", 1e-5),
                          denoise=c.noise_removal)

    compiled, compile_s = _compile(sample, s.state.ema_params, rng)
    start = time.perf_counter()
    x, nfe = jax.block_until_ready(compiled(s.state.ema_params, rng))
    return np.asarray(x), {"nfe": int(nfe), "compile_s": compile_s, "wall_s": time.perf_counter() - start}


def heldout_bits_per_dim(s: Setup) -> dict:
    """Bits/dim −log p(x)/(d ln 2) of the EMA model on the held-out points (PF-ODE likelihood at
    t = eps, continuous data: no dequantisation), mean and standard error, NFE and wall time."""
    from sdejax.likelihood import bits_per_dim, log_likelihood

    e, x = s.config.eval, s.data.heldout
    kwargs = dict(divergence=e.get("divergence", "hutchinson_rademacher"), num_probes=e.get("num_probes", 1),
                  rtol=e.get("rtol", 1e-5), atol=e.get("atol", 1e-5))

    def nll_bits(params, rng, xb):
        score_fn = get_score_fn(s.config, s.sde, s.apply_fn, params)
        logp, _, nfe = log_likelihood(rng, s.sde, score_fn, xb, **kwargs)
        return bits_per_dim(logp, xb.shape, n_bits=None), nfe

    bs = min(e.batch_size, x.shape[0])
    if bs == 0:
        raise ValueError("no held-out points: set data.num_heldout > 0")
    batches = [x[i:i + bs] for i in range(0, x.shape[0] - bs + 1, bs)]  # a remainder < bs is dropped
    keys = [jax.random.fold_in(_key(s.config, "eval"), i) for i in range(len(batches))]
    compiled, compile_s = _compile(nll_bits, s.state.ema_params, keys[0], batches[0])
    start, bits, nfes = time.perf_counter(), [], []
    for key, xb in zip(keys, batches):
        b, nfe = jax.block_until_ready(compiled(s.state.ema_params, key, xb))
        bits.append(np.asarray(b))
        nfes.append(int(nfe))
    bits = np.concatenate(bits)
    return {"bits_per_dim": float(bits.mean()), "bits_per_dim_se": float(bits.std() / np.sqrt(bits.size)),
            "num_points": int(bits.size), "nfe_per_batch": float(np.mean(nfes)), "compile_s": compile_s,
            "wall_s": time.perf_counter() - start}


def true_entropy_bits_per_dim(s: Setup, n: int = 200_000) -> Optional[dict]:
    """Monte-Carlo entropy of the true data density in bits/dim (None without a closed form)."""
    if s.data.dist.log_prob is None:
        return None
    h, se = s.data.dist.entropy(_key(s.config, "entropy"), n)
    scale = s.data.dist.dim * np.log(2.0)
    return {"bits_per_dim": h / scale, "bits_per_dim_se": se / scale, "num_samples": n}


def _eval_metrics(s: Setup) -> dict:
    """Held-out loss and bits/dim (EMA params) and the true entropy, as `config.eval` enables."""
    e = s.config.eval
    out: dict[str, Any] = {"step": int(s.state.step)}
    if e.enable_loss:
        out["heldout_loss"] = float(_eval_loss_fn(s.config, s)(s.state.ema_params))
    if e.enable_bpd:
        out["heldout"] = heldout_bits_per_dim(s)
        if (true := true_entropy_bits_per_dim(s)) is not None:
            out["true_entropy"] = true
    return out


def report(s: Setup, workdir: pathlib.Path) -> dict:
    """The quick-start report: `_eval_metrics`, then PC and probability-flow ODE samples (NFE, wall
    time) saved to `samples.npz` and plotted beside the data in `samples.png`."""
    out = _eval_metrics(s)
    if s.config.eval.enable_sampling:
        samples, out["samplers"] = {}, {}
        for i, method in enumerate(SAMPLING_METHODS):
            rng = jax.random.fold_in(_key(s.config, "sample"), i)
            samples[method], out["samplers"][method] = draw_samples(s, method, s.config.eval.num_samples, rng)
        save_png(workdir / "samples.png", np.asarray(s.data.heldout), samples)
        np.savez(workdir / "samples.npz", **samples)
    return out


def evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict:
    """Held-out loss and bits/dim of the latest checkpoint (EMA), written to `eval_metrics.json`."""
    workdir = pathlib.Path(workdir)
    out = _eval_metrics(_setup_restored(config, workdir))
    _write_json(workdir / "eval_metrics.json", out)
    return out


def sample(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict:
    """`eval.num_samples` samples of the latest checkpoint (EMA) by `sampling.method`, written to
    `samples/samples_<step>.npz` and `.png`."""
    workdir = pathlib.Path(workdir)
    s = _setup_restored(config, workdir)
    x, info = draw_samples(s, config.sampling.method, config.eval.num_samples, _key(config, "sample"))
    out_dir = workdir / "samples"
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"samples_{int(s.state.step)}"
    np.savez(f"{stem}.npz", samples=x)
    save_png(pathlib.Path(f"{stem}.png"), np.asarray(s.data.heldout), {config.sampling.method: x})
    return {"step": int(s.state.step), "path": f"{stem}.npz", **info}


def _setup_restored(config, workdir: pathlib.Path) -> Setup:
    s = setup(config, workdir)
    if s.checkpointer.latest_step() is None:
        raise FileNotFoundError(f"no checkpoint in {workdir / 'checkpoints'}; run --mode=train first")
    return s


def save_png(path: pathlib.Path, data: np.ndarray, samples: dict[str, np.ndarray]) -> None:
    """Scatter plots (first two coordinates) of the data beside each sampler's samples."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = {"data (held-out)": data, **{f"{k} samples": v for k, v in samples.items()}}
    lo, hi = np.percentile(data[:, :2], 0.5, axis=0), np.percentile(data[:, :2], 99.5, axis=0)
    pad = 0.15 * (hi - lo)
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4), squeeze=False)
    for ax, (title, pts) in zip(axes[0], panels.items()):
        ax.scatter(pts[:, 0], pts[:, 1], s=1, alpha=0.4)
        ax.set(title=title, xlim=(lo[0] - pad[0], hi[0] + pad[0]), ylim=(lo[1] - pad[1], hi[1] + pad[1]),
               aspect="equal")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _write_json(path: pathlib.Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
