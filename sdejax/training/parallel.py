"""Data-parallel placement of the train step over every device of every process.

"jit" (default): one `Mesh` over `jax.devices()` with a single axis "data"; batches are global
arrays sharded along their batch axis (`NamedSharding(mesh, P(None, "data"))` for a stack of K
batches), the train state is replicated (`P()`), and the scanned step is one SPMD program that
XLA partitions (the gradient all-reduce is inserted by the compiler).

"pmap": the step is `jax.pmap`-ed over the local devices with axis "data" (gradients `pmean`-ed);
the state carries a leading device axis, each device gets its slice of the process's rows.

Each process always supplies only its own rows (`local_batch = batch / process_count`), and the
global batch is the concatenation over processes, so a run's maths does not depend on how many
processes or devices share it (see `step.py` for the per-example noise).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sdejax.data import prefetch
from sdejax.training.state import TrainState

PARALLELISM = ("jit", "pmap")
AXIS = "data"


def initialize_distributed(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
                           process_id: Optional[int] = None, auto: bool = False) -> None:
    """`jax.distributed.initialize` for multi-process runs; call before any other JAX use.

    Explicit arguments win; otherwise the environment variables JAX_COORDINATOR_ADDRESS,
    JAX_NUM_PROCESSES, JAX_PROCESS_ID are read. With none of them set, `auto=True` lets JAX detect
    the cluster (SLURM, Open MPI, Kubernetes, Cloud TPU pods); `auto=False` stays single-process.
    """
    env = os.environ
    coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and "JAX_NUM_PROCESSES" in env:
        num_processes = int(env["JAX_NUM_PROCESSES"])
    if process_id is None and "JAX_PROCESS_ID" in env:
        process_id = int(env["JAX_PROCESS_ID"])
    if coordinator_address is None and num_processes is None and process_id is None and not auto:
        return
    if jax.config.jax_cpu_collectives_implementation in (None, "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes; no-op on GPU/TPU
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where the train state and batches live, and how the multi-step is compiled, for one mode."""

    mode: str
    mesh: Mesh

    @property
    def num_devices(self) -> int:
        """Devices across all processes taking part in a step."""
        return self.mesh.devices.size

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    def state_sharding(self) -> jax.sharding.Sharding:
        """Sharding of a restored (un-replicated) state: mesh-replicated, or pmap's first local device."""
        if self.mode == "jit":
            return self.replicated
        return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def replicate(self, state: TrainState) -> TrainState:
        """Place an (identical on every process) state: replicated global arrays (jit), or stacked
        copies along a leading local-device axis (pmap)."""
        if self.mode == "jit":
            return self.on_mesh(state)
        n = jax.local_device_count()
        return jax.tree_util.tree_map(lambda x: np.broadcast_to(np.asarray(x), (n,) + np.shape(x)), state)

    def on_mesh(self, tree: Any) -> Any:
        """A tree (identical on every process) as global arrays replicated over the mesh."""
        def put(x):
            if isinstance(x, jax.Array) and x.sharding == self.replicated:
                return x
            host = np.asarray(x)
            return jax.make_array_from_callback(host.shape, self.replicated, lambda idx: host[idx])
        return jax.tree_util.tree_map(put, tree)

    def rows_on_mesh(self, local: np.ndarray) -> jax.Array:
        """Every process's rows (axis 0) as one global array sharded over the mesh (replicated
        when a single process's rows do not split over the devices)."""
        n = local.shape[0] * jax.process_count()
        if n % self.num_devices and jax.process_count() > 1:
            raise ValueError(f"a global batch of {n} rows does not split over {self.num_devices} devices")
        spec = P(AXIS) if n % self.num_devices == 0 else P()
        return jax.make_array_from_process_local_data(NamedSharding(self.mesh, spec), local)

    def unreplicate(self, state: TrainState) -> TrainState:
        """The state to checkpoint or evaluate: the replicated global state (jit), or the host copy
        of device 0's replica (pmap)."""
        if self.mode == "jit":
            return state
        return jax.device_get(jax.tree_util.tree_map(lambda x: x[0], state))

    def shard_batches(self, local: dict) -> dict:
        """This process's rows of a stack of K batches, {key: (K, local_batch, ...)}, placed for the step."""
        if self.mode == "jit":
            return prefetch.shard_batch(local, NamedSharding(self.mesh, P(None, AXIS)))
        n = jax.local_device_count()

        def split(v):
            if v.shape[1] % n:
                raise ValueError(f"local batch of {v.shape[1]} rows is not divisible by {n} local devices")
            return np.moveaxis(v.reshape((v.shape[0], n, v.shape[1] // n) + v.shape[2:]), 1, 0)
        return jax.tree_util.tree_map(split, local)

    def compile(self, multi_step: Callable[[TrainState, dict], tuple[TrainState, dict]]):
        """`multi_step(state, batches) -> (state, metrics)` placed for this mode (state donated);
        metrics come back as host numpy arrays of shape (K,)."""
        if self.mode == "jit":
            fn = jax.jit(multi_step, in_shardings=(self.replicated, NamedSharding(self.mesh, P(None, AXIS))),
                         out_shardings=(self.replicated, self.replicated), donate_argnums=0)
            return lambda state, batches: _host_metrics(fn(state, batches), lambda m: m)
        fn = jax.pmap(multi_step, axis_name=AXIS, donate_argnums=0)
        return lambda state, batches: _host_metrics(fn(state, batches), lambda m: m[0])


def _host_metrics(out: tuple[TrainState, dict], pick: Callable) -> tuple[TrainState, dict]:
    state, metrics = out
    return state, {k: np.asarray(pick(v)) for k, v in metrics.items()}


def get_placement(mode: str = "jit") -> Placement:
    """The placement for `config.training.parallelism` over all devices of all processes."""
    if mode not in PARALLELISM:
        raise ValueError(f"unknown training.parallelism {mode!r}; valid: {list(PARALLELISM)}")
    return Placement(mode, Mesh(np.asarray(jax.devices()), (AXIS,)))


def check_batch_size(batch_size: int, grad_accum_steps: int, placement: Placement) -> None:
    """The global batch must split evenly over processes, devices and microbatches."""
    per_device, rem = divmod(batch_size, placement.num_devices)
    if rem or per_device % grad_accum_steps:
        raise ValueError(f"training.batch_size={batch_size} must be a multiple of the device count "
                         f"{placement.num_devices} times training.grad_accum_steps={grad_accum_steps}")
