"""FID / KID / Inception score against the fid_math fixture and closed forms."""
import json

import numpy as np
import pytest
import scipy.linalg

from sdejax.evaluation import metrics, stats


@pytest.fixture(scope="module")
def fid_math(fixtures_dir):
    folder = fixtures_dir / "inception_fid"
    with np.load(folder / "fid_math.npz") as data:
        arrays = {k: data[k] for k in data.files}
    return arrays, json.loads((folder / "fid_math.json").read_text())["results"]


def test_frechet_distance_matches_fixture(fid_math):
    """sdejax's FID and trace term against the reference's arrays and its recorded results (both routes)."""
    a, results = fid_math
    fid = metrics.frechet_distance(a["mu1"], a["sigma1"], a["mu2"], a["sigma2"])
    trace = metrics.trace_sqrt_product(a["sigma1"], a["sigma2"])
    np.testing.assert_allclose(fid, a["fid"], rtol=1e-8)
    np.testing.assert_allclose(fid, results["fid"], rtol=1e-8)
    np.testing.assert_allclose(trace, np.trace(a["covmean"]), rtol=1e-8)
    np.testing.assert_allclose(trace, results["fid_terms"]["trace_sqrtm_sigma1_sigma2"], rtol=1e-8)
    np.testing.assert_allclose(trace, results["trace_sqrt_product_via_symmetric_eigh"], rtol=1e-8)


def test_streaming_statistics_match_fixture(fid_math):
    """sdejax's streaming moments (one batch, and three unequal batches merged) give the fixture's mu
    and sigma (divisor N - 1) of both feature sets; the FID from them is the fixture's."""
    a, results = fid_math
    got = {}
    for tag in ("1", "2"):
        x = a[f"x{tag}"]
        whole = stats.finalize(stats.moments_of(x))
        parts = [stats.moments_of(x[i:j]) for i, j in ((0, 7), (7, 300), (300, len(x)))]
        merged = stats.finalize(stats.merge(stats.merge(parts[0], parts[1]), parts[2]))
        for result in (whole, merged):
            assert result["n"] == len(x)
            np.testing.assert_allclose(result["mu"], a[f"mu{tag}"], rtol=1e-12, atol=1e-14)
            np.testing.assert_allclose(result["sigma"], a[f"sigma{tag}"], rtol=1e-10, atol=1e-13)
        got[tag] = merged
    fid = metrics.frechet_distance(got["1"]["mu"], got["1"]["sigma"], got["2"]["mu"], got["2"]["sigma"])
    np.testing.assert_allclose(fid, results["fid"], rtol=1e-8)


def test_frechet_distance_singular_covariances_match_sqrtm():
    """Fewer samples than features: the symmetric route stays real and equals sqrtm's trace."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(20, 32)), rng.normal(size=(25, 32)) + 0.3
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    ref = np.trace(scipy.linalg.sqrtm(s1 @ s2).real)
    np.testing.assert_allclose(metrics.trace_sqrt_product(s1, s2), ref, rtol=1e-6)
    # sqrt of the ~1e-15 rounding eigenvalues of the null space adds ~1e-7
    assert metrics.frechet_distance(x.mean(0), s1, x.mean(0), s1) == pytest.approx(0, abs=1e-5)


def test_kid_matches_fixture(fid_math):
    a, results = fid_math
    np.testing.assert_allclose(metrics.kid(a["x1"], a["x2"]), a["kid"], rtol=1e-8)
    blocked = results["kid_blocked_256"]
    values = metrics.kid_blocks(a["x1"], a["x2"], max_block_size=256)
    np.testing.assert_allclose(values, blocked["block_estimates"], rtol=1e-8)
    np.testing.assert_allclose(values.mean(), blocked["mean"], rtol=1e-8)
    np.testing.assert_allclose(metrics.kid_std_error(values), blocked["std_error"], rtol=1e-8)


def test_inception_score_closed_forms():
    n, classes = 200, 10
    confident = np.full((n, classes), -30.0)
    confident[np.arange(n), np.arange(n) % classes] = 30.0  # every split sees all classes equally
    mean, std = metrics.inception_score(confident, splits=10)
    assert mean == pytest.approx(classes, rel=1e-9) and std == pytest.approx(0, abs=1e-9)
    assert metrics.inception_score(np.zeros((n, classes)), splits=4) == pytest.approx((1.0, 0.0))


def test_inception_score_matches_direct_formula():
    logits = np.random.default_rng(1).normal(size=(103, 7)) * 3
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    scores = []
    for i in range(3):
        part = p[i * 103 // 3:(i + 1) * 103 // 3]
        scores.append(np.exp((part * (np.log(part) - np.log(part.mean(0)))).sum(1).mean()))
    np.testing.assert_allclose(metrics.inception_score(logits, splits=3), (np.mean(scores), np.std(scores)),
                               rtol=1e-10)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="sigma2"):
        metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))
    with pytest.raises(ValueError, match="features2"):
        metrics.kid(np.zeros((10, 3)), np.zeros(10))
    with pytest.raises(ValueError, match="logits"):
        metrics.inception_score(np.zeros((10, 3), np.int32))
    with pytest.raises(ValueError, match="splits"):
        metrics.inception_score(np.zeros((5, 3)), splits=10)
