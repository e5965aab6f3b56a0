"""Reference-statistics files: ``.npz`` with mu, sigma, n, optional features and JSON metadata.

The metadata says what the numbers depend on: dataset name, version and split, the
preprocessing, and the checksum of the Inception weights (``inception.weights_sha256``).
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

import numpy as np

from sdejax.evaluation.inception import PREPROCESSING
from sdejax.evaluation.inception_weights import file_sha256  # noqa: F401 (re-exported)

REQUIRED_METADATA = ("dataset", "dataset_version", "split", "inception_weights_sha256")


def save_stats(path: str | os.PathLike, stats: Mapping[str, Any], metadata: Mapping[str, Any]) -> None:
    """Write ``stats`` ({"mu", "sigma", "n"} and optionally pool3 "features" and "logits") with ``metadata``.

    ``metadata`` must hold dataset, dataset_version, split and inception_weights_sha256;
    ``preprocessing`` defaults to pytorch-fid's pipeline. Any other JSON-able keys are kept.
    """
    missing = [key for key in REQUIRED_METADATA if key not in metadata]
    if missing:
        raise ValueError(f"metadata lacks {missing}; required keys are {list(REQUIRED_METADATA)}")
    mu, sigma = np.asarray(stats["mu"], np.float64), np.asarray(stats["sigma"], np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
        raise ValueError(f"stats must hold mu (D,) and sigma (D, D); got {mu.shape} and {sigma.shape}")
    meta = {"preprocessing": PREPROCESSING, **metadata, "n": int(stats["n"])}
    arrays = {"mu": mu, "sigma": sigma, "n": np.int64(stats["n"]), "metadata": np.array(json.dumps(meta))}
    for key in ("features", "logits"):
        if key in stats:
            arrays[key] = np.asarray(stats[key], np.float32)
    with open(path, "wb") as file:
        np.savez(file, **arrays)


def load_stats(path: str | os.PathLike) -> dict[str, Any]:
    """{"mu", "sigma", "n", "metadata", "sha256"} (+ "features", "logits" when saved) of a stats file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"reference statistics {path} do not exist; compute them with "
                                "--mode=fid_stats (sdejax.evaluation.stats.compute_statistics + save_stats)")
    with np.load(path, allow_pickle=False) as data:
        stats = {key: data[key] for key in data.files}
    stats["n"] = int(stats["n"])
    stats["metadata"] = json.loads(str(stats["metadata"]))
    stats["sha256"] = file_sha256(path)
    return stats
