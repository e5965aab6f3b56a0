"""Data-parallel feature extraction: one jitted network call per batch, sharded over all devices.

Each process feeds its own local batch; the global batch is split along the batch axis over
a 1-D device mesh (all devices of all hosts). Short batches are zero-padded to the fixed size
(one compilation) and the padding rows are dropped from the result. Every process must call
the returned function the same number of times (it runs a collective program); a process with
nothing left to evaluate passes 0 rows and still takes part.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sdejax.evaluation import inception

FeatureFn = Callable[[np.ndarray], Any]


def local_rows(array: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded array, in batch order, each row once."""
    if array.is_fully_addressable:
        return np.asarray(array)
    shards = {s.index[0].start or 0: s.data for s in array.addressable_shards}
    return np.concatenate([np.asarray(shards[start]) for start in sorted(shards)])


def allgather_rows(rows: np.ndarray) -> np.ndarray:
    """Concatenate every process's rows (counts may differ) in process order, bit-exact for any dtype."""
    rows = np.ascontiguousarray(rows)
    counts = np.asarray(multihost_utils.process_allgather(np.array(len(rows), np.int32))).reshape(-1)
    width = rows.itemsize * int(np.prod(rows.shape[1:]))
    raw = np.zeros((counts.max(), width), np.uint8)
    raw[:len(rows)] = rows.view(np.uint8).reshape(len(rows), width)
    gathered = np.asarray(multihost_utils.process_allgather(raw)).reshape((len(counts),) + raw.shape)
    flat = np.concatenate([part[:count] for part, count in zip(gathered, counts)])
    return flat.view(rows.dtype).reshape((-1,) + rows.shape[1:])


def sharded_feature_fn(apply_fn: Callable[[Any, jax.Array], Any], variables: Any, batch_size: int,
                       mesh: Mesh | None = None) -> FeatureFn:
    """``images (0 <= n <= batch_size / processes, ...) -> apply_fn(variables, images)`` as local numpy rows.

    ``batch_size`` is the global batch; it must be a multiple of the number of devices in ``mesh``
    (default: all devices on one axis named "batch").
    """
    mesh = mesh if mesh is not None else Mesh(np.array(jax.devices()), ("batch",))
    if batch_size % mesh.size:
        raise ValueError(f"batch_size {batch_size} must be a multiple of the {mesh.size} devices")
    data = NamedSharding(mesh, PartitionSpec(mesh.axis_names))
    replicated = NamedSharding(mesh, PartitionSpec())
    variables = jax.device_put(variables, replicated)
    run = jax.jit(apply_fn, in_shardings=(replicated, data), out_shardings=data)
    local_size = batch_size // jax.process_count()

    def features(images: np.ndarray) -> Any:
        images = np.asarray(images)
        n = len(images)
        if n > local_size:
            raise ValueError(f"images must hold 0 to {local_size} rows per process; got shape {images.shape}")
        padded = np.concatenate([images, np.zeros((local_size - n,) + images.shape[1:], images.dtype)])
        out = run(variables, jax.make_array_from_process_local_data(data, padded))
        return jax.tree.map(lambda a: local_rows(a)[:n], out)

    return features


def inception_feature_fn(variables: Mapping[str, Any], batch_size: int, mesh: Mesh | None = None) -> FeatureFn:
    """Sharded ``images in [0, 1], NHWC -> {"pool3": (n, 2048), "logits": (n, 1008)}``."""
    return sharded_feature_fn(inception.apply, variables, batch_size, mesh)
