"""Streaming feature statistics (mean, covariance) in float64, mergeable across batches and hosts.

State: count n, mean mu and scatter M2 = sum_i (x_i - mu)(x_i - mu)^T. Two states merge exactly
(Chan, Golub & LeVeque):  n = na + nb,  d = mu_b - mu_a,  mu = mu_a + d nb / n,
M2 = M2a + M2b + d d^T na nb / n;  finally sigma = M2 / (n - 1), as numpy.cov / pytorch-fid.
Each batch is centred on its own mean before its scatter is formed, so no large raw sums cancel.
"""
from __future__ import annotations

import itertools
from typing import Any, Iterable, Mapping, NamedTuple

import jax
import numpy as np
from numpy.typing import ArrayLike

from sdejax.evaluation.features import FeatureFn, allgather_rows, inception_feature_fn


class Moments(NamedTuple):
    """Sample count, mean (D,) and centred scatter matrix (D, D), all float64."""

    n: int
    mean: np.ndarray
    m2: np.ndarray


def moments_of(features: ArrayLike) -> Moments:
    """Moments of one batch of feature rows (N, D)."""
    x = np.asarray(features)
    if x.ndim != 2 or not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"features must be a float array (N, D); got shape {x.shape}, dtype {x.dtype}")
    x = x.astype(np.float64)
    mean = x.mean(axis=0) if len(x) else np.zeros(x.shape[1])
    centred = x - mean
    return Moments(len(x), mean, centred.T @ centred)


def merge(a: Moments, b: Moments) -> Moments:
    """Moments of the union of two disjoint sets of rows."""
    if a.mean.shape != b.mean.shape:
        raise ValueError(f"cannot merge moments of {a.mean.shape[0]} and {b.mean.shape[0]} features")
    if a.n == 0 or b.n == 0:
        return b if a.n == 0 else a
    n = a.n + b.n
    delta = b.mean - a.mean
    return Moments(n, a.mean + delta * (b.n / n), a.m2 + b.m2 + np.outer(delta, delta) * (a.n * b.n / n))


def allgather(moments: Moments) -> Moments:
    """Merge every process's moments (exact: the float64 arrays travel as raw bytes)."""
    counts = allgather_rows(np.array([moments.n], np.int64))
    means, m2s = allgather_rows(moments.mean[None]), allgather_rows(moments.m2[None])
    total = Moments(int(counts[0]), means[0], m2s[0])
    for count, mean, m2 in zip(counts[1:], means[1:], m2s[1:]):
        total = merge(total, Moments(int(count), mean, m2))
    return total


def finalize(moments: Moments) -> dict[str, Any]:
    """{"mu": (D,), "sigma": (D, D) with divisor n - 1, "n": n}."""
    if moments.n < 2:
        raise ValueError(f"statistics need at least 2 samples; got {moments.n}")
    return {"mu": moments.mean, "sigma": moments.m2 / (moments.n - 1), "n": moments.n}


def accumulate(feature_fn: FeatureFn, batches: Iterable[np.ndarray], key: str = "pool3",
               keep: Mapping[str, int | None] | None = None) -> tuple[Moments, dict[str, np.ndarray]]:
    """This process's moments of ``feature_fn(batch)`` (or its ``[key]`` entry) over all batches.

    ``keep`` maps output names to how many leading rows to keep (None: all); the kept rows of
    every process are gathered and returned as the second result.
    """
    keep = dict(keep or {})
    total: Moments | None = None
    kept: dict[str, list[np.ndarray]] = {name: [] for name in keep}
    for batch in batches:
        out = feature_fn(batch)
        outputs = out if isinstance(out, Mapping) else {key: out}
        part = moments_of(outputs[key])
        total = part if total is None else merge(total, part)
        for name, rows in kept.items():
            room = None if keep[name] is None else keep[name] - sum(map(len, rows))
            rows.append(np.asarray(outputs[name])[:room])
    if total is None:
        raise ValueError("the image iterator yielded no batches")
    return total, {name: allgather_rows(np.concatenate(rows)) for name, rows in kept.items()}


def compute_statistics(feature_fn_or_variables: FeatureFn | Mapping[str, Any],
                       image_iterator: Iterable[np.ndarray], *, batch_size: int | None = None,
                       key: str = "pool3", keep_features: int = 0) -> dict[str, Any]:
    """Global {"mu", "sigma", "n"} of features over every process's ``image_iterator``.

    ``feature_fn_or_variables`` is a function ``images -> features`` (or a mapping holding
    ``key``), or FID Inception variables, which run data-parallel over all devices with
    global ``batch_size`` (default: the first local batch's size times the process count,
    rounded up to a multiple of the device count). With ``keep_features > 0`` the result also
    holds ``"features"``: up to that many leading rows per process (for KID).
    """
    feature_fn, batches = as_feature_fn(feature_fn_or_variables, image_iterator, batch_size)
    moments, kept = accumulate(feature_fn, batches, key, {key: keep_features} if keep_features else None)
    stats = finalize(allgather(moments))
    if keep_features:
        stats["features"] = kept[key]
    return stats


def as_feature_fn(feature_fn_or_variables: FeatureFn | Mapping[str, Any], image_iterator: Iterable[np.ndarray],
                  batch_size: int | None) -> tuple[FeatureFn, Iterable[np.ndarray]]:
    """A feature function (Inception variables become a sharded Inception) and the batches to feed it."""
    if not isinstance(feature_fn_or_variables, Mapping):
        return feature_fn_or_variables, image_iterator
    batches = iter(image_iterator)
    first = next(batches, None)
    if first is None:
        raise ValueError("the image iterator yielded no batches")
    feature_fn = inception_feature_fn(feature_fn_or_variables, batch_size or _default_batch(len(first)))
    return feature_fn, itertools.chain([first], batches)


def _default_batch(local_rows: int) -> int:
    devices = jax.device_count()
    global_rows = local_rows * jax.process_count()
    return -(-global_rows // devices) * devices
