"""The FID workflow (`--mode=fid_stats` / `--mode=eval`) on the offline digits with synthetic Inception weights.

One Inception program is compiled (global batch 8, 16x16 inputs resized to 299) and reused by every test.
"""
import json
import math

import jax
import ml_collections
import numpy as np
import pytest
import threadpoolctl

from inception_helper import fixture_variables, regenerate_state_dict
from sdejax.data import datasets, digits
from sdejax.data.pipeline import Pipeline
from sdejax.evaluation import inception, inception_weights, metrics, workflow
from sdejax.evaluation.features import inception_feature_fn

BATCH = 8
NUM_REF = 16


@pytest.fixture(scope="module", autouse=True)
def one_blas_thread():
    """The float64 eigh at d = 2048 (FID) is several times slower with OpenBLAS's spinning threads on a
    shared 2-core machine; one thread keeps this module's wall time predictable."""
    with threadpoolctl.threadpool_limits(1, user_api="blas"):
        yield


@pytest.fixture(scope="module")
def weights(fixtures_dir, tmp_path_factory):
    """Synthetic weights (the fixture's recipe) and a copy with another fc bias, as .npz weight files."""
    state = regenerate_state_dict(fixtures_dir / "inception_fid" / "params_spec.json")
    root = tmp_path_factory.mktemp("weights")
    inception_weights.save_state_dict(state, root / "synthetic.npz")
    inception_weights.save_state_dict({**state, "fc.bias": state["fc.bias"] + 1}, root / "other.npz")
    return {"path": root / "synthetic.npz", "other": root / "other.npz",
            "variables": fixture_variables(fixtures_dir / "inception_fid" / "params_spec.json")}


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("data")
    digits.prepare_digits(str(data_dir))
    config = ml_collections.ConfigDict()
    config.data = ml_collections.ConfigDict(dict(
        dataset="DIGITS", image_size=16, num_channels=1, centered=True, data_dir=str(data_dir)))
    config.eval = ml_collections.ConfigDict(dict(
        batch_size=BATCH, fid_num_samples=NUM_REF, kid_features=NUM_REF))
    return config


