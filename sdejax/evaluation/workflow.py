"""The FID workflow behind ``--mode=fid_stats`` (reference statistics of a dataset split) and
``--mode=eval`` (FID / KID / Inception score of a model's samples against them).

Config keys read (all optional, ``config.eval.get(key, default)``):

* ``eval.fid_split``: "train" (default) or "eval" (the dataset's test/validation split).
* ``eval.fid_num_samples``: use only the first that many images of the split (None: all of it).
* ``eval.kid_features``: pool3 rows kept in the statistics file (and of the samples) for KID
  (default 10,000; 0 keeps none and KID is not computed).
* ``eval.fid_stats_path``: the statistics file (default ``workdir/fid_stats/<dataset>_<split>.npz``).
* ``eval.inception_weights``: the Inception weight file (default ``$SDEJAX_INCEPTION_WEIGHTS``).

and the existing ``eval.batch_size`` (the global batch of data images for ``fid_stats``; the rows of
one sampling batch, made on one host, for ``fid_eval``) and the
``data.*`` keys of :mod:`sdejax.data.datasets`. Data images are read in file order with no flip and
no dequantisation (x = k / (L - 1) on the data's own grid), grayscale tiled to RGB. Every process
reads its own rows and the float64 moments are merged exactly (:mod:`sdejax.evaluation.stats`).
"""
from __future__ import annotations

import json
import math
import os
import pathlib
import time
from typing import Any, Callable, Iterator, Mapping

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from sdejax.data import datasets, registry
from sdejax.data.pipeline import Pipeline
from sdejax.evaluation import evaluate, inception, inception_weights, stats, stats_file
from sdejax.evaluation.features import allgather_rows, inception_feature_fn

SPLITS = ("train", "eval")
DEFAULT_KID_FEATURES = 10_000
IS_SPLITS = 10
DATA_PREPROCESSING = ("data: file order, no flip, no dequantisation, x = k / (L - 1) at "
                      "config.data.image_size, grayscale tiled to RGB")
SEED_DERIVATION = ("batch g holds rows [g B, (g + 1) B) (B = eval.batch_size) and has key fold_in(PRNGKey(seed), g); "
                   "process p of P makes batches [floor(p G / P), floor((p + 1) G / P)) of the G")

SampleFn = Callable[[jax.Array, int], Any]


