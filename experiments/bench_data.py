"""Benchmark the two input stacks on a CIFAR-shaped dataset built through TFDS, offline.

    python experiments/bench_data.py --data_dir=/tmp/sdejax_bench --batches=300

Builds `cifar_shaped` (50,000 train images of 32x32x3 uint8, PNG-encoded like TFDS's cifar10,
random pixels from a fixed seed) once per record format, then, in a fresh process per stack,
times the training pipeline (shuffle, flip, dequantisation, batch 128): time to first batch,
examples/s over `--batches` batches after it, peak resident memory (RSS high-water mark), and the
cost of resuming at batch 1,000 (`set_state` then one batch).
"""
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
import tensorflow_datasets as tfds
from absl import app, flags

flags.DEFINE_string("data_dir", "/tmp/sdejax_bench", "Where the benchmark datasets are built.")
flags.DEFINE_integer("batches", 300, "Batches timed after the first one.")
flags.DEFINE_integer("batch_size", 128, "Global batch size.")
flags.DEFINE_integer("num_threads", 8, "Reader threads (grain) / parallel map calls (tf).")
flags.DEFINE_integer("num_workers", 0, "grain worker processes (0: threads only).")
flags.DEFINE_string("stack", None, "Internal: time one stack in this process.")
FLAGS = flags.FLAGS

NUM_TRAIN = 50_000


class CifarShaped(tfds.core.GeneratorBasedBuilder):
    """50,000 random 32x32x3 uint8 images with labels, stored as PNG like TFDS's cifar10."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(32, 32, 3)),
            "label": tfds.features.ClassLabel(num_classes=10)}))

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        rng = np.random.default_rng(0)
        for i in range(NUM_TRAIN):
            image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            yield i, {"image": image, "label": i % 10}


def builder_for(stack: str) -> CifarShaped:
    from sdejax.data.registry import FILE_FORMAT  # pylint: disable=import-outside-toplevel
    fmt = FILE_FORMAT[stack]
    builder = CifarShaped(data_dir=os.path.join(FLAGS.data_dir, fmt), file_format=fmt)
    if not builder.is_prepared():
        start = time.perf_counter()
        builder.download_and_prepare(file_format=fmt)
        print(f"prepared {fmt} in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    return builder


def make_iterator(stack: str, builder):
    from sdejax.data import pipeline  # pylint: disable=import-outside-toplevel
    opts = pipeline.Pipeline(batch_size=FLAGS.batch_size, image_size=32, flip=True,
                             dequantize=True, num_threads=FLAGS.num_threads,
                             prefetch=max(16, FLAGS.num_threads),
                             num_workers=FLAGS.num_workers)
    if stack == "grain":
        return pipeline.grain_iterator(builder.as_data_source("train"), opts)
    from sdejax.data import tf_pipeline  # pylint: disable=import-outside-toplevel
    return tf_pipeline.TFDataIterator(*tf_pipeline.tfds_records(builder, "train"), opts)


def time_stack(stack: str) -> dict:
    start = time.perf_counter()
    builder = builder_for(stack)
    it = make_iterator(stack, builder)
    first = next(it)
    assert first["image"].shape == (FLAGS.batch_size, 32, 32, 3)
    ttfb = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(FLAGS.batches):
        next(it)
    rate = FLAGS.batches * FLAGS.batch_size / (time.perf_counter() - start)
    start = time.perf_counter()
    it.set_state({"next_index": 1000})
    next(it)
    resume = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
    return dict(stack=stack, first_batch_s=round(ttfb, 2), examples_per_s=round(rate),
                peak_rss_mib=round(rss), resume_at_1000_s=round(resume, 2))


def main(argv):
    del argv
    if FLAGS.stack:
        print(json.dumps(time_stack(FLAGS.stack)))
        return
    for stack in ("grain", "tf"):
        builder_for(stack)  # build outside the timed process
    print(f"{'stack':6} {'first batch (s)':>15} {'examples/s':>11} {'peak RSS (MiB)':>15} "
          f"{'resume@1000 (s)':>16}")
    for stack in ("grain", "tf"):
        out = subprocess.run([sys.executable, __file__, f"--stack={stack}"] + [
            f"--{k}={getattr(FLAGS, k)}" for k in
            ("data_dir", "batches", "batch_size", "num_threads", "num_workers")],
            capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{r['stack']:6} {r['first_batch_s']:>15} {r['examples_per_s']:>11} "
              f"{r['peak_rss_mib']:>15} {r['resume_at_1000_s']:>16}")


if __name__ == "__main__":
    app.run(main)
