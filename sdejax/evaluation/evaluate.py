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


def evaluate_samples(variables: Mapping[str, Any], sample_iterator: Iterable[np.ndarray],
                     reference: str | os.PathLike, *, metadata: Mapping[str, Any] | None = None,
                     batch_size: int | None = None, splits: int = 10, kid_samples: int = 10_000,
                     kid_max_block_size: int = 1024) -> dict[str, Any]:
    """Evaluate NHWC float samples in [0, 1] from every process's ``sample_iterator``.

    FID uses all samples; IS uses all logits in ``splits`` parts; KID compares up to
    ``kid_samples`` leading sample features per process with the reference file's stored
    features (``None`` when the file has none). Raises if the reference statistics were made
    with other Inception weights.
    """
    ref = load_stats(reference)
    weights = inception.weights_sha256(variables)
    if ref["metadata"]["inception_weights_sha256"] != weights:
        raise ValueError(f"reference {reference} was computed with Inception weights "
                         f"{ref['metadata']['inception_weights_sha256']}, not the loaded {weights}")
    feature_fn, batches = as_feature_fn(variables, sample_iterator, batch_size)
    moments, kept = accumulate(feature_fn, batches, "pool3", {"logits": None, "pool3": kid_samples})
    gen = finalize(allgather(moments))
    is_mean, is_std = metrics.inception_score(kept["logits"], splits)
    result = {
        "fid": metrics.frechet_distance(gen["mu"], gen["sigma"], ref["mu"], ref["sigma"]),
        "inception_score": is_mean,
        "inception_score_std": is_std,
        "kid": None, "kid_std_error": None, "kid_samples": 0,
    }
    if "features" in ref:
        blocks = metrics.kid_blocks(kept["pool3"], ref["features"], kid_max_block_size)
        result.update(kid=float(blocks.mean()), kid_std_error=metrics.kid_std_error(blocks),
                      kid_samples=len(kept["pool3"]))
    return {
        **result,
        "n_samples": gen["n"],
        "comparable_to_literature": gen["n"] >= PROTOCOL_SAMPLES and ref["n"] >= PROTOCOL_SAMPLES,
        "reference": {"path": os.fspath(reference), "sha256": ref["sha256"], **ref["metadata"]},
        "inception_weights_sha256": weights,
        **dict(metadata or {}),
    }
