"""Evaluation and sampling behind `sdejax --mode=eval|sample` and the reports of a training run:
the held-out loss, bits/dim, the true entropy, FID/KID/IS, samples by any method, snapshot
samples. What differs between toy and image data is asked of the data source
(`sdejax.training.sources.DataSource`), what differs between kinds of model of its family
(`sdejax.training.families`: sampler, sampled parameters, likelihood).
"""
from __future__ import annotations

import itertools
import json
import pathlib
import time
from typing import Any, Callable, Optional

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sdejax.data import transforms
from sdejax.training import build, families, image_condition, parallel
from sdejax.training import step as step_lib
from sdejax.training.build import Setup, stream_key
from sdejax.training.objective import Context
from sdejax.training.writer import MetricWriter

Array = jax.Array


def to_host(x: Array) -> np.ndarray:
    """A global array gathered to every process as numpy."""
    return np.asarray(multihost_utils.process_allgather(x, tiled=True) if jax.process_count() > 1 else x)


def write_json(path: pathlib.Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _compiled(s: Setup, name: str, fn: Callable, *args, **jit_kwargs) -> tuple[Callable, float]:
    """`fn` compiled ahead of time for `args`' shapes, once per setup and `name` (programs take the
    parameters as an argument, so every checkpoint reuses them); the compile time in seconds (0
    when reused)."""
    if name in s.compiled:
        return s.compiled[name], 0.0
    t0 = time.perf_counter()
    s.compiled[name] = jax.jit(fn, **jit_kwargs).lower(*args).compile()
    return s.compiled[name], time.perf_counter() - t0


def make_eval_loss(s: Setup) -> Callable[[Any, int], float]:
    """(params, step) -> the objective on the held-out batch with a fixed key (eval-mode network;
    context: `step`, and `params` as the EMA parameters, and as the target θ⁻ of an objective that
    keeps one; the setup's teacher parameters), sharded over the mesh."""
    eval_step = step_lib.make_eval_step(s.objective(train=False))
    rng = stream_key(s.config, "eval")
    batch = {k: s.placement.rows_on_mesh(np.asarray(v)) for k, v in s.data.heldout.items()}
    with_target = s.state.target_params is not None

    def loss(params, batch, step, teacher_params):
        context = Context(step=step, ema_params=params, target_params=params if with_target else None,
                          teacher_params=teacher_params)
        return eval_step(params, rng, batch, context)

    fn = s.compiled.setdefault("eval_loss", jax.jit(loss))
    teacher = None if s.teacher_params is None else s.placement.on_mesh(s.teacher_params)
    return lambda params, step: float(to_host(fn(s.placement.on_mesh(params), batch,
                                                  s.placement.on_mesh(np.int32(step)), teacher)))


def _local_copy(x: Any) -> np.ndarray:
    """A host copy of a (replicated) array, read from this process's first shard."""
    return np.asarray(x.addressable_data(0) if isinstance(x, jax.Array) else x)


def make_sampler(s: Setup, method: str, n: int, local: bool = False) -> tuple[Callable[[Array], tuple[Array, Array]], float]:
    """`sampler(rng) -> (x, nfe)`: n samples by the run's family (`sdejax.training.families`): a score
    model by `method` (any name in `sdejax.sampling.methods.METHODS`, with the options config.sampling
    gives it); a consistency model by multistep consistency sampling, a progressively distilled one by
    DDIM with θ⁻ on its step count, a masked-diffusion model by ancestral unmasking, whatever `method`.
    Samples are data: the source decodes them (`DataSource.decode`: a latent model's x = D(z/s)). Compiled
    once; also returns the compile time.

    By default one global program over the mesh (samples sharded over all devices of all processes
    when n divides; every process must pass the same rng); `local=True` runs on this process's
    devices only (each process may call it with its own rng, any number of times)."""
    shape = (n,) + tuple(np.shape(s.data.heldout["x"])[1:])
    fam = families.family(s.config)
    sample, method, classifier = fam.sampler(s, method, n, shape), fam.method_name(s, method), families.classifier_for(s)
    if local:
        mesh = Mesh(np.asarray(jax.local_devices()), (parallel.AXIS,))
        put = lambda tree: jax.device_put(jax.tree_util.tree_map(_local_copy, tree), NamedSharding(mesh, P()))  # noqa: E731
    else:
        mesh, put = s.placement.mesh, s.placement.on_mesh
    params = put(s.network_params(fam.sampled_params(s.state)))
    classifier_params = None if classifier is None else put(classifier[1])
    out_sharding = NamedSharding(mesh, P(parallel.AXIS) if n % mesh.size == 0 else P())
    compiled, compile_s = _compiled(s, f"sample/{method}/{n}/{local}", sample, params, classifier_params,
                                    jax.random.PRNGKey(0), out_shardings=(out_sharding, NamedSharding(mesh, P())))

    def sampler(rng):
        x, nfe = compiled(params, classifier_params, rng)
        return s.data.decode(x), nfe

    return sampler, compile_s


def draw_samples(s: Setup, method: str, n: int, rng: Array) -> tuple[np.ndarray, dict]:
    """n samples by `method` (see `make_sampler`) gathered to host, and {"nfe", "compile_s", "wall_s"}, and for
    samples conditioned on held-out images (`image_condition`) their "condition_rms"."""
    sampler, compile_s = make_sampler(s, method, n)
    start = time.perf_counter()
    x, nfe = jax.block_until_ready(sampler(rng))
    x, info = to_host(x), {"nfe": int(to_host(nfe)), "compile_s": compile_s, "wall_s": time.perf_counter() - start}
    if image_condition.on_heldout(s.config):
        info.update(image_condition.agreement(s.config, x, s.data.heldout["x"], transforms.get_data_inverse_scaler(s.config)))
    return x, info


def sample_quality(s: Setup, workdir: pathlib.Path) -> dict:
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
    """Bits/dim of the EMA model on the held-out data by its family's likelihood (`families`): the
    PF-ODE likelihood of a score model, the NELBO bound of masked diffusion; mean and standard
    error, NFE and wall time; batches sharded over the mesh. Quantised data count the discrete NLL
    over the source's levels (L = 17 for the digits, so their bits/dim are not comparable with 8-bit
    images'). As the source reports them (`DataSource.describe_bits`): a latent model's are
    `latent_bits_per_dim` of its latents, not of pixels."""
    e, nll_bits = s.config.eval, families.family(s.config).nll_bits(s)
    batch_size = min(e.batch_size, np.shape(s.data.heldout["x"])[0] * jax.process_count())
    params = s.placement.on_mesh(s.network_params(s.state.ema_params))
    compile_s, start, bits, nfes = 0.0, time.perf_counter(), [], []
    limit = e.get("num_bpd_batches", 0) or None
    for i, local in enumerate(itertools.islice(s.data.eval_batches(batch_size), limit)):
        xb, key = s.placement.rows_on_mesh(local["x"]), jax.random.fold_in(stream_key(s.config, "eval"), i)
        yb = s.placement.rows_on_mesh(local["y"]) if s.config.model.get("num_classes", 0) else None
        if i == 0:
            compiled, compile_s = _compiled(s, "bits_per_dim", nll_bits, params, key, xb, yb)
            start = time.perf_counter()
        b, nfe = jax.block_until_ready(compiled(params, key, xb, yb))
        bits.append(to_host(b))
        nfes.append(int(to_host(nfe)))
    if not bits:
        raise ValueError("no held-out batch: set data.num_heldout (toy) or eval.batch_size (images) so that "
                         "at least one full eval batch exists")
    bits = np.concatenate(bits)
    out = {"bits_per_dim": float(bits.mean()), "bits_per_dim_se": float(bits.std() / np.sqrt(bits.size)),
           "num_points": int(bits.size), "nfe_per_batch": float(np.mean(nfes)), "compile_s": compile_s,
           "wall_s": time.perf_counter() - start}
    return s.data.describe_bits(out)


def eval_metrics(s: Setup) -> dict:
    """Held-out loss and bits/dim (EMA params) and the true entropy where the source knows it, as
    `config.eval` enables."""
    e = s.config.eval
    out: dict[str, Any] = {"step": int(s.state.step)}
    if e.enable_loss:
        out["heldout_loss"] = make_eval_loss(s)(s.state.ema_params, out["step"])
    if e.enable_bpd:
        out["heldout"] = heldout_bits_per_dim(s)
        if (true := s.data.true_entropy_bits_per_dim(stream_key(s.config, "entropy"), 200_000)) is not None:
            out["true_entropy"] = true
    return out


def save_samples(s: Setup, stem: pathlib.Path, samples: dict[str, np.ndarray]) -> None:
    """`<stem>.npz` and the source's pictures of them (`DataSource.save`); process 0 only."""
    if jax.process_index() > 0:
        return
    stem.parent.mkdir(parents=True, exist_ok=True)
    np.savez(f"{stem}.npz", **samples)
    s.data.save(stem, samples)


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

    monitor = digits_monitor.make_digits_monitor(digits_monitor.train_digits_classifier(stream_key(config, "monitor")))
    inverse_scaler = datasets.get_data_inverse_scaler(config)
    return lambda x: {"digits_frechet_distance": monitor(np.clip(np.asarray(inverse_scaler(x), np.float32), 0, 1))}


def snapshot_samples(s: Setup, workdir: pathlib.Path, writer: MetricWriter,
                     monitor: Optional[Callable[[np.ndarray], dict]] = None) -> None:
    """`training.snapshot_num_samples` (default 64) samples by `sampling.method` at a snapshot:
    `samples/snapshot_<step>.{npz,png}`, the source's TensorBoard picture of them, and the
    `monitor`'s scores of them logged under `samples/`."""
    step = int(s.state.step)
    n = s.config.training.get("snapshot_num_samples", 64)
    x, _ = draw_samples(s, s.config.sampling.method, n, jax.random.fold_in(stream_key(s.config, "sample"), step))
    save_samples(s, workdir / "samples" / f"snapshot_{step}", {"samples": x})
    if (picture := s.data.tensorboard_image(x)) is not None:
        writer.image(step, "samples", picture)
    if monitor is not None:
        scores = monitor(x)
        logging.info("step %d samples: %s", step, scores)
        writer.scalars(step, {f"samples/{k}": v for k, v in scores.items()})


def report(s: Setup, workdir: pathlib.Path) -> dict:
    """The quick-start report: `eval_metrics`, then samples (NFE, wall time) of the family's report
    samplers (`families.Family.report_methods`: PC, the probability-flow ODE, DPM-Solver++ on
    `sampling.num_steps` points for a score model; consistency sampling, DDIM or ancestral unmasking
    for the others) saved to `samples.npz` and pictured beside the data in `samples.png`."""
    out = eval_metrics(s)
    if s.config.eval.enable_sampling:
        samples, out["samplers"] = {}, {}
        for i, method in enumerate(families.family(s.config).report_methods(s.config)):
            rng = jax.random.fold_in(stream_key(s.config, "sample"), i)
            samples[method], out["samplers"][method] = draw_samples(s, method, s.config.eval.num_samples, rng)
        save_samples(s, workdir / "samples", samples)
    return out


def restored_setup(config, workdir: pathlib.Path, allow_config_change: tuple[str, ...] = ()) -> Setup:
    """`build.setup` that insists on trained parameters (a checkpoint or `model.flax_checkpoint`)."""
    s = build.setup(config, workdir, allow_config_change)
    if s.checkpointer.latest_step() is None and not config.model.get("flax_checkpoint", ""):
        raise FileNotFoundError(f"no checkpoint in {workdir / 'checkpoints'}; run --mode=train first "
                                "(or set model.flax_checkpoint to a score_sde Flax checkpoint)")
    return s


def steps_to_evaluate(s: Setup) -> list[int]:
    """The checkpoint steps of `--mode=eval`: with `eval.begin_ckpt = eval.end_ckpt = 0` (the
    default) the restored state's (the newest intact checkpoint); otherwise every retained
    checkpoint with begin_ckpt <= step <= end_ckpt (`end_ckpt = -1`: no upper bound), oldest first."""
    e = s.config.eval
    begin, end = e.get("begin_ckpt", 0), e.get("end_ckpt", 0)
    if begin == 0 and end == 0:
        return [int(s.state.step)]
    steps = s.checkpointer.all_steps()
    chosen = [k for k in steps if k >= begin and (end < 0 or k <= end)]
    if not chosen:
        raise FileNotFoundError(f"no checkpoint with step in [eval.begin_ckpt, eval.end_ckpt] = [{begin}, "
                                f"{'∞' if end < 0 else end}] in {s.checkpointer.directory}; retained steps: {steps}")
    return chosen


def _evaluate_restored(s: Setup, workdir: pathlib.Path, writer: MetricWriter) -> dict:
    out = eval_metrics(s)
    if s.data.supports_fid and s.config.eval.enable_sampling:
        out["sample_quality"] = sample_quality(s, workdir)
    bits = {k: v for k, v in out.get("heldout", {}).items() if k.endswith("bits_per_dim")}
    writer.scalars(out["step"], {f"eval/{k}": v for k, v in (("heldout_loss", out.get("heldout_loss")), *bits.items())
                                 if v is not None})
    return out


def run_eval(config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
             allow_config_change: tuple[str, ...] = ()) -> dict:
    """`--mode=eval`: held-out loss and bits/dim (the test split for images) of the checkpoints of
    `steps_to_evaluate` (EMA), written to TensorBoard and `eval_metrics.json`; for data with
    FID (`DataSource.supports_fid`) and `eval.enable_sampling`, also FID/KID/IS against the
    `--mode=fid_stats` statistics (`eval/fid_<step>.json`).

    `eval_metrics.json` (and the result) holds the newest evaluated step's metrics; when a range
    of checkpoints was asked for, also "checkpoints": every evaluated step's, oldest first."""
    workdir = pathlib.Path(workdir)
    s = restored_setup(config, workdir, allow_config_change)
    steps = steps_to_evaluate(s)
    results, writer = [], MetricWriter(workdir)
    try:
        for step in steps:
            if step != int(s.state.step):
                s.state, _ = s.checkpointer.restore(s.state, step=step, sharding=s.placement.state_sharding())
            results.append(_evaluate_restored(s, workdir, writer))
    finally:
        writer.close()
    out = dict(results[-1])
    if (config.eval.get("begin_ckpt", 0), config.eval.get("end_ckpt", 0)) != (0, 0):
        out["checkpoints"] = results
    if jax.process_index() == 0:
        write_json(workdir / "eval_metrics.json", out)
    return out


def run_sample(config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
               allow_config_change: tuple[str, ...] = ()) -> dict:
    """`--mode=sample`: `eval.num_samples` samples of the latest checkpoint (EMA) by `sampling.method`,
    written to `samples/samples_<step>.npz` and the source's pictures (`.png`)."""
    workdir = pathlib.Path(workdir)
    s = restored_setup(config, workdir, allow_config_change)
    x, info = draw_samples(s, config.sampling.method, config.eval.num_samples, stream_key(config, "sample"))
    stem = workdir / "samples" / f"samples_{int(s.state.step)}"
    save_samples(s, stem, {"samples": x})
    return {"step": int(s.state.step), "path": f"{stem}.npz", **info}
