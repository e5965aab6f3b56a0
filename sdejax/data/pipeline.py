"""The input pipeline's options and the grain (TensorFlow-free) implementation.

Order and sharding, shared by both stacks: the split is shuffled with `seed` (a fresh permutation
every epoch) and repeated; that stream is cut into consecutive global batches of `batch_size`;
process p of P gets rows [p B/P, (p+1) B/P) of every global batch. Per-example randomness (flip,
dequantisation noise) is drawn from a generator keyed by the example's position in the global
stream. Hence the concatenation of all processes' batches is the single-process batch, bitwise,
whatever P is, and each process only reads the records of its own rows.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import grain
import numpy as np

from sdejax.data import transforms


@dataclasses.dataclass(frozen=True)
class Pipeline:
    """What one iterator does. batch_size is global (summed over processes); num_epochs=None
    repeats forever; drop_remainder drops the last partial global batch; `num_threads` and
    `prefetch` are the reader threads and batches buffered ahead; `num_workers` > 0 adds grain
    worker processes (grain stack only)."""

    batch_size: int
    image_size: int
    num_levels: int = 256
    crop: int | None = None
    labeled: bool = True
    flip: bool = False
    dequantize: bool = False
    shuffle: bool = True
    num_epochs: int | None = None
    seed: int = 0
    process_index: int = 0
    process_count: int = 1
    drop_remainder: bool = True
    num_threads: int = 8
    prefetch: int = 16
    num_workers: int = 0
    shuffle_buffer: int = 10_000  # tf stack only (grain shuffles the whole split)

    @property
    def local_batch_size(self) -> int:
        return self.batch_size // self.process_count

    def __post_init__(self):
        if not 0 <= self.process_index < self.process_count:
            raise ValueError(f"process_index={self.process_index} not in [0, {self.process_count})")
        if self.batch_size % self.process_count:
            raise ValueError(f"batch_size={self.batch_size} is not divisible by the process "
                             f"count {self.process_count}")

    def seeds(self) -> tuple[int, int]:
        """Independent seeds for the shuffle and for per-example randomness."""
        shuffle_seed, example_seed = np.random.SeedSequence(self.seed).generate_state(2)
        return int(shuffle_seed), int(example_seed)


def example_fn(opts: Pipeline):
    """record {"image": uint8 HWC, "label"}, np.random.Generator -> {"image": f32, "label": i32}."""

    def fn(record: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
        image = transforms.crop_and_resize(np.asarray(record["image"]), opts.crop, opts.image_size)
        if opts.flip and rng.random() < 0.5:
            image = image[:, ::-1]
        noise = rng.random(image.shape, dtype=np.float32) if opts.dequantize else None
        label = record["label"] if opts.labeled else 0
        return {"image": transforms.to_unit_interval(image, opts.num_levels, noise),
                "label": np.int32(label)}

    return fn


def grain_iterator(source: Sequence, opts: Pipeline) -> grain.DatasetIterator:
    """Batches of `source` (random access) as numpy dicts; `get_state()`/`set_state()` give exact
    resume (the state is {"next_index": batches already yielded by this process})."""
    shuffle_seed, example_seed = opts.seeds()
    ds = grain.MapDataset.source(source)
    if opts.shuffle:
        ds = ds.shuffle(seed=shuffle_seed)
    ds = ds.repeat(opts.num_epochs).random_map(example_fn(opts), seed=example_seed)
    if opts.num_epochs is not None and opts.drop_remainder:
        ds = ds[: len(ds) // opts.batch_size * opts.batch_size]
    ds = ds.batch(opts.local_batch_size, drop_remainder=opts.drop_remainder)
    ds = ds[opts.process_index::opts.process_count]
    read = grain.ReadOptions(num_threads=opts.num_threads, prefetch_buffer_size=opts.prefetch)
    it_ds = ds.to_iter_dataset(read)
    if opts.num_workers:
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=opts.num_workers))
    return iter(it_ds)
