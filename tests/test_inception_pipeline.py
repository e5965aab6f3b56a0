"""Reference statistics and sample evaluation through the (synthetic-weight) FID Inception."""
import jax
import numpy as np
import pytest

from inception_helper import fixture_variables
from sdejax.evaluation import evaluate, inception, stats, stats_file

BATCH = 4


@pytest.fixture(scope="module")
def variables(fixtures_dir):
    return fixture_variables(fixtures_dir / "inception_fid" / "params_spec.json")


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(5).random((7, 32, 32, 3)).astype(np.float32)


def batches(images):
    return (images[i:i + BATCH] for i in range(0, len(images), BATCH))


@pytest.fixture(scope="module")
def reference(variables, images, tmp_path_factory):
    got = stats.compute_statistics(variables, batches(images), batch_size=BATCH, keep_features=7)
    path = tmp_path_factory.mktemp("stats") / "ref.npz"
    stats_file.save_stats(path, got, {"dataset": "noise", "dataset_version": "0", "split": "train",
                                      "inception_weights_sha256": inception.weights_sha256(variables)})
    return got, path


def test_statistics_of_inception_features(variables, images, reference):
    got, _ = reference
    pool3 = np.asarray(jax.jit(inception.apply)(variables, images)["pool3"], np.float64)
    assert got["n"] == 7 and got["mu"].shape == (2048,) and got["sigma"].shape == (2048, 2048)
    np.testing.assert_allclose(got["features"], pool3, rtol=0, atol=1e-5)
    feats = got["features"].astype(np.float64)
    np.testing.assert_allclose(got["mu"], feats.mean(0), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(got["sigma"], np.cov(feats, rowvar=False), rtol=1e-9, atol=1e-15)


def test_evaluate_samples_against_itself(variables, images, reference):
    _, path = reference
    result = evaluate.evaluate_samples(variables, batches(images), path, batch_size=BATCH, splits=1,
                                       metadata={"sampler": "none", "seed": 0})
    assert abs(result["fid"]) < 1e-9 and abs(result["kid"]) < 1e-6
    assert result["inception_score"] == pytest.approx(1.0, abs=1e-3)  # synthetic net: near-uniform p(y|x)
    assert result["n_samples"] == 7 and result["kid_samples"] == 7 and result["sampler"] == "none"
    assert not result["comparable_to_literature"]
    assert result["reference"]["sha256"] == stats_file.file_sha256(path)
    assert result["reference"]["dataset"] == "noise"
    assert result["inception_weights_sha256"] == inception.weights_sha256(variables)


def test_evaluate_refuses_other_weights(variables, images, reference):
    _, path = reference
    other = jax.tree.map(lambda a: a * 1.0, variables)
    other["params"]["fc"]["bias"] = other["params"]["fc"]["bias"] + 1
    with pytest.raises(ValueError, match="Inception weights"):
        evaluate.evaluate_samples(other, batches(images), path)
