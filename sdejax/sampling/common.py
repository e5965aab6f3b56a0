"""Checks and small pieces shared by the samplers and the likelihood.

The one home of: the `eps` range check (t_min ≤ eps < T), the number and shape checks (a
non-negative `snr`/`rtol`/`atol`, a non-empty batch, a state that fits in memory), the default time grid, the initial state
(a caller's `x_T` or a prior draw, in the dtype the sampler runs in), and the
per-example reductions Σ_features and ‖·‖ over all but the leading (batch) axis.
"""
from __future__ import annotations

from typing import Any

import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from sdejax.sampling import grids
from sdejax.sampling.loop import check_batch_axis, check_x
from sdejax.sde import SDE

Array = jax.Array


def per_example_sum(v: Array) -> Array:
    """Σ over all but the leading axis: shape `(batch,)`."""
    return jnp.sum(jnp.reshape(v, (v.shape[0], -1)), axis=-1)


def per_example_norm(v: Array) -> Array:
    """‖v_b‖₂ over all but the leading axis: shape `(batch,)`."""
    return jnp.sqrt(per_example_sum(v**2))


def check_eps(sde: SDE, eps: float | None) -> float:
    """`eps` (default `sde.sampling_eps`) as a float, else a ValueError unless t_min ≤ eps < T."""
    eps = float(sde.sampling_eps if eps is None else eps)
    if not sde.t_min <= eps < sde.T:
        raise ValueError(f"eps must lie in [t_min, T) = [{sde.t_min}, {sde.T}) of {type(sde).__name__}; got {eps}")
    return eps


def check_int(name: str, value: Any, minimum: int) -> int:
    """`value` as an int ≥ `minimum`, else a ValueError naming it."""
    if isinstance(value, bool) or int(value) != value or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")
    return int(value)


def check_number(name: str, value: Any, minimum: float = 0.0) -> float:
    """`value` as a finite float ≥ `minimum`, else a ValueError naming it."""
    number = float(value)
    if not (math.isfinite(number) and number >= minimum):
        raise ValueError(f"{name} must be a finite number >= {minimum:g}; got {value!r}")
    return number


def memory_bytes() -> int:
    """Memory of this process's first device: its allocator's limit (GPU/TPU), or the host's physical
    memory (CPU). A local device: on a multi-process run `jax.devices()[0]` may belong to another host."""
    stats = jax.local_devices()[0].memory_stats() or {}
    return int(stats.get("bytes_limit", os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")))


def check_shape(name: str, shape: Any, dtype: Any) -> tuple[int, ...]:
    """`shape` as a tuple of positive ints with a non-empty batch axis whose array of `dtype` fits in
    the device's memory (`memory_bytes`), else a ValueError (or MemoryError) naming it, before any allocation."""
    shape = tuple(int(d) for d in shape)
    check_batch_axis(name, shape)
    if min(shape) < 1:
        raise ValueError(f"{name} must have positive dimensions; got {shape}")
    size = math.prod(shape) * np.dtype(dtype).itemsize
    if size > memory_bytes():
        raise MemoryError(f"{name} = {shape} needs {size / 2**30:.3g} GiB per {np.dtype(dtype).name} state, "
                          f"more than the device's {memory_bytes() / 2**30:.3g} GiB; sample in smaller batches")
    return shape


def time_grid(sde: SDE, ts: Any, n: int, eps: float | None) -> np.ndarray:
    """The validated grid `ts`, or (ts None) today's default t_i = linspace(T, eps, n) (`grids.uniform`)."""
    if ts is None:
        return grids.uniform(sde, n, check_eps(sde, eps))
    return grids.validate(sde, ts)


def initial_x(sde: SDE, rng: Array, shape: tuple[int, ...], x_T: Array | None, dtype: Any, name: str = "x_T") -> Array:
    """The caller's `x_T` (checked against `shape`; `name` in errors), or x_T ~ prior drawn with `rng`, in `dtype`.

    `dtype=None` keeps the dtype of `x_T`, and draws the prior in float32 when there is no `x_T`.
    """
    if x_T is None:
        dtype = jnp.float32 if dtype is None else dtype
        return sde.prior_sampling(rng, check_shape("shape", shape, dtype), dtype)
    x_T = check_x(name, x_T, tuple(shape))
    return x_T if dtype is None else x_T.astype(dtype)
