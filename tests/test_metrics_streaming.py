"""Streaming float64 statistics: batch merges, process gathers and device sharding equal one-shot stats."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from sdejax.evaluation import features, inception, stats, stats_file


def one_shot(x: np.ndarray) -> dict:
    return {"mu": x.mean(0), "sigma": np.cov(x, rowvar=False), "n": len(x)}


def test_merged_batches_equal_one_shot():
    x = np.random.default_rng(0).normal(size=(257, 12)) * 0.5 + 1e4  # large mean, small spread
    cuts = [0, 1, 2, 50, 51, 200, 257]
    moments = stats.moments_of(x[:0])
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        moments = stats.merge(moments, stats.moments_of(x[lo:hi]))
    got, ref = stats.finalize(moments), one_shot(x)
    assert got["n"] == 257
    np.testing.assert_allclose(got["mu"], ref["mu"], rtol=1e-14)
    np.testing.assert_allclose(got["sigma"], ref["sigma"], rtol=1e-10, atol=1e-12)


def test_compute_statistics_with_feature_fn_and_kept_rows():
    x = np.random.default_rng(1).random((70, 4, 4, 3)).astype(np.float32)
    flatten = lambda images: images.reshape(len(images), -1)
    got = stats.compute_statistics(flatten, (x[i:i + 16] for i in range(0, 70, 16)), keep_features=20)
    ref = one_shot(flatten(x).astype(np.float64))
    np.testing.assert_allclose(got["sigma"], ref["sigma"], rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(got["mu"], ref["mu"], rtol=1e-12)
    np.testing.assert_array_equal(got["features"], flatten(x)[:20])


def test_allgather_is_bit_exact_in_one_process():
    moments = stats.moments_of(np.random.default_rng(2).normal(size=(9, 3)))
    gathered = stats.allgather(moments)
    assert gathered.n == 9
    np.testing.assert_array_equal(gathered.m2, moments.m2)
    rows = np.random.default_rng(3).normal(size=(5, 2, 3))
    np.testing.assert_array_equal(features.allgather_rows(rows), rows)


def test_statistics_errors():
    with pytest.raises(ValueError, match="features"):
        stats.moments_of(np.zeros(5))
    with pytest.raises(ValueError, match="at least 2"):
        stats.finalize(stats.moments_of(np.zeros((1, 3))))
    with pytest.raises(ValueError, match="no batches"):
        stats.compute_statistics(lambda images: images, iter([]))


def test_stats_file_round_trip(tmp_path):
    x = np.random.default_rng(4).normal(size=(30, 5))
    got = {**one_shot(x), "features": x[:10]}
    meta = {"dataset": "digits", "dataset_version": "sklearn-1.5", "split": "train",
            "inception_weights_sha256": "ab" * 32, "image_size": 8}
    path = tmp_path / "stats.npz"
    stats_file.save_stats(path, got, meta)
    loaded = stats_file.load_stats(path)
    np.testing.assert_array_equal(loaded["sigma"], got["sigma"])
    np.testing.assert_array_equal(loaded["features"], x[:10].astype(np.float32))
    assert loaded["n"] == 30 and loaded["metadata"]["image_size"] == 8
    assert loaded["metadata"]["preprocessing"] == inception.PREPROCESSING
    assert loaded["sha256"] == stats_file.file_sha256(path)
    with pytest.raises(ValueError, match="split"):
        stats_file.save_stats(path, got, {k: v for k, v in meta.items() if k != "split"})
    with pytest.raises(FileNotFoundError, match="fid_stats"):
        stats_file.load_stats(tmp_path / "absent.npz")


def test_sharded_features_on_emulated_devices_equal_one_shot():
    """4 emulated CPU devices (own process): padded, sharded batches give the one-shot statistics."""
    script = textwrap.dedent("""
        import os
        os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
        import jax, jax.numpy as jnp, numpy as np
        from sdejax.evaluation import features, stats
        assert jax.device_count() == 4
        w = np.random.default_rng(0).normal(size=(48, 6)).astype(np.float32)
        apply_fn = lambda w, images: jnp.tanh(images.reshape(len(images), -1) @ w)
        x = np.random.default_rng(1).random((27, 4, 4, 3)).astype(np.float32)
        fn = features.sharded_feature_fn(apply_fn, w, batch_size=8)
        got = stats.compute_statistics(fn, (x[i:i + 8] for i in range(0, 27, 8)), keep_features=27)
        kept = got["features"].astype(np.float64)  # the sharded features, all 27 rows
        unsharded = np.asarray(jax.jit(apply_fn)(w, x))
        print(np.abs(kept - unsharded).max(), np.abs(got["mu"] - kept.mean(0)).max(),
              np.abs(got["sigma"] - np.cov(kept, rowvar=False)).max(), got["n"])
    """)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    rows, mu, sigma, n = result.stdout.split()
    assert int(n) == 27 and float(rows) < 1e-5  # float32 rounding of other matmul shapes
    assert float(mu) < 1e-14 and float(sigma) < 1e-14
