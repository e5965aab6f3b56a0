"""Prefetch host batches onto devices while keeping the iterator state exact.

A prefetcher runs ahead of the training loop, so the wrapped iterator's own state is `size`
batches past what was consumed. `DevicePrefetcher.get_state()` returns the state recorded right
after the last batch it handed out, so a checkpoint resumes at the next unconsumed batch.
"""
from __future__ import annotations

import collections
from typing import Any, Callable

import jax


def shard_batch(batch: Any, sharding: jax.sharding.Sharding) -> Any:
    """Assemble each process's local rows into global arrays laid out by `sharding` (e.g. a
    `NamedSharding(mesh, P("data"))`); the global batch is the concatenation over processes."""
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


class DevicePrefetcher:
    """Iterator of `put(batch)` kept `size` batches ahead of the consumer, with exact state."""

    def __init__(self, iterator, put: Callable[[Any], Any], size: int = 2):
        self._it, self._put, self._size = iterator, put, size
        self._queue: collections.deque = collections.deque()
        self._state = iterator.get_state()

    def __iter__(self):
        return self

    def __next__(self):
        while len(self._queue) < self._size:
            try:
                batch = next(self._it)
            except StopIteration:
                break
            self._queue.append((self._put(batch), self._it.get_state()))
        if not self._queue:
            raise StopIteration
        batch, self._state = self._queue.popleft()
        return batch

    def get_state(self):
        """State of the wrapped iterator just after the last batch returned by `__next__`."""
        return self._state

    def set_state(self, state) -> None:
        self._queue.clear()
        self._it.set_state(state)
        self._state = state
