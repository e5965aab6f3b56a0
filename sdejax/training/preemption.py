"""Preemption: a SIGTERM asks the loop to checkpoint and stop at a step every process agrees on.

Single process: a SIGTERM handler sets a flag that the loop polls between dispatches. Several
processes: JAX's preemption service (started by `jax.distributed.initialize`, listening for
SIGTERM on every host) propagates a notice to all processes and picks a common sync point;
`multihost_utils.reached_preemption_sync_point(i)` turns True on every process at the same call
i, so all of them save the same step. The loop polls once per dispatch with a dispatch counter
(identical across processes, since every process runs the same chunking).
"""
from __future__ import annotations

import signal
import threading

import jax
from jax.experimental import multihost_utils


class PreemptionWatcher:
    """`reached()` polled once per dispatch; True when the run should save and exit."""

    def __init__(self):
        self._calls = 0
        self._event = threading.Event()
        self._previous = None
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, lambda *_: self._event.set())

    def reached(self) -> bool:
        self._calls += 1
        if jax.process_count() > 1:
            return multihost_utils.reached_preemption_sync_point(self._calls)
        return self._event.is_set()

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
