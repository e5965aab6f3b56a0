"""FID / KID / Inception score of generated samples against saved reference statistics.

The result records what the numbers depend on: sample count, reference file checksum and
metadata, Inception weight checksum, and whatever the caller adds (sampler, NFE, seeds).
Numbers from fewer than ``PROTOCOL_SAMPLES`` samples are flagged as not comparable with the
literature (FID is biased upwards at small N).
"""
from __future__ import annotations

import os
from typing import Any, Iterable, Mapping

import numpy as np

from sdejax.evaluation import inception, metrics
from sdejax.evaluation.stats import accumulate, allgather, as_feature_fn, finalize
from sdejax.evaluation.stats_file import load_stats

PROTOCOL_SAMPLES = 50_000


def sample_statistics(variables: Mapping[str, Any], sample_iterator: Iterable[np.ndarray], *,
                      batch_size: int | None = None, kid_samples: int = 10_000) -> dict[str, Any]:
    """Float64 pool3 {"mu", "sigma", "n"} over every process's NHWC samples in [0, 1], with
    "logits" (all rows) and "features" (up to ``kid_samples`` leading pool3 rows per process),
    both gathered in process order. Inception runs data-parallel with global ``batch_size``."""
    feature_fn, batches = as_feature_fn(variables, sample_iterator, batch_size)
    moments, kept = accumulate(feature_fn, batches, "pool3", {"logits": None, "pool3": kid_samples})
    return {**finalize(allgather(moments)), "logits": kept["logits"], "features": kept["pool3"]}


def load_reference(reference: str | os.PathLike, variables: Mapping[str, Any]) -> dict[str, Any]:
    """The statistics file ``reference`` (``stats_file.load_stats``, plus its "path"); ValueError if
    it was made with Inception weights other than ``variables``."""
    ref = load_stats(reference)
    weights = inception.weights_sha256(variables)
    if ref["metadata"]["inception_weights_sha256"] != weights:
        raise ValueError(f"reference {reference} was computed with Inception weights "
                         f"{ref['metadata']['inception_weights_sha256']}, not the loaded {weights}")
    return {**ref, "path": os.fspath(reference)}


def compare(samples: Mapping[str, Any], ref: Mapping[str, Any], *, metadata: Mapping[str, Any] | None = None,
            splits: int = 10, kid_max_block_size: int = 1024) -> dict[str, Any]:
    """FID of ``samples`` ({"mu", "sigma", "n", "logits", "features"}, from :func:`sample_statistics`)
    against the reference ``ref`` (from :func:`load_reference`), KID of their pool3 rows against its
    stored rows (None when it has none), IS of their logits in ``splits`` parts."""
    is_mean, is_std = metrics.inception_score(samples["logits"], splits)
    result = {
        "fid": metrics.frechet_distance(samples["mu"], samples["sigma"], ref["mu"], ref["sigma"]),
        "inception_score": is_mean,
        "inception_score_std": is_std,
        "kid": None, "kid_std_error": None, "kid_samples": 0,
    }
    if "features" in ref and len(samples["features"]):
        blocks = metrics.kid_blocks(samples["features"], ref["features"], kid_max_block_size)
        result.update(kid=float(blocks.mean()), kid_std_error=metrics.kid_std_error(blocks),
                      kid_samples=len(samples["features"]))
    return {
        **result,
        "n_samples": samples["n"],
        "comparable_to_literature": samples["n"] >= PROTOCOL_SAMPLES and ref["n"] >= PROTOCOL_SAMPLES,
        "reference": {"path": ref["path"], "sha256": ref["sha256"], **ref["metadata"]},
        "inception_weights_sha256": ref["metadata"]["inception_weights_sha256"],
        **dict(metadata or {}),
    }


def evaluate_samples(variables: Mapping[str, Any], sample_iterator: Iterable[np.ndarray],
                     reference: str | os.PathLike, *, metadata: Mapping[str, Any] | None = None,
                     batch_size: int | None = None, splits: int = 10, kid_samples: int = 10_000,
                     kid_max_block_size: int = 1024) -> dict[str, Any]:
    """:func:`compare` of the :func:`sample_statistics` of every process's samples (NHWC, [0, 1])
    with the reference file (checked against ``variables`` before any sample is read)."""
    ref = load_reference(reference, variables)
    samples = sample_statistics(variables, sample_iterator, batch_size=batch_size, kid_samples=kid_samples)
    return compare(samples, ref, metadata=metadata, splits=splits, kid_max_block_size=kid_max_block_size)
