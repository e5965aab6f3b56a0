"""Drivers behind `sdejax --mode=train|eval|sample`: build everything from a config, train
data-parallel over all devices of all processes with orbax checkpoints (resuming from the latest,
data-iterator position included), evaluate loss and bits/dim on held-out data, sample.

Randomness: every stream is `fold_in(PRNGKey(config.seed), stream)`. Toy batches of step s are
drawn from `fold_in(data_key, s)`; image batches come from the TFDS pipeline, whose iterator state
is checkpointed; the loss noise comes from the state's rng, folded per example with its global
index (`step.py`). A resumed run therefore continues exactly as an uninterrupted one, and the
trajectory does not depend on the number of devices or processes. EMA parameters are used for
evaluation and sampling.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import pathlib
import time
from typing import Any, Callable, Iterator, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from sdejax import losses, score
from sdejax import precond as precond_lib
from sdejax import sde as sde_lib
from sdejax.data import toy
from sdejax.models import convert_flax
from sdejax.sampling import methods
from sdejax.training import checkpoint, config as config_lib, parallel, preemption, state as state_lib
from sdejax.training import step as step_lib, workdir_lock
from sdejax.training.checkpoint import NonFiniteError  # noqa: F401 (re-exported)
from sdejax.training.writer import MetricWriter

Array = jax.Array

_STREAMS = {"init": 0, "state": 1, "split": 2, "batches": 3, "eval": 4, "sample": 5, "entropy": 6, "monitor": 7}
SDE_PARAMS = {"vesde": ("sigma_min", "sigma_max"), "vpsde": ("beta_min", "beta_max"),
              "subvpsde": ("beta_min", "beta_max"), "cosinevpsde": (), "edmsde": ("sigma_min", "sigma_max")}
PRECONDS = ("default", "plain", "edm")
REPORT_METHODS = ("pc", "ode", "dpm_solver")


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


def get_precond(config: ml_collections.ConfigDict, sde: sde_lib.SDE) -> precond_lib.Precond:
    """`model.precond`: "default" (the schedule's own, `sde.default_precond`, with `model.prediction`),
    "plain" (`model.prediction` from labels `model.noise_labels`) or "edm" (`model.sigma_data`)."""
    m = config.model
    name = m.get("precond", "default")
    if name not in PRECONDS:
        raise ValueError(f"unknown model.precond {name!r}; valid: {list(PRECONDS)}")
    if name == "edm":
        return precond_lib.Precond.edm(float(m.get("sigma_data", 0.5)))
    if name == "plain":
        return precond_lib.Precond.plain(m.get("prediction") or "eps", m.get("noise_labels", "time"))
    return score.resolve_precond(sde, None, m.get("prediction"), config.training.continuous)


def get_loss_fn(config: ml_collections.ConfigDict, sde: sde_lib.SDE, apply_fn, train: bool):
    """Continuous DSM (EDM's loss with model.precond = "edm" and training.time_sampling = "lognormal"),
    or for `training.continuous = False` SMLD (VE) / DDPM (VP), as the original."""
    t = config.training
    if t.continuous:
        return losses.get_sde_loss_fn(sde, apply_fn, train, reduce_mean=t.reduce_mean, continuous=True,
                                      likelihood_weighting=t.likelihood_weighting,
                                      importance_weighting=t.get("importance_weighting", False),
                                      precond=get_precond(config, sde), eps=t.get("eps", max(1e-5, sde.t_min)),
                                      time_sampling=t.get("time_sampling", "uniform"),
                                      p_mean=t.get("p_mean", -1.2), p_std=t.get("p_std", 1.2))
    discrete = {"vesde": losses.get_smld_loss_fn, "vpsde": losses.get_ddpm_loss_fn}
    name = t.sde.lower()
    if name not in discrete:
        raise ValueError(f"discrete training (training.continuous=False) supports {sorted(discrete)}; got {t.sde!r}")
    return discrete[name](sde, apply_fn, train, reduce_mean=t.reduce_mean)


def get_score_fn(config, sde, apply_fn, params):
    return score.get_score_fn(sde, apply_fn, params, precond=get_precond(config, sde))


def _process_rows(x: np.ndarray, axis: int = 0) -> np.ndarray:
    """This process's block of rows [p·n/P, (p+1)·n/P) along `axis` of a global batch."""
    n = x.shape[axis] // jax.process_count()
    return np.take(x, np.arange(jax.process_index() * n, (jax.process_index() + 1) * n), axis=axis)


@dataclasses.dataclass
class ToyData:
    """A toy distribution, a stateless batch source `batch_fn(rng)`, and the held-out points.

    `chunk(step, k)` = this process's rows of the batches of steps step..step+k−1, each drawn from
    `fold_in(data_key, step)` (so no iterator state is needed to resume)."""

    dist: toy.ToyDistribution
    batch_fn: Callable[[Array], dict]
    heldout: Array
    data_key: Array
    num_levels: Optional[int] = None  # continuous data

    def __post_init__(self):
        key, fn = self.data_key, self.batch_fn
        self._batches = jax.jit(lambda steps: jax.vmap(lambda i: fn(jax.random.fold_in(key, i)))(steps))

    def chunk(self, step: int, k: int) -> dict:
        return {"x": _process_rows(np.asarray(self._batches(jnp.arange(step, step + k))["x"]), axis=1)}

    def get_state(self) -> dict:
        return {}

    def set_state(self, state: dict) -> None:
        del state

    def eval_batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """This process's rows of consecutive held-out batches (a remainder < batch_size is dropped)."""
        x = np.asarray(self.heldout)
        for i in range(0, x.shape[0] - batch_size + 1, batch_size):
            yield _process_rows(x[i:i + batch_size])


@dataclasses.dataclass
class ImageData:
    """A TFDS image dataset (`sdejax.data.datasets`): the process-local train iterator (exact
    `get_state`/`set_state`), a held-out batch for the eval loss, and the data scaler."""

    config: ml_collections.ConfigDict
    train_iter: Any
    heldout: np.ndarray
    num_levels: int

    def _scale(self, images: np.ndarray) -> np.ndarray:
        from sdejax.data.datasets import get_data_scaler

        return np.asarray(get_data_scaler(self.config)(images), np.float32)

    def chunk(self, step: int, k: int) -> dict:
        del step  # the iterator's own position is checkpointed
        return {"x": self._scale(np.stack([next(self.train_iter)["image"] for _ in range(k)]))}

    def get_state(self) -> dict:
        return self.train_iter.get_state()

    def set_state(self, state: dict) -> None:
        if state:
            self.train_iter.set_state(state)

    def eval_batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """This process's rows of the test split in file order, one pass, dequantised as in training
        (`config.eval.batch_size` global batches)."""
        del batch_size
        from sdejax.data import datasets

        _, it = datasets.get_dataset(self.config, evaluation=True)
        for batch in it:
            yield self._scale(batch["image"])


def _is_image_dataset(config) -> bool:
    from sdejax.data.registry import DATASETS

    return config.data.dataset in DATASETS


def get_data(config: ml_collections.ConfigDict):
    """Toy data (`sdejax.data.toy`) or a TFDS image dataset (`sdejax.data.datasets`) by `config.data.dataset`."""
    d = config.data
    if _is_image_dataset(config):
        from sdejax.data import datasets, registry

        train_iter, eval_iter = datasets.get_dataset(config)
        data = ImageData(config, train_iter, None, registry.get_spec(config).num_levels)
        data.heldout = data._scale(next(iter(eval_iter))["image"])  # pylint: disable=protected-access
        return data
    dist = toy.get_toy_distribution(d.dataset, **dict(d.get("dataset_kwargs", {})))
    train_x, heldout = toy.train_heldout_split(dist, _key(config, "split"), d.get("num_train", 0), d.num_heldout)
    return ToyData(dist, toy.make_batch_fn(dist, train_x, config.training.batch_size), heldout,
                   _key(config, "batches"))


@dataclasses.dataclass
class Setup:
    """Everything the modes share, built from a config. `state` is un-replicated (what is saved)."""

    config: ml_collections.ConfigDict
    sde: sde_lib.SDE
    data: Any
    apply_fn: Callable[..., Array]
    tx: Any
    state: state_lib.TrainState
    checkpointer: checkpoint.Checkpointer
    placement: parallel.Placement


def setup(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, allow_config_change: tuple[str, ...] = ()) \
        -> Setup:
    """Check the config, build SDE/data/model/optimizer/placement, and restore the newest intact
    checkpoint (state and data-iterator position) if any; its config must match this one outside
    `checkpoint.MAY_CHANGE` and the keys named in `allow_config_change`."""
    config_lib.check_config(config)
    placement = parallel.get_placement(config.training.get("parallelism", "jit"))
    sde = get_sde(config)
    data = get_data(config)
    apply_fn, variables = build_model(config, _key(config, "init"), jnp.asarray(data.heldout))
    get_loss_fn(config, sde, apply_fn, train=True)  # the objective's and the sampler's settings fail
    methods.from_config(config.sampling)  # here, before any work
    tx = state_lib.get_optimizer(config.optim)
    flax_checkpoint = config.model.get("flax_checkpoint", "")
    if flax_checkpoint:  # a score_sde (JAX/Flax) checkpoint: its training params, and its EMA
        original = convert_flax.read_flax_checkpoint(flax_checkpoint)
        variables = convert_flax.from_flax_params(original["optimizer"]["target"], config)
    state = state_lib.create_train_state(variables, tx, _key(config, "state"))
    if flax_checkpoint:
        state = state.replace(ema_params=convert_flax.from_flax_params(original["params_ema"], config))
    t = config.training
    ckpt = checkpoint.Checkpointer(pathlib.Path(workdir) / "checkpoints", keep=t.get("keep_checkpoints", 1),
                                   keep_period=t.snapshot_freq if t.snapshot_freq > 0 else None,
                                   config=config.to_dict(), allow_config_change=allow_config_change)
    restored = ckpt.restore(state, sharding=placement.state_sharding())
    if restored is not None:
        state, data_state = restored
        data.set_state(data_state)
    return Setup(config, sde, data, apply_fn, tx, state, ckpt, placement)


def _chunk_length(step: int, t: ml_collections.ConfigDict) -> int:
    """Steps until the next log/eval/snapshot/end event, at most `n_jitted_steps`."""
    freqs = [t.log_freq, t.eval_freq, t.snapshot_freq, t.snapshot_freq_for_preemption]
    nxt = min([t.n_iters] + [(step // f + 1) * f for f in freqs if f > 0])
    return min(nxt - step, t.get("n_jitted_steps", 1))


def _due(step: int, freq: int) -> bool:
    return freq > 0 and step % freq == 0


def _check_finite(metrics: dict, first_step: int) -> None:
    """Raise NonFiniteError naming the first step whose loss or gradient norm is NaN/inf."""
    values = {k: np.asarray(metrics[k]) for k in ("loss", "grad_norm")}
    bad = np.zeros_like(values["loss"], bool)
    for v in values.values():
        bad |= ~np.isfinite(v)
    if bad.any():
        i = int(np.argmax(bad))
        which = ", ".join(f"{k} = {v[i]}" for k, v in values.items() if not np.isfinite(v[i]))
        raise NonFiniteError(
            f"non-finite {which} at training step {first_step + i}; training stopped without saving.")


def _to_host(x: Array) -> np.ndarray:
    """A global array gathered to every process as numpy."""
    return np.asarray(multihost_utils.process_allgather(x, tiled=True) if jax.process_count() > 1 else x)


def _learning_rate(config, step: int) -> float:
    return float(state_lib.get_lr_schedule(config.optim)(step))


@workdir_lock.exclusive
def train(config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
          allow_config_change: tuple[str, ...] = ()) -> dict:
    """Train to `training.n_iters` (resuming from the latest checkpoint in `workdir`).

    Checkpoints: rolling ones every `snapshot_freq_for_preemption` steps (the newest
    `keep_checkpoints` kept), retained snapshots every `snapshot_freq` steps (with sample grids if
    `snapshot_sampling`), the final step, and on SIGTERM (all processes at the same step, then
    return with `preempted = True`). Logs to TensorBoard and `train_log.jsonl` every `log_freq`
    steps; eval loss every `eval_freq`. With `eval.after_training`, writes the eval/sampling report.
    """
    workdir = pathlib.Path(workdir)
    s = setup(config, workdir, allow_config_change)
    t = config.training
    accum = t.get("grad_accum_steps", 1)
    parallel.check_batch_size(t.batch_size, accum, s.placement)
    loss_fn = get_loss_fn(config, s.sde, s.apply_fn, train=True)
    unroll = t.get("unroll_steps", None)
    unroll = jax.default_backend() == "cpu" if unroll is None else unroll  # see sdejax.training.step
    train_step = step_lib.make_train_step(loss_fn, s.tx, config.model.ema_rate,
                                          ema_warmup=config.model.get("ema_warmup", False), grad_accum_steps=accum,
                                          axis_name=parallel.AXIS if s.placement.mode == "pmap" else None,
                                          unroll=unroll)
    multi_step = s.placement.compile(step_lib.make_multi_step(train_step, unroll))
    eval_fn = _eval_loss_fn(config, s)
    state, step = s.placement.replicate(s.state), int(s.state.step)
    if (idle := config_lib.nothing_to_train(step, t.n_iters)) is not None:
        logging.warning(idle)
    monitor = make_monitor(config) if t.get("snapshot_sampling", False) and t.snapshot_freq > 0 else None
    writer, watcher = MetricWriter(workdir), preemption.PreemptionWatcher()
    start, last_loss, preempted = time.perf_counter(), None, False
    tick, tick_step, window = time.perf_counter(), step, []
    try:
        with tqdm(total=t.n_iters, initial=step, desc="train", unit="step", disable=jax.process_index() > 0) as pbar:
            while step < t.n_iters and not preempted:
                k = _chunk_length(step, t)
                new_state, metrics = multi_step(state, s.placement.shard_batches(s.data.chunk(step, k)))
                try:
                    _check_finite(metrics, step)
                except NonFiniteError as e:
                    newest = s.checkpointer.latest_step()  # waits for the save in flight, verifies checksums
                    raise NonFiniteError(f"{e} Newest intact checkpoint: "
                                         f"{'none' if newest is None else f'step {newest}'}.") from None
                state, step = new_state, step + k
                window.append(metrics)
                last_loss = float(np.mean(metrics["loss"]))  # mean over this dispatch's steps
                pbar.update(k)
                preempted = watcher.reached()
                record = {}
                if _due(step, t.eval_freq):
                    record["eval_loss"] = float(eval_fn(s.placement.unreplicate(state).ema_params))
                if _due(step, t.log_freq) or step == t.n_iters:
                    now = time.perf_counter()
                    steps_per_s = (step - tick_step) / (now - tick)
                    record.update(loss=float(np.mean([np.mean(m["loss"]) for m in window])),
                                  grad_norm=float(np.mean([np.mean(m["grad_norm"]) for m in window])),
                                  learning_rate=_learning_rate(config, step - 1), steps_per_s=steps_per_s,
                                  examples_per_s=steps_per_s * t.batch_size)
                    tick, tick_step, window = now, step, []
                if record:
                    pbar.set_postfix({key: f"{v:.4g}" for key, v in record.items() if "loss" in key})
                    logging.info("step %d: %s", step, record)
                    writer.scalars(step, record)
                snapshot = _due(step, t.snapshot_freq)
                if snapshot or _due(step, t.snapshot_freq_for_preemption) or step == t.n_iters or preempted:
                    host_state = s.placement.unreplicate(state)
                    s.checkpointer.save(host_state, s.data.get_state(), force=preempted)
                    if snapshot and t.get("snapshot_sampling", False):
                        s.state = host_state
                        snapshot_samples(s, workdir, writer, monitor)
        s.checkpointer.wait()
    finally:
        watcher.close()
        writer.close()
    s.state = s.placement.unreplicate(state)
    metrics = {"steps": step, "final_loss": last_loss, "train_wall_s": time.perf_counter() - start,
               "preempted": preempted}
    if preempted:
        logging.warning("preempted: saved step %d; rerun the same command to resume", step)
    elif config.eval.get("after_training", False):
        metrics.update(report(s, workdir))
        if jax.process_index() == 0:
            _write_json(workdir / "metrics.json", metrics)
    return metrics


def _eval_loss_fn(config, s: Setup) -> Callable[[Any], float]:
    """params -> DSM loss on the held-out batch with a fixed key (eval-mode network), sharded
    over the mesh."""
    loss_fn = get_loss_fn(config, s.sde, s.apply_fn, train=False)
    rng = _key(config, "eval")
    local = s.data.heldout if isinstance(s.data, ImageData) else _process_rows(np.asarray(s.data.heldout))
    x = s.placement.rows_on_mesh(np.asarray(local))
    fn = jax.jit(lambda params, x: loss_fn(params, rng, {"x": x})[0])
    return lambda params: float(_to_host(fn(s.placement.on_mesh(params), x)))


def _compile(fn: Callable, *args, **jit_kwargs) -> tuple[Callable, float]:
    """`fn` compiled ahead of time for `args`' shapes, and the compile time in seconds."""
    t0 = time.perf_counter()
    compiled = jax.jit(fn, **jit_kwargs).lower(*args).compile()
    return compiled, time.perf_counter() - t0


def _data_shape(s: Setup) -> tuple[int, ...]:
    return tuple(np.shape(s.data.heldout)[1:])


def make_sampler(s: Setup, method: str, n: int, local: bool = False) -> tuple[Callable[[Array], tuple[Array, Array]], float]:
    """`sampler(rng) -> (x, nfe)`: n samples with EMA params by `method` (any name in
    `sdejax.sampling.methods.METHODS`, with the options config.sampling gives it), compiled once,
    and the compile time.

    By default one global program over the mesh (samples sharded over all devices of all processes
    when n divides; every process must pass the same rng); `local=True` runs on this process's
    devices only (each process may call it with its own rng, any number of times)."""
    draw = methods.from_config({**s.config.sampling.to_dict(), "method": method})
    shape = (n,) + _data_shape(s)

    def sample(params, rng):
        return draw(rng, s.sde, get_score_fn(s.config, s.sde, s.apply_fn, params), shape)

    if local:
        mesh = Mesh(np.asarray(jax.local_devices()), (parallel.AXIS,))
        params = jax.device_put(jax.tree_util.tree_map(_local_copy, s.state.ema_params), NamedSharding(mesh, P()))
    else:
        mesh, params = s.placement.mesh, s.placement.on_mesh(s.state.ema_params)
    out_sharding = NamedSharding(mesh, P(parallel.AXIS) if n % mesh.size == 0 else P())
    compiled, compile_s = _compile(sample, params, jax.random.PRNGKey(0),
                                   out_shardings=(out_sharding, NamedSharding(mesh, P())))
    return (lambda rng: compiled(params, rng)), compile_s


def _local_copy(x: Any) -> np.ndarray:
    """A host copy of a (replicated) array, read from this process's first shard."""
    return np.asarray(x.addressable_data(0) if isinstance(x, jax.Array) else x)


def draw_samples(s: Setup, method: str, n: int, rng: Array) -> tuple[np.ndarray, dict]:
    """n samples by `method` (see `make_sampler`) gathered to host, and {"nfe", "compile_s", "wall_s"}."""
    sampler, compile_s = make_sampler(s, method, n)
    start = time.perf_counter()
    x, nfe = jax.block_until_ready(sampler(rng))
    return _to_host(x), {"nfe": int(_to_host(nfe)), "compile_s": compile_s, "wall_s": time.perf_counter() - start}


def fid_eval(s: Setup, workdir: pathlib.Path) -> dict:
    """FID/KID/IS of `eval.num_samples` samples by `sampling.method` (EMA params) against the
    reference statistics of `--mode=fid_stats` (`sdejax.evaluation.workflow.fid_eval`: batches of
    `eval.batch_size` with per-batch keys from `config.seed`, spread over the processes); each
    process samples on its own devices with a sampler compiled once."""
    from sdejax.evaluation import workflow

    c = s.config
    sampler, compile_s = make_sampler(s, c.sampling.method, c.eval.batch_size, local=True)

    def sample_fn(rng, n):
        x, nfe = sampler(rng)
        return np.asarray(x)[:n], int(nfe)

    settings = {k: c.sampling[k] for k in sorted(c.sampling.keys())}
    return workflow.fid_eval(c, workdir, sample_fn, num_samples=c.eval.num_samples, seed=c.seed,
                             sampler_metadata={**settings, "compile_s": compile_s}, tag=str(int(s.state.step)))


def heldout_bits_per_dim(s: Setup) -> dict:
    """Bits/dim of the EMA model on the held-out data (PF-ODE likelihood at t = eps), mean and
    standard error, NFE and wall time; batches sharded over the mesh.

    Toy data is continuous: −log p(x)/(D ln 2). Images (levels 0..L−1, dequantised to [0, 1] and
    scaled to the model's range [lo, hi]): −(log p(y) + D log(hi − lo))/(D ln 2) + log2 L
    (`sdejax.likelihood.bits_per_dim`); L = 17 for the digits, so their bits/dim are not comparable
    with 8-bit images'."""
    from sdejax.likelihood import bits_per_dim, log_likelihood

    e = s.config.eval
    kwargs = dict(divergence=e.get("divergence", "hutchinson_rademacher"), num_probes=e.get("num_probes", 1),
                  rtol=e.get("rtol", 1e-5), atol=e.get("atol", 1e-5))
    n_bits = None if s.data.num_levels is None else math.log2(s.data.num_levels)
    centered = isinstance(s.data, ImageData) and s.config.data.centered
    data_range = (-1.0, 1.0) if centered else (0.0, 1.0)

    def nll_bits(params, rng, xb):
        score_fn = get_score_fn(s.config, s.sde, s.apply_fn, params)
        logp, _, nfe = log_likelihood(rng, s.sde, score_fn, xb, **kwargs)
        return bits_per_dim(logp, xb.shape, data_range=data_range, n_bits=n_bits), nfe

    batch_size = min(e.batch_size, np.shape(s.data.heldout)[0] * jax.process_count())
    params = s.placement.on_mesh(s.state.ema_params)
    compiled, compile_s, start, bits, nfes = None, 0.0, time.perf_counter(), [], []
    limit = e.get("num_bpd_batches", 0) or None
    for i, local in enumerate(itertools.islice(s.data.eval_batches(batch_size), limit)):
        xb, key = s.placement.rows_on_mesh(local), jax.random.fold_in(_key(s.config, "eval"), i)
        if compiled is None:
            compiled, compile_s = _compile(nll_bits, params, key, xb)
            start = time.perf_counter()
        b, nfe = jax.block_until_ready(compiled(params, key, xb))
        bits.append(_to_host(b))
        nfes.append(int(_to_host(nfe)))
    if not bits:
        raise ValueError("no held-out batch: set data.num_heldout (toy) or eval.batch_size (images) so that "
                         "at least one full eval batch exists")
    bits = np.concatenate(bits)
    return {"bits_per_dim": float(bits.mean()), "bits_per_dim_se": float(bits.std() / np.sqrt(bits.size)),
            "num_points": int(bits.size), "nfe_per_batch": float(np.mean(nfes)), "compile_s": compile_s,
            "wall_s": time.perf_counter() - start}


def true_entropy_bits_per_dim(s: Setup, n: int = 200_000) -> Optional[dict]:
    """Monte-Carlo entropy of the true data density in bits/dim (None without a closed form)."""
    if not isinstance(s.data, ToyData) or s.data.dist.log_prob is None:
        return None
    h, se = s.data.dist.entropy(_key(s.config, "entropy"), n)
    scale = s.data.dist.dim * np.log(2.0)
    return {"bits_per_dim": h / scale, "bits_per_dim_se": se / scale, "num_samples": n}


def _eval_metrics(s: Setup) -> dict:
    """Held-out loss and bits/dim (EMA params) and the true entropy, as `config.eval` enables."""
    e = s.config.eval
    out: dict[str, Any] = {"step": int(s.state.step)}
    if e.enable_loss:
        out["heldout_loss"] = _eval_loss_fn(s.config, s)(s.state.ema_params)
    if e.enable_bpd:
        out["heldout"] = heldout_bits_per_dim(s)
        if (true := true_entropy_bits_per_dim(s)) is not None:
            out["true_entropy"] = true
    return out


def _save_samples(s: Setup, stem: pathlib.Path, samples: dict[str, np.ndarray]) -> None:
    """`<stem>.npz` and `<stem>.png` (scatter plots for toy data, image grids for images); process 0 only."""
    if jax.process_index() > 0:
        return
    stem.parent.mkdir(parents=True, exist_ok=True)
    np.savez(f"{stem}.npz", **samples)
    if isinstance(s.data, ImageData):
        for name, x in samples.items():
            save_image_grid(pathlib.Path(f"{stem}_{name}.png" if len(samples) > 1 else f"{stem}.png"),
                            image_grid(s, x))
    else:
        save_png(pathlib.Path(f"{stem}.png"), np.asarray(s.data.heldout), samples)


def make_monitor(config: ml_collections.ConfigDict) -> Optional[Callable[[np.ndarray], dict]]:
    """With `training.digits_monitor` (DIGITS data only): `samples (model range) -> {"digits_frechet_distance"}`,
    the Fréchet distance of an in-project digits classifier's features against the test split
    (`sdejax.evaluation.digits_monitor`; NOT FID); the classifier is trained once, here."""
    if not config.training.get("digits_monitor", False):
        return None
    if config.data.dataset.upper() != "DIGITS":
        raise ValueError(f"training.digits_monitor needs data.dataset='DIGITS'; got {config.data.dataset!r}")
    from sdejax.data import datasets
    from sdejax.evaluation import digits_monitor

    monitor = digits_monitor.make_digits_monitor(digits_monitor.train_digits_classifier(_key(config, "monitor")))
    inverse_scaler = datasets.get_data_inverse_scaler(config)
    return lambda x: {"digits_frechet_distance": monitor(np.clip(np.asarray(inverse_scaler(x), np.float32), 0, 1))}


def snapshot_samples(s: Setup, workdir: pathlib.Path, writer: MetricWriter,
                     monitor: Optional[Callable[[np.ndarray], dict]] = None) -> None:
    """`training.snapshot_num_samples` (default 64) samples by `sampling.method` at a snapshot:
    `samples/snapshot_<step>.{npz,png}`, for images a TensorBoard grid, and the `monitor`'s scores
    of them logged under `samples/`."""
    step = int(s.state.step)
    n = s.config.training.get("snapshot_num_samples", 64)
    x, _ = draw_samples(s, s.config.sampling.method, n, jax.random.fold_in(_key(s.config, "sample"), step))
    _save_samples(s, workdir / "samples" / f"snapshot_{step}", {"samples": x})
    if isinstance(s.data, ImageData):
        writer.image(step, "samples", image_grid(s, x))
    if monitor is not None:
        scores = monitor(x)
        logging.info("step %d samples: %s", step, scores)
        writer.scalars(step, {f"samples/{k}": v for k, v in scores.items()})


def report(s: Setup, workdir: pathlib.Path) -> dict:
    """The quick-start report: `_eval_metrics`, then samples (NFE, wall time) of `REPORT_METHODS`
    (PC, the probability-flow ODE, DPM-Solver++ on `sampling.num_steps` points) saved to
    `samples.npz` and plotted beside the data in `samples.png`."""
    out = _eval_metrics(s)
    if s.config.eval.enable_sampling:
        samples, out["samplers"] = {}, {}
        for i, method in enumerate(REPORT_METHODS):
            rng = jax.random.fold_in(_key(s.config, "sample"), i)
            samples[method], out["samplers"][method] = draw_samples(s, method, s.config.eval.num_samples, rng)
        _save_samples(s, workdir / "samples", samples)
    return out


def evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
             allow_config_change: tuple[str, ...] = ()) -> dict:
    """Held-out loss and bits/dim (the test split for images) of the latest checkpoint (EMA),
    written to `eval_metrics.json` and TensorBoard; for image data with `eval.enable_sampling`, also
    FID/KID/IS against the `--mode=fid_stats` statistics (`eval/fid_<step>.json`)."""
    workdir = pathlib.Path(workdir)
    s = _setup_restored(config, workdir, allow_config_change)
    out = _eval_metrics(s)
    if _is_image_dataset(config) and config.eval.enable_sampling:
        out["sample_quality"] = fid_eval(s, workdir)
    if jax.process_index() == 0:
        _write_json(workdir / "eval_metrics.json", out)
    writer = MetricWriter(workdir)
    writer.scalars(out["step"], {f"eval/{k}": v for k, v in (("heldout_loss", out.get("heldout_loss")),
                   ("bits_per_dim", out.get("heldout", {}).get("bits_per_dim"))) if v is not None})
    writer.close()
    return out


def sample(config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
           allow_config_change: tuple[str, ...] = ()) -> dict:
    """`eval.num_samples` samples of the latest checkpoint (EMA) by `sampling.method`, written to
    `samples/samples_<step>.npz` and `.png` (an image grid for image data)."""
    workdir = pathlib.Path(workdir)
    s = _setup_restored(config, workdir, allow_config_change)
    x, info = draw_samples(s, config.sampling.method, config.eval.num_samples, _key(config, "sample"))
    stem = workdir / "samples" / f"samples_{int(s.state.step)}"
    _save_samples(s, stem, {"samples": x})
    return {"step": int(s.state.step), "path": f"{stem}.npz", **info}


def _setup_restored(config, workdir: pathlib.Path, allow_config_change: tuple[str, ...] = ()) -> Setup:
    s = setup(config, workdir, allow_config_change)
    if s.checkpointer.latest_step() is None and not config.model.get("flax_checkpoint", ""):
        raise FileNotFoundError(f"no checkpoint in {workdir / 'checkpoints'}; run --mode=train first "
                                "(or set model.flax_checkpoint to a score_sde Flax checkpoint)")
    return s


def image_grid(s: Setup, x: np.ndarray) -> np.ndarray:
    """Samples (n, H, W, C) in the model's range -> one uint8 HWC grid of ceil(sqrt(n)) columns."""
    from sdejax.data.datasets import get_data_inverse_scaler

    u = np.clip(np.asarray(get_data_inverse_scaler(s.config)(x)), 0.0, 1.0)
    n, h, w, c = u.shape
    cols = int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    grid = np.zeros((rows * (h + 1) + 1, cols * (w + 1) + 1, c), np.float32)
    for i in range(n):
        r, q = divmod(i, cols)
        grid[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + q * (w + 1):1 + q * (w + 1) + w] = u[i]
    return np.round(grid * 255).astype(np.uint8)


def save_image_grid(path: pathlib.Path, grid: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path)


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
