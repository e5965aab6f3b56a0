"""Input pipeline on the tf.data stack (tfrecord), and score_sde's FFHQ-style TFRecords on both
stacks. TensorFlow is imported lazily by the pipeline; this module is the only test that loads it.
"""
import dataclasses

import ml_collections
import numpy as np
import pytest

from sdejax.data import datasets, digits
from sdejax.data.pipeline import Pipeline


def config(**data) -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict()
    cfg.seed = 0
    cfg.data = ml_collections.ConfigDict(dict(
        dataset="DIGITS", image_size=16, random_flip=True, centered=False,
        uniform_dequantization=True, num_channels=1, stack="tf", num_threads=2, prefetch=2))
    cfg.data.update(data)
    cfg.training = ml_collections.ConfigDict(dict(batch_size=20))
    cfg.eval = ml_collections.ConfigDict(dict(batch_size=100))
    return cfg


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tfds_tf"))
    digits.prepare_digits(path, "tfrecord")
    return path


def take(it, n):
    return [next(it) for _ in range(n)]


def test_tf_stack_grid_sharding_and_resume(data_dir):
    opts = Pipeline(batch_size=20, image_size=16, flip=True, dequantize=True, num_threads=2,
                    prefetch=2, shuffle_buffer=500)
    single = take(datasets.get_iterator(config(), "train", opts, data_dir=data_dir), 6)
    assert single[0]["image"].shape == (20, 16, 16, 1) and single[0]["label"].dtype == np.int32
    x = np.concatenate([b["image"] for b in single])
    assert 0 <= x.min() and x.max() < 1  # (k + u)/17 with k <= 16, u < 1
    u = x * 17 - np.floor(x * 17)
    # u ~ U[0,1) per pixel: 5 standard errors of the mean over 30,720 values.
    assert abs(u.mean() - 0.5) < 5 * np.sqrt(1 / 12 / u.size)
    # Two processes: concatenating their rows gives the single-process batch, bitwise.
    shards = [take(datasets.get_iterator(
        config(), "train", dataclasses.replace(opts, process_index=p, process_count=2),
        data_dir=data_dir), 6) for p in range(2)]
    for step in range(6):
        for key in ("image", "label"):
            merged = np.concatenate([shards[0][step][key], shards[1][step][key]])
            np.testing.assert_array_equal(merged, single[step][key])
    # Resume: a new iterator set to state 4 continues with batches 4 and 5.
    it = datasets.get_iterator(config(), "train", opts, data_dir=data_dir)
    it.set_state({"next_index": 4})
    for ref in single[4:]:
        np.testing.assert_array_equal(next(it)["image"], ref["image"])
    assert it.get_state() == {"next_index": 6}


def test_tf_stack_eval_pass_matches_grain_values(data_dir, tmp_path):
    """One eval pass reads every test digit once, on the same 17-level grid as grain."""
    _, tf_eval = datasets.get_dataset(config(), evaluation=True, data_dir=data_dir,
                                      uniform_dequantization=False, process_index=0,
                                      process_count=1)
    tf_images = np.concatenate([b["image"] for b in tf_eval])
    grain_dir = str(tmp_path)
    digits.prepare_digits(grain_dir, "array_record")
    _, grain_eval = datasets.get_dataset(config(stack="grain"), evaluation=True,
                                         data_dir=grain_dir, uniform_dequantization=False,
                                         process_index=0, process_count=1)
    grain_images = np.concatenate([b["image"] for b in grain_eval])
    assert tf_images.shape == grain_images.shape == (300, 16, 16, 1)
    key = lambda ims: sorted(im.tobytes() for im in ims)  # file orders differ between formats
    assert key(tf_images) == key(grain_images)


def test_ffhq_tfrecords_on_both_stacks(tmp_path):
    """score_sde's TFRecords: "shape" (C, H, W) + raw "data", read back exactly as HWC."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (10, 3, 8, 8), dtype=np.uint8)
    path = str(tmp_path / "ffhq-r03.tfrecords")
    with tf.io.TFRecordWriter(path) as writer:
        for im in images:
            writer.write(tf.train.Example(features=tf.train.Features(feature={
                "shape": tf.train.Feature(int64_list=tf.train.Int64List(value=im.shape)),
                "data": tf.train.Feature(bytes_list=tf.train.BytesList(value=[im.tobytes()])),
            })).SerializeToString())
    out = {}
    for stack in ("grain", "tf"):
        cfg = config(dataset="FFHQ", num_channels=3, image_size=8, tfrecords_path=path,
                     stack=stack)
        cfg.eval.batch_size = 5
        _, it = datasets.get_dataset(cfg, evaluation=True, uniform_dequantization=False,
                                     process_index=0, process_count=1)
        out[stack] = list(it)
    for stack, batches in out.items():
        got = np.concatenate([b["image"] for b in batches])
        np.testing.assert_allclose(got * 255, images.transpose(0, 2, 3, 1), atol=1e-4,
                                   err_msg=stack)
        assert not np.concatenate([b["label"] for b in batches]).any()


def test_resize_agrees_between_stacks():
    """PIL (grain) and tf.image (tf) antialiased bilinear: the same triangle filter, so after
    rounding to uint8 they may differ by at most one level. CelebA geometry: crop 140 -> 64."""
    from sdejax.data import tf_pipeline, transforms  # pylint: disable=import-outside-toplevel
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (218, 178, 3), dtype=np.uint8)
    ours = transforms.crop_and_resize(image, 140, 64).astype(int)
    theirs = tf_pipeline.crop_and_resize(image, 140, 64).numpy().astype(int)
    assert ours.shape == theirs.shape == (64, 64, 3)
    assert np.abs(ours - theirs).max() <= 1
