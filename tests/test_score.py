"""Parameterisation conversions, and get_score_fn against the original's labels and scores."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdejax.precond import Precond
from sdejax.score import PREDICTIONS, convert, get_score_fn
from sdejax.sde import VESDE, VPSDE, get_sde, subVPSDE

MODEL_FIXTURES = ["model_ddpmpp_vp", "model_ddpm_vp", "model_ncsnv2_ve", "model_ncsnpp_ve_cifar",
                  "model_ncsnpp_ve_outputskip", "model_ddpmpp_subvp"]


@pytest.mark.parametrize("alpha_sigma", [(1.0, 3.0), (0.6, 0.8), (0.9, 0.19)], ids=["ve", "vp", "subvp"])
def test_conversions_are_consistent(alpha_sigma):
    """x_t = α x0 + σ ε; score = −ε/σ; v = α ε − σ x0: every pair of kinds converts exactly."""
    with jax.enable_x64(True):
        k0, k1 = jax.random.split(jax.random.PRNGKey(0))
        x0 = jax.random.normal(k0, (3, 4, 2))
        eps = jax.random.normal(k1, (3, 4, 2))
        alpha, sigma = (jnp.full((3,), v, jnp.float64) for v in alpha_sigma)
        a, s = alpha_sigma
        x = a * x0 + s * eps
        truth = {"score": -eps / s, "eps": eps, "x0": x0, "v": a * eps - s * x0}
        for src in PREDICTIONS:
            for dst in PREDICTIONS:
                np.testing.assert_allclose(convert(truth[src], src, dst, x, alpha, sigma), truth[dst],
                                           rtol=1e-10, atol=1e-12, err_msg=f"{src}->{dst}")


def _fixture(fixtures_dir, name):
    ref = np.load(fixtures_dir / "reference" / f"{name}.npz")
    meta = json.loads((fixtures_dir / "reference" / f"{name}.json").read_text())
    sde = get_sde(meta["sde"]["class"], **meta["sde"]["kwargs"])
    return ref, sde


@pytest.mark.parametrize("name", MODEL_FIXTURES)
def test_labels_and_scores_match_reference(fixtures_dir, name):
    """With a stand-in network that returns the reference's raw output, get_score_fn feeds the
    reference's labels and returns the reference's score on every path it recorded."""
    ref, sde = _fixture(fixtures_dir, name)
    t = jnp.asarray(ref["input/t"])
    x = jnp.asarray(ref["input/x"]).transpose(0, 2, 3, 1)
    for path in ("continuous", "discrete"):
        if f"output/score_{path}" not in ref.files:
            continue
        continuous = path == "continuous"
        seen = {}

        def apply_fn(params, x, labels, *, train=False, rng=None):
            seen["labels"] = labels
            return jnp.asarray(ref[f"output/model_{path}"]).transpose(0, 2, 3, 1)

        score = get_score_fn(sde, apply_fn, None, continuous=continuous)(x, t)
        expected_labels = ref[f"input/labels_{path}"]
        np.testing.assert_allclose(seen["labels"], expected_labels, rtol=1e-6)
        if expected_labels.dtype.kind == "i":
            assert jnp.issubdtype(seen["labels"].dtype, jnp.integer)
        expected = ref[f"output/score_{path}"].transpose(0, 2, 3, 1)
        assert np.max(np.abs(score - expected)) <= 1e-6 * np.max(np.abs(expected)), path


def test_discrete_subvp_is_an_error():
    with pytest.raises(ValueError, match="continuous=True"):
        get_score_fn(subVPSDE(), lambda p, x, l, **k: x, None, continuous=False)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="valid"):
        get_score_fn(VPSDE(), lambda p, x, l, **k: x, None, prediction="noise")
    score_fn = get_score_fn(VESDE(), lambda p, x, l, **k: x, None)
    with pytest.raises(ValueError, match=r"t must have shape \(batch,\)"):
        score_fn(jnp.zeros((2, 3)), jnp.zeros(()))


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_every_prediction_recovers_an_exact_score(prediction):
    """A network that outputs the exact score expressed as `prediction` gives back that score."""
    sde = VPSDE()
    t = jnp.array([0.1, 0.5, 0.9])
    x = jnp.array([[0.3, -1.0], [2.0, 0.5], [-0.7, 0.1]])
    true_score = lambda x, t: -x  # N(0, I) data is N(0, I) at every t under VP

    def apply_fn(params, x, labels, *, train=False, rng=None):
        alpha, sigma = sde.marginal_coeffs(labels / 999.0)
        return convert(true_score(x, t), "score", prediction, x, alpha, sigma)

    score = get_score_fn(sde, apply_fn, None, prediction=prediction)(x, t)
    np.testing.assert_allclose(score, -x, rtol=1e-5, atol=1e-6)


def test_discrete_vp_labels_use_ddpm_table():
    sde = VPSDE(N=1000)
    t = jnp.array([0.25, 0.5])
    labels, alpha, sigma = sde.default_precond(continuous=False).inputs(sde, t)
    assert sde.default_precond(False) == Precond.score_sde_vp(False)
    idx = (np.asarray(t) * 999).astype(int)
    np.testing.assert_allclose(sigma, np.sqrt(1 - sde.alphas_cumprod[idx]), rtol=1e-6)
    np.testing.assert_allclose(alpha**2 + sigma**2, 1.0, rtol=1e-6)
