"""Input pipeline on the grain stack (array_record + tfds data sources, no TensorFlow).

The digits are prepared offline into a temporary data_dir, so the whole TFDS path runs with no
network. Statistical tolerances are 5 standard errors of the quantity tested.
"""
import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import jax
import ml_collections
import numpy as np
import pytest

from sdejax.data import datasets, digits, pipeline, prefetch
from sdejax.data.pipeline import Pipeline


def digits_config(**data) -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict()
    cfg.seed = 0
    cfg.data = ml_collections.ConfigDict(dict(
        dataset="DIGITS", image_size=16, random_flip=False, centered=False,
        uniform_dequantization=False, num_channels=1, num_threads=2, prefetch=4))
    cfg.data.update(data)
    cfg.training = ml_collections.ConfigDict(dict(batch_size=30))
    cfg.eval = ml_collections.ConfigDict(dict(batch_size=100))
    return cfg


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tfds"))
    digits.prepare_digits(path, "array_record")
    return path


def eval_images(data_dir, **data):
    """All 300 test digits (3 batches of 100), one pass in file order."""
    _, it = datasets.get_dataset(digits_config(**data), evaluation=True, data_dir=data_dir,
                                 process_index=0, process_count=1)
    batches = list(it)
    return (np.concatenate([b["image"] for b in batches]),
            np.concatenate([b["label"] for b in batches]))


def test_digits_builder_splits_and_grid(data_dir):
    builder = digits.SklearnDigits(data_dir=data_dir)
    assert {k: v.num_examples for k, v in builder.info.splits.items()} == {"train": 1497, "test": 300}
    images, labels = digits.padded_digits()
    split = digits.split_indices()
    assert not set(split["train"]) & set(split["test"])
    assert len(split["train"]) + len(split["test"]) == 1797
    test = builder.as_data_source("test")
    stored = np.stack([test[i]["image"] for i in range(len(test))])
    assert stored.shape == (300, 16, 16, 1) and stored.dtype == np.uint8
    assert set(np.unique(stored)) <= set(range(17)) and stored.max() == 16
    assert not stored[:, :4].any() and not stored[:, -4:].any()  # zero padding
    assert not stored[:, :, :4].any() and not stored[:, :, -4:].any()
    # The test split holds exactly the sklearn digits at the test indices (as a multiset).
    key = lambda ims, labs: sorted(im.tobytes() + bytes([l]) for im, l in zip(ims, labs))
    assert key(stored, [test[i]["label"] for i in range(300)]) == key(
        images[split["test"]], labels[split["test"]])


def test_levels_and_dequantisation_grid(data_dir):
    plain, labels = eval_images(data_dir)
    assert plain.shape == (300, 16, 16, 1) and plain.dtype == np.float32 and labels.dtype == np.int32
    k = plain * 16  # no dequantisation: x = k/16, k in 0..16
    np.testing.assert_allclose(k, np.round(k), atol=1e-5)
    deq, labels2 = eval_images(data_dir, uniform_dequantization=True)
    np.testing.assert_array_equal(labels, labels2)  # same order
    u = deq * 17 - np.round(k)  # dequantised: x = (k + u)/17, u in [0, 1)
    assert u.min() >= -1e-5 and u.max() < 1 + 1e-5
    # u ~ U[0,1): mean 1/2, var 1/12; 5 standard errors over n = 76,800 values.
    assert abs(u.mean() - 0.5) < 5 * np.sqrt(1 / 12 / u.size)
    assert abs(u.var() - 1 / 12) < 5 * np.sqrt(1 / 180 / u.size)  # Var[(u-1/2)^2] = 1/180


def test_random_flip_mirrors_about_half(data_dir):
    plain, _ = eval_images(data_dir)
    cfg = digits_config(random_flip=True)
    _, it = datasets.get_dataset(cfg, evaluation=True, data_dir=data_dir, process_index=0,
                                 process_count=1)
    assert np.array_equal(np.concatenate([b["image"] for b in it]), plain)  # no flip in eval
    opts = Pipeline(batch_size=100, image_size=16, shuffle=False, num_epochs=1, flip=True,
                    num_threads=2, prefetch=4)
    flipped = np.concatenate([b["image"] for b in datasets.get_iterator(
        cfg, "eval", opts, data_dir=data_dir)])
    is_orig = (flipped == plain).all(axis=(1, 2, 3))
    is_mirror = (flipped == plain[:, :, ::-1]).all(axis=(1, 2, 3))
    assert (is_orig | is_mirror).all()
    # Flips ~ Binomial(300, 1/2) (up to symmetric digits): 5 standard errors = 5 * sqrt(300)/2.
    assert abs((~is_orig).sum() - 150) < 5 * np.sqrt(300) / 2


def test_data_scaler_centres():
    x = np.linspace(0, 1, 11, dtype=np.float32)
    for centered, lo in ((True, -1.0), (False, 0.0)):
        cfg = digits_config(centered=centered)
        y = datasets.get_data_scaler(cfg)(x)
        assert y.min() == lo and y.max() == 1.0
        np.testing.assert_allclose(datasets.get_data_inverse_scaler(cfg)(y), x, atol=1e-7)


