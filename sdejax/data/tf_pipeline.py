"""The tf.data implementation of `sdejax.data.pipeline.Pipeline` (TFRecords, TensorFlow).

Same semantics as the grain stack (order by seed, per-process rows of each global batch,
per-example randomness keyed by the global stream position via stateless TF random ops), but a
buffered shuffle (`shuffle_buffer`) instead of a global permutation. Records are sharded before
they are decoded, so each process decodes only its own rows. TensorFlow is imported here only.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from sdejax.data import tfrecords
from sdejax.data.pipeline import Pipeline


def crop_and_resize(image: tf.Tensor, crop: int | None, image_size: int) -> tf.Tensor:
    """TF twin of `transforms.crop_and_resize`: centred square crop, antialiased bilinear resize
    rounded back to uint8 (skipped when the crop already has the target size)."""
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    size = tf.minimum(h, w) if crop is None else tf.constant(crop)
    top, left = (h - size) // 2, (w - size) // 2
    image = image[top:top + size, left:left + size]

    def resize():
        out = tf.image.resize(tf.cast(image, tf.float32), [image_size, image_size],
                              method="bilinear", antialias=True)
        return tf.cast(tf.clip_by_value(tf.round(out), 0.0, 255.0), tf.uint8)

    out = tf.cond(size == image_size, lambda: image, resize)
    return tf.ensure_shape(out, [image_size, image_size, None])


def _example_fn(opts: Pipeline, decode: Callable[[tf.Tensor], tf.Tensor]):
    """(index, raw record) -> {"image": f32 in [0, 1], "label": i32}, see transforms.py."""
    _, example_seed = opts.seeds()
    seed_hi = np.int64(example_seed)

    def fn(index, record):
        image = crop_and_resize(decode(record["image"]), opts.crop, opts.image_size)
        seed = tf.stack([tf.constant(seed_hi), index])
        if opts.flip:
            flip = tf.random.stateless_uniform([], seed=seed, alg="philox") < 0.5
            image = tf.cond(flip, lambda: image[:, ::-1], lambda: image)
        k = tf.cast(image, tf.float32)
        if opts.dequantize:
            noise = tf.random.stateless_uniform(tf.shape(k), seed=seed + [0, 1 << 40], alg="philox")
            x = (k + noise) / opts.num_levels
        else:
            x = k / (opts.num_levels - 1)
        label = tf.cast(record["label"], tf.int32) if opts.labeled else tf.constant(0, tf.int32)
        return {"image": x, "label": label}

    return fn


def tfds_records(builder, split: str) -> tuple[tf.data.Dataset, Callable]:
    """Undecoded records of a TFDS split in file order, and the image decoder to apply later."""
    image_feature = builder.info.features["image"]
    if isinstance(image_feature, tfds.features.Image):
        ds = builder.as_dataset(split=split, shuffle_files=False,
                                decoders={"image": tfds.decode.SkipDecoding()})
        return ds, image_feature.decode_example
    return builder.as_dataset(split=split, shuffle_files=False), lambda image: image


def tfrecord_records(pattern: str) -> tuple[tf.data.Dataset, Callable]:
    """score_sde's FFHQ/CelebA-HQ TFRecords as {"image": serialized, "label": 0} and a decoder."""
    ds = tf.data.TFRecordDataset(tfrecords.tfrecord_files(pattern))

    def decode(serialized):
        ex = tf.io.parse_single_example(serialized, {
            "shape": tf.io.FixedLenFeature([3], tf.int64),
            "data": tf.io.FixedLenFeature([], tf.string)})
        data = tf.reshape(tf.io.decode_raw(ex["data"], tf.uint8), ex["shape"])
        return tf.transpose(data, (1, 2, 0))

    return ds.map(lambda s: {"image": s, "label": 0}), decode


class TFDataIterator:
    """Numpy batches of a tf.data pipeline, resumable: the state counts the batches yielded and
    `set_state` rebuilds the (deterministic) pipeline skipping that many undecoded batches."""

    def __init__(self, records: tf.data.Dataset, decode: Callable, opts: Pipeline):
        self._records, self._decode, self._opts = records, decode, opts
        self.set_state({"next_index": 0})

    def _build(self, start: int) -> tf.data.Dataset:
        opts = self._opts
        shuffle_seed, _ = opts.seeds()
        ds = self._records
        if opts.shuffle:
            ds = ds.shuffle(opts.shuffle_buffer, seed=shuffle_seed, reshuffle_each_iteration=True)
        ds = ds.repeat(opts.num_epochs).enumerate()
        if opts.num_epochs is not None and opts.drop_remainder:
            ds = ds.batch(opts.batch_size, drop_remainder=True).unbatch()
        ds = ds.batch(opts.local_batch_size, drop_remainder=opts.drop_remainder)
        ds = ds.skip(start * opts.process_count).shard(opts.process_count, opts.process_index)
        ds = ds.unbatch().map(_example_fn(opts, self._decode),
                              num_parallel_calls=opts.num_threads, deterministic=True)
        return ds.batch(opts.local_batch_size).prefetch(opts.prefetch)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._it)
        self._next_index += 1
        return batch

    def get_state(self) -> dict[str, int]:
        return {"next_index": self._next_index}

    def set_state(self, state: dict[str, int]) -> None:
        self._next_index = int(state["next_index"])
        self._it = iter(tfds.as_numpy(self._build(self._next_index)))