@pytest.fixture(scope="module")
def reference(config, weights, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("workdir")
    return workdir, workflow.fid_stats(config, workdir, weights_path=weights["path"])


@pytest.fixture(scope="module")
def features(weights):
    """The compiled Inception program the workflow itself uses (same global batch)."""
    return inception_feature_fn(weights["variables"], BATCH)


def rgb(images):
    return np.repeat(images, 3, axis=-1)


def pipeline_rows(config, limit, index=0, count=1):
    """Process ``index`` of ``count``'s batches of the train split in file order (TFDS's, not sklearn's)."""
    opts = Pipeline(batch_size=BATCH, image_size=16, shuffle=False, num_epochs=1, drop_remainder=False,
                    process_index=index, process_count=count)
    return list(workflow._local_batches(datasets.get_iterator(config, "train", opts), opts, limit))


@pytest.fixture(scope="module")
def train_rows(config):
    """The first 16 train digits in file order as RGB in [0, 1]; each is some k / 16 of sklearn's digits."""
    rows = np.concatenate(pipeline_rows(config, NUM_REF))
    assert rows.shape == (NUM_REF, 16, 16, 3) and set(np.unique(rows * 16)) <= set(range(17))
    return rows


def test_fid_stats_file_and_metadata(reference, weights, features, train_rows):
    workdir, meta = reference
    path = workdir / "fid_stats" / "digits_train.npz"
    assert meta["path"] == str(path) and path.is_file()
    assert meta["sha256"] == workflow.stats_file.file_sha256(path)
    expected = {"dataset": "DIGITS", "source": "tfds:sklearn_digits", "dataset_version": "1.0.0",
                "split": "train", "image_size": 16, "num_channels": 1, "n": NUM_REF, "fid_num_samples": NUM_REF,
                "complete_split": False, "kid_features": NUM_REF, "process_count": 1,
                "inception_weights_sha256": inception.weights_sha256(weights["variables"]),
                "inception_weights_file": str(weights["path"]), "inception_weights_source_sha256": None,
                "inception_weights_standard": False}
    assert {k: meta[k] for k in expected} == expected
    assert "grayscale tiled to RGB" in meta["preprocessing"] and "no dequantisation" in meta["preprocessing"]
    saved = workflow.stats_file.load_stats(path)
    assert saved["metadata"] == {k: v for k, v in meta.items() if k not in ("path", "sha256")}
    # The same compiled program on the same inputs gives bitwise the same pool3 rows; mu and sigma are
    # their float64 moments (rounding ~1e-16).
    pool3 = np.concatenate([features(train_rows[i:i + BATCH])["pool3"] for i in range(0, NUM_REF, BATCH)])
    np.testing.assert_array_equal(saved["features"], pool3)
    np.testing.assert_allclose(saved["mu"], pool3.astype(np.float64).mean(0), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(saved["sigma"], np.cov(pool3.astype(np.float64), rowvar=False),
                               rtol=1e-9, atol=1e-15)


def test_process_slices_cover_the_limited_split(config, train_rows):
    """Two processes' rows (global batch 8, local 4) are together exactly the first 13 rows, none twice."""
    p0, p1 = pipeline_rows(config, 13, 0, 2), pipeline_rows(config, 13, 1, 2)
    assert [len(b) for b in p0] == [4, 4] and [len(b) for b in p1] == [4, 1]
    np.testing.assert_array_equal(np.concatenate([p0[0], p1[0], p0[1], p1[1]]), train_rows[:13])
    # The whole split (1,497 = 187 x 8 + 1): process 1 runs out one batch early; the workflow then feeds
    # it empty batches (still joining the collective Inception call) until process 0 is done too.
    whole = [pipeline_rows(config, None, i, 2) for i in range(2)]
    assert [sum(map(len, rows)) for rows in whole] == [749, 748] and [len(r) for r in whole] == [188, 187]


def test_empty_batches_join_the_collective(features):
    out = features(np.zeros((0, 16, 16, 3), np.float32))
    assert out["pool3"].shape == (0, 2048) and out["logits"].shape == (0, 1008)


def test_eval_real_versus_noise(config, reference, weights, features, train_rows):
    workdir, meta = reference
    train = train_rows[..., :1]
    calls = []

    def replay_train(rng, n):  # the reference images themselves, in the data range [-1, 1]
        start = len(calls) * n
        calls.append(rng)
        return train[start:start + n] * 2 - 1

    real = workflow.fid_eval(config, workdir, replay_train, num_samples=NUM_REF, seed=3, tag=100,
                             sampler_metadata={"name": "replay", "nfe": 0}, weights_path=weights["path"])

    def noise(rng, n):  # beyond the data range: the workflow clips to [0, 1] after (x + 1) / 2
        return jax.random.uniform(rng, (n, 16, 16, 1), minval=-1.5, maxval=1.5), 7

    fake = workflow.fid_eval(config, workdir, noise, num_samples=12, seed=3, tag="noise",
                             sampler_metadata={"name": "uniform", "settings": {"range": [-1.5, 1.5]}},
                             weights_path=weights["path"])

    # Rounding floor of the FID: tr((S1 S2)^1/2) is a sum of sqrt(eigenvalues) of S1^1/2 S2 S1^1/2; with
    # n = 16 << D = 2048 samples D - n + 1 of them are zero, computed as O(eps ||S1|| ||S2||) each, so
    # each adds up to sqrt(eps) (||S1|| + ||S2||) / 2: |error| <= D sqrt(eps) (tr S1 + tr S2).
    ref = workflow.stats_file.load_stats(meta["path"])
    floor = lambda sigma: 2048 * np.sqrt(np.finfo(np.float64).eps) * (np.trace(ref["sigma"]) + np.trace(sigma))
    # The reference images themselves: FID(S, S) = 0 up to that floor.
    assert abs(real["fid"]) < floor(ref["sigma"])
    # Noise: per-batch keys fold_in(PRNGKey(3), g), batches 8 + 4 (last trimmed), mapped by (x + 1) / 2
    # and clipped; its FID equals the one-shot float64 FID of the same features.
    x = np.concatenate([np.asarray(noise(jax.random.fold_in(jax.random.PRNGKey(3), g), BATCH)[0])
                        for g in range(2)])[:12]
    x = rgb(np.clip((x + 1) / 2, 0, 1))
    pool3 = np.concatenate([features(x[i:i + BATCH])["pool3"] for i in range(0, 12, BATCH)]).astype(np.float64)
    sigma = np.cov(pool3, rowvar=False)
    direct = metrics.frechet_distance(pool3.mean(0), sigma, ref["mu"], ref["sigma"])
    assert fake["fid"] == pytest.approx(direct, rel=0, abs=2 * floor(sigma))
    assert fake["fid"] > 100 * floor(sigma)  # noise is resolved far above the floor; digits are not
    # The samples' own statistics file: the same moments, their pool3 rows and logits, usable as a reference.
    saved = workflow.stats_file.load_stats(workdir / "eval" / "fid_noise_stats.npz")
    assert fake["samples_statistics"]["sha256"] == saved["sha256"] and saved["n"] == 12
    np.testing.assert_allclose(saved["mu"], pool3.mean(0), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(saved["sigma"], sigma, rtol=1e-9, atol=1e-15)
    np.testing.assert_array_equal(saved["features"], pool3.astype(np.float32))
    assert saved["logits"].shape == (12, 1008) and saved["metadata"]["seeds"] == fake["seeds"]

    for result, tag in ((real, 100), (fake, "noise")):
        recorded = json.loads((workdir / "eval" / f"fid_{tag}.json").read_text())
        assert result["path"] == str(workdir / "eval" / f"fid_{tag}.json")
        assert recorded["reference"]["sha256"] == meta["sha256"]
        assert recorded["inception_weights_sha256"] == meta["inception_weights_sha256"]
        assert recorded["seeds"]["seed"] == 3 and recorded["seeds"]["process_count"] == 1
        assert recorded["comparable_to_literature"] is False
        assert "fewer than 50000 samples" in recorded["not_comparable_because"]
        assert "reference is not the complete split" in recorded["not_comparable_because"]
        assert recorded["inception_weights_standard"] is False  # synthetic weights
        assert recorded["kid_std_error"] is None  # one KID block: no standard error (NaN is not JSON)
        assert math.isfinite(recorded["kid"]) and math.isfinite(recorded["inception_score"])
    assert real["n_samples"] == NUM_REF and len(calls) == 2
    assert fake["n_samples"] == 12 and fake["kid_samples"] == 12 and fake["seeds"]["num_batches"] == 2
    assert real["nfe"] == {"mean": 0.0, "min": 0.0, "max": 0.0, "source": "sampler_metadata"}
    assert fake["nfe"] == {"mean": 7.0, "min": 7.0, "max": 7.0, "source": "sample_fn"}
    assert fake["sampler"] == {"name": "uniform", "settings": {"range": [-1.5, 1.5]}}


def test_protocol_comparability(config):
    full = {"n_samples": 50_000, "inception_weights_standard": True,
            "reference": {"n": 50_000, "split": "train", "complete_split": True, "dataset": "DIGITS", "image_size": 16}}
    assert workflow._not_comparable(config, full) == []
    fewer = {**full, "n_samples": 49_999, "reference": {**full["reference"], "split": "test", "image_size": 32}}
    assert workflow._not_comparable(config, fewer) == [
        "fewer than 50000 samples", "reference is not the training split", "reference has another image size"]
    assert workflow._not_comparable(config, {**full, "inception_weights_standard": False}) == [
        f"Inception weights are not the standard {inception_weights.WEIGHTS_FILE}"]


def test_missing_weights_say_where_to_get_them(config, tmp_path, monkeypatch):
    monkeypatch.delenv(inception_weights.ENV_VAR, raising=False)
    with pytest.raises(FileNotFoundError, match=inception_weights.WEIGHTS_FILE):
        workflow.fid_stats(config, tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        workflow.fid_eval(config, tmp_path, None, num_samples=16, seed=0, sampler_metadata={"nfe": 1},
                          weights_path=tmp_path / "nowhere.npz")


def test_eval_refuses_statistics_of_other_weights(config, reference, weights):
    workdir, _ = reference

    def never(rng, n):
        raise AssertionError("sampling must not start")

    with pytest.raises(ValueError, match="Inception weights"):
        workflow.fid_eval(config, workdir, never, num_samples=16, seed=0, sampler_metadata={"nfe": 1},
                          weights_path=weights["other"])


def test_bad_arguments_are_named(config, tmp_path):
    bad = ml_collections.ConfigDict(config.to_dict())
    bad.eval.fid_split = "test"
    with pytest.raises(ValueError, match="fid_split"):
        workflow.fid_stats(bad, tmp_path)
    with pytest.raises(ValueError, match="num_samples"):
        workflow.fid_eval(config, tmp_path, None, num_samples=5, seed=0, sampler_metadata={"nfe": 1})