def indexed_source(n):
    """Records whose label is their index, to track order and coverage."""
    return [{"image": np.full((2, 2, 1), i % 256, np.uint8), "label": i} for i in range(n)]


def batches(opts, n, source=indexed_source(1000)):
    it = pipeline.grain_iterator(source, opts)
    return [next(it) for _ in range(n)]


def test_host_sharding_is_disjoint_and_matches_one_process():
    base = Pipeline(batch_size=30, image_size=2, flip=True, dequantize=True, num_epochs=1,
                    num_threads=2, prefetch=4)
    single = batches(base, 33)  # 33 * 30 = 990 of 1000: the last partial batch is dropped
    shards = [batches(dataclasses.replace(base, process_index=p, process_count=3), 33)
              for p in range(3)]
    for step in range(33):
        for key in ("image", "label"):
            merged = np.concatenate([shards[p][step][key] for p in range(3)])
            np.testing.assert_array_equal(merged, single[step][key])
    labels = np.concatenate([b["label"] for shard in shards for b in shard])
    assert len(set(labels.tolist())) == 990  # disjoint slices covering the epoch


def test_order_is_deterministic_and_reshuffled_each_epoch():
    opts = Pipeline(batch_size=100, image_size=2, num_threads=2, prefetch=4)
    first = np.concatenate([b["label"] for b in batches(opts, 20)])
    again = np.concatenate([b["label"] for b in batches(opts, 20)])
    np.testing.assert_array_equal(first, again)
    epoch0, epoch1 = first[:1000], first[1000:]
    assert sorted(epoch0) == sorted(epoch1) == list(range(1000))
    assert not np.array_equal(epoch0, epoch1)
    other = np.concatenate([b["label"] for b in batches(dataclasses.replace(opts, seed=1), 1)])
    assert not np.array_equal(other, first[:100])


def test_missing_dataset_and_unknown_name(tmp_path):
    cfg = digits_config(dataset="CIFAR10", num_channels=3, download=False, image_size=32)
    with pytest.raises(datasets.DatasetNotPreparedError,
                       match=r"tfds build cifar10 --data_dir=.*--file_format=array_record"):
        datasets.get_dataset(cfg, data_dir=str(tmp_path), process_index=0, process_count=1)
    with pytest.raises(ValueError, match=r"Unknown config.data.dataset 'CIFAR100'.*'CIFAR10'"):
        datasets.get_dataset(digits_config(dataset="CIFAR100"), data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="num_channels=3"):
        datasets.get_dataset(digits_config(num_channels=3), data_dir=str(tmp_path))


def test_wrong_file_format_says_how_to_convert(data_dir):
    with pytest.raises(datasets.DatasetNotPreparedError, match="tfds convert_format"):
        datasets.get_dataset(digits_config(), data_dir=data_dir, stack="tf", process_index=0,
                             process_count=1)


def test_iterator_state_resumes_exactly(data_dir):
    cfg = digits_config(random_flip=True, uniform_dequantization=True)

    def train_iter():
        return datasets.get_dataset(cfg, data_dir=data_dir, process_index=0, process_count=1)[0]

    it = train_iter()
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # JSON-serialisable, as checkpoints need
    reference = [next(it) for _ in range(60)]  # crosses the epoch boundary (49 batches/epoch)
    resumed = train_iter()
    resumed.set_state(state)
    for ref in reference:
        got = next(resumed)
        np.testing.assert_array_equal(got["image"], ref["image"])
        np.testing.assert_array_equal(got["label"], ref["label"])


def test_device_prefetcher_state_counts_consumed_batches():
    opts = Pipeline(batch_size=10, image_size=2, dequantize=True, num_threads=2, prefetch=4)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    pf = prefetch.DevicePrefetcher(pipeline.grain_iterator(indexed_source(100), opts),
                                   lambda b: prefetch.shard_batch(b, sharding), size=3)
    for _ in range(4):
        next(pf)
    state = pf.get_state()
    assert state == {"next_index": 4}
    ref = next(pf)
    assert isinstance(ref["image"], jax.Array)
    pf.set_state(state)
    np.testing.assert_array_equal(np.asarray(next(pf)["label"]), np.asarray(ref["label"]))


def test_grain_stack_runs_without_tensorflow(data_dir):
    """TensorFlow hidden from the import system: preparing and reading still work."""
    cfg = digits_config().to_dict()
    script = textwrap.dedent(f"""
        import sys
        class HideTF:
            def __init__(self, finder): self.finder = finder
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "tensorflow":
                    return None
                return self.finder.find_spec(name, path, target)
        sys.meta_path[:] = [HideTF(f) for f in sys.meta_path]
        import ml_collections
        from sdejax.data import datasets, digits
        digits.prepare_digits({data_dir!r} + "/fresh")
        cfg = ml_collections.ConfigDict({cfg!r})
        train, _ = datasets.get_dataset(cfg, data_dir={data_dir!r},
                                        process_index=0, process_count=1)
        assert next(train)["image"].shape == (30, 16, 16, 1)
        assert "tensorflow" not in sys.modules
        print("ok")
    """)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