def load_inception(config: ml_collections.ConfigDict,
                   weights_path: str | os.PathLike | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Inception variables from ``weights_path``, ``config.eval.inception_weights`` or
    ``$SDEJAX_INCEPTION_WEIGHTS`` (FileNotFoundError saying how to obtain them), and the file's
    provenance as recorded in statistics and results: {"inception_weights_file",
    "inception_weights_source_sha256", "inception_weights_standard"} (``inception_weights.provenance``)."""
    path = inception_weights.resolve_path(
        weights_path if weights_path is not None else config.eval.get("inception_weights", None))
    origin = inception_weights.provenance(path)
    return inception.load_weights(path), {"inception_weights_file": origin["file"],
                                          "inception_weights_source_sha256": origin["source_sha256"],
                                          "inception_weights_standard": origin["standard"]}


def default_stats_path(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> pathlib.Path:
    """``config.eval.fid_stats_path``, else ``workdir/fid_stats/<dataset>_<split>.npz``."""
    path = config.eval.get("fid_stats_path", None)
    if path is not None:
        return pathlib.Path(path)
    return pathlib.Path(workdir) / "fid_stats" / f"{config.data.dataset.lower()}_{_fid_split(config)}.npz"


def fid_stats(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
              data_dir: str | None = None, weights_path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Reference pool3 statistics (mu, sigma, n, KID features) of ``config.eval.fid_split``,
    saved to :func:`default_stats_path` by process 0; returns the file's metadata with n, path and
    sha256 (None on other processes). ``data_dir`` overrides ``config.data.data_dir``."""
    split = _fid_split(config)
    variables, weights_origin = load_inception(config, weights_path)
    limit = config.eval.get("fid_num_samples", None)
    kid_features = int(config.eval.get("kid_features", DEFAULT_KID_FEATURES))
    batch_size = config.eval.batch_size
    p_index, p_count = jax.process_index(), jax.process_count()
    opts = Pipeline(batch_size=batch_size, image_size=config.data.image_size, shuffle=False, num_epochs=1,
                    drop_remainder=False, process_index=p_index, process_count=p_count,
                    num_threads=config.data.get("num_threads", 8), prefetch=config.data.get("prefetch", 16),
                    num_workers=config.data.get("num_workers", 0))
    iterator = datasets.get_iterator(config, split, opts, data_dir=data_dir)
    local = _local_batches(iterator, opts, limit)
    feature_fn = inception_feature_fn(variables, _device_multiple(batch_size))
    shape = (0, config.data.image_size, config.data.image_size, 3)
    keep = -(-kid_features // p_count)
    moments, kept = stats.accumulate(feature_fn, _in_lockstep(local, shape), "pool3",
                                     {"pool3": keep} if keep else None)
    result = stats.finalize(stats.allgather(moments))
    if keep:
        result["features"] = kept["pool3"][:kid_features]
    metadata = {
        **_dataset_identity(config, split, data_dir),
        "image_size": config.data.image_size,
        "num_channels": config.data.num_channels,
        "preprocessing": f"{DATA_PREPROCESSING}; {inception.PREPROCESSING}",
        "fid_num_samples": limit,
        "complete_split": limit is None or result["n"] < limit,
        "kid_features": len(result.get("features", ())),
        "inception_weights_sha256": inception.weights_sha256(variables),
        **weights_origin,
        "process_count": p_count,
    }
    path = default_stats_path(config, workdir)
    checksum = None
    if p_index == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        stats_file.save_stats(path, result, metadata)
        checksum = stats_file.file_sha256(path)
    return {**metadata, "n": result["n"], "path": os.fspath(path), "sha256": checksum}


def fid_eval(config: ml_collections.ConfigDict, workdir: str | os.PathLike, sample_fn: SampleFn, *,
             num_samples: int, seed: int, sampler_metadata: Mapping[str, Any],
             weights_path: str | os.PathLike | None = None, stats_path: str | os.PathLike | None = None,
             tag: int | str = "latest") -> dict[str, Any]:
    """FID / KID / IS of ``num_samples`` model samples against saved statistics, written by process
    0 to ``workdir/eval/fid_<tag>.json``, with the samples' own statistics (mu, sigma, n and the
    pool3 rows used for KID: a statistics file usable as a reference) in ``fid_<tag>_stats.npz``.
    The CLI passes the checkpoint step as ``tag``.

    Per-host seeds: the N samples are G = ceil(N / B) batches of B = ``eval.batch_size`` rows (the
    last one trimmed); batch g has key ``fold_in(PRNGKey(seed), g)`` and process p of P makes
    batches [floor(p G / P), floor((p + 1) G / P)) with ``sample_fn(key, B)``. So every host draws
    other samples, and the set of samples (hence FID/KID/IS, up to float rounding) is the same for
    any number of hosts. ``sample_fn`` returns float NHWC samples in the data range
    (``config.data.centered``: [-1, 1]), or ``(samples, nfe)``; it must run on this process's own
    devices only (processes call it different numbers of times). Samples are mapped back with the
    inverse data scaler, clipped to [0, 1] and tiled to RGB, and go through Inception B rows per
    process at a time. ``sampler_metadata`` (sampler name and settings, and ``nfe`` unless
    ``sample_fn`` reports it) is recorded as ``"sampler"``. The statistics file (``stats_path``,
    else :func:`default_stats_path`) must be readable by every process.
    """
    p_index, p_count = jax.process_index(), jax.process_count()
    if num_samples < IS_SPLITS:
        raise ValueError(f"num_samples must be >= {IS_SPLITS} (the Inception score's splits); got {num_samples}")
    batch_size = config.eval.batch_size
    variables, weights_origin = load_inception(config, weights_path)
    num_batches = -(-num_samples // batch_size)
    mine = range(num_batches * p_index // p_count, num_batches * (p_index + 1) // p_count)
    rows = lambda g: min(batch_size, num_samples - g * batch_size)  # noqa: E731
    kid_features = int(config.eval.get("kid_features", DEFAULT_KID_FEATURES))
    # KID uses the first `kid_features` global rows; processes hold consecutive batches, so their
    # leading rows, gathered in process order, are exactly those.
    kid_local = sum(max(0, min(rows(g), kid_features - g * batch_size)) for g in mine)
    inverse_scaler = datasets.get_data_inverse_scaler(config)
    seed_key = jax.random.PRNGKey(seed)
    nfes: list[float] = []
    sampling_s = 0.0

    def samples() -> Iterator[np.ndarray]:
        nonlocal sampling_s
        for g in mine:
            start = time.perf_counter()
            out = sample_fn(jax.random.fold_in(seed_key, g), batch_size)
            images, nfe = out if isinstance(out, tuple) else (out, None)
            images = np.asarray(images)
            if len(images) != batch_size:
                raise ValueError(f"sample_fn(rng, {batch_size}) returned shape {images.shape}")
            sampling_s += time.perf_counter() - start
            if nfe is not None:
                nfes.append(float(np.asarray(nfe)))
            elif "nfe" not in sampler_metadata:
                raise ValueError("the NFE is unknown: sample_fn must return (samples, nfe) or "
                                 "sampler_metadata must hold 'nfe'")
            images = np.clip(np.asarray(inverse_scaler(images), np.float32), 0.0, 1.0)
            yield _to_rgb(images, "sample_fn output", batch_size)[:rows(g)]

    path = pathlib.Path(stats_path) if stats_path is not None else default_stats_path(config, workdir)
    reference = evaluate.load_reference(path, variables)  # fail before sampling, not after
    out_dir = pathlib.Path(workdir) / "eval"
    start = time.perf_counter()
    empty = (0, config.data.image_size, config.data.image_size, 3)
    gen = evaluate.sample_statistics(variables, _in_lockstep(samples(), empty),
                                     batch_size=_device_multiple(batch_size * p_count), kid_samples=kid_local)
    result = {**evaluate.compare(gen, reference, splits=IS_SPLITS), **weights_origin}
    nfe = _nfe_record(allgather_rows(np.asarray(nfes, np.float64)), sampler_metadata)
    reasons = _not_comparable(config, result)
    seeds = {"seed": seed, "derivation": SEED_DERIVATION, "process_count": p_count, "num_batches": num_batches,
             "batch_size": batch_size}
    result.update(
        comparable_to_literature=not reasons,
        not_comparable_because=reasons,
        sampler=dict(sampler_metadata),
        nfe=nfe,
        seeds=seeds,
        dataset=config.data.dataset,
        image_size=config.data.image_size,
        tag=tag,
        sampling_s=sampling_s,
        total_s=time.perf_counter() - start,
    )
    if p_index == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        samples_path = out_dir / f"fid_{tag}_stats.npz"
        stats_file.save_stats(samples_path, gen, {
            "dataset": f"samples of {config.data.dataset}", "dataset_version": None, "split": f"samples_{tag}",
            "image_size": config.data.image_size, "kid_features": len(gen.get("features", ())),
            "inception_weights_sha256": result["inception_weights_sha256"], **weights_origin,
            "preprocessing": f"samples: inverse data scaler, clip to [0, 1], grayscale tiled to RGB; "
                             f"{inception.PREPROCESSING}",
            "sampler": _finite_or_none(dict(sampler_metadata)), "seeds": seeds, "tag": tag})
        result["samples_statistics"] = {"path": os.fspath(samples_path), "sha256": stats_file.file_sha256(samples_path)}
        out = out_dir / f"fid_{tag}.json"
        out.write_text(json.dumps(_finite_or_none(result), indent=2, sort_keys=True, allow_nan=False))
        result["path"] = os.fspath(out)
    return result


def _finite_or_none(value: Any) -> Any:
    """``value`` with NaN / inf floats (e.g. KID's standard error from one block) replaced by None."""
    if isinstance(value, Mapping):
        return {key: _finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(item) for item in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _fid_split(config: ml_collections.ConfigDict) -> str:
    split = config.eval.get("fid_split", "train")
    if split not in SPLITS:
        raise ValueError(f"config.eval.fid_split must be one of {list(SPLITS)} (the dataset's train or "
                         f"test/validation split); got {split!r}")
    return split


def _dataset_identity(config: ml_collections.ConfigDict, split: str, data_dir: str | None) -> dict[str, Any]:
    """dataset, its TFDS name and version (or TFRecord path), and the split's own name."""
    spec = registry.get_spec(config)
    split_name = spec.train_split if split == "train" else spec.eval_split
    if spec.tfds_name is None:
        return {"dataset": config.data.dataset, "source": f"tfrecords:{config.data.tfrecords_path}",
                "dataset_version": None, "split": split_name}
    name = registry.tfds_name(spec, config)
    builder = registry.get_builder(name, data_dir or config.data.get("data_dir", None),
                                   config.data.get("stack", "grain"), config.data.get("download", True))
    return {"dataset": config.data.dataset, "source": f"tfds:{name}",
            "dataset_version": str(builder.info.version), "split": split_name}


def _local_batches(iterator, opts: Pipeline, limit: int | None) -> Iterator[np.ndarray]:
    """This process's RGB image batches, cut so that only global rows < ``limit`` are used.

    The pipeline's local batch j = k P + p (process p's k-th) holds global rows [j L, j L + len).
    """
    local = opts.local_batch_size
    for k, batch in enumerate(iterator):
        first = (k * opts.process_count + opts.process_index) * local
        if limit is not None and first >= limit:
            return
        rows = len(batch["image"]) if limit is None else min(len(batch["image"]), limit - first)
        yield _to_rgb(batch["image"][:rows], "dataset image", local)


def _in_lockstep(batches: Iterator[np.ndarray], empty_shape: tuple[int, ...]) -> Iterator[np.ndarray]:
    """Yield until every process is exhausted (a collective per batch); exhausted ones yield empty batches."""
    for batch in batches:
        if not _any_process(True):
            return
        yield batch
    while _any_process(False):
        yield np.zeros(empty_shape, np.float32)


def _any_process(has_batch: bool) -> bool:
    return bool(np.asarray(multihost_utils.process_allgather(np.int32(has_batch))).any())


def _to_rgb(images: np.ndarray, what: str, max_rows: int) -> np.ndarray:
    """(n <= max_rows, H, W, 1 or 3) float images -> (n, H, W, 3) float32 (grayscale tiled)."""
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or len(images) > max_rows:
        raise ValueError(f"{what} must be NHWC with 1 or 3 channels and at most {max_rows} rows; "
                         f"got shape {images.shape}")
    return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


def _device_multiple(batch_size: int) -> int:
    """The Inception global batch: ``batch_size`` rounded up to a multiple of the device count."""
    devices = jax.device_count()
    return -(-batch_size // devices) * devices


def _nfe_record(nfes: np.ndarray, sampler_metadata: Mapping[str, Any]) -> dict[str, Any]:
    """NFE per batch (mean, min, max over every process's batches) as reported by sample_fn, else
    ``sampler_metadata["nfe"]``."""
    if len(nfes):
        return {"mean": float(np.mean(nfes)), "min": float(nfes.min()), "max": float(nfes.max()),
                "source": "sample_fn"}
    nfe = float(sampler_metadata["nfe"])
    return {"mean": nfe, "min": nfe, "max": nfe, "source": "sampler_metadata"}


def _not_comparable(config: ml_collections.ConfigDict, result: Mapping[str, Any]) -> list[str]:
    """Why the FID is not comparable with published numbers (empty: it is): the protocol is the
    standard Inception weights and >= 50,000 samples against the complete training split of the same
    dataset at the same size."""
    ref = result["reference"]
    spec = registry.get_spec(config)
    checks = {
        f"Inception weights are not the standard {inception_weights.WEIGHTS_FILE}":
            not result.get("inception_weights_standard", False),
        f"fewer than {evaluate.PROTOCOL_SAMPLES} samples": result["n_samples"] < evaluate.PROTOCOL_SAMPLES,
        f"reference has fewer than {evaluate.PROTOCOL_SAMPLES} images": ref["n"] < evaluate.PROTOCOL_SAMPLES,
        "reference is not the training split": ref.get("split") != spec.train_split,
        "reference is not the complete split": not ref.get("complete_split", False),
        "reference is another dataset": ref.get("dataset") != config.data.dataset,
        "reference has another image size": ref.get("image_size") != config.data.image_size,
    }
    return [reason for reason, failed in checks.items() if failed]
