"""Preconditioning: EDM's scalings for any (α, σ), score_sde's conventions, and a user-defined schedule."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdejax.analytic import GaussianMixture
from sdejax.precond import LABELS, Precond, edm_weight
from sdejax.score import get_score_fn
from sdejax.sde import EDMSDE, VESDE, VPSDE, CosineVPSDE, subVPSDE
from user_schedule import UserCosine


def _edm_gaussian(sde, sigma_data=0.5, d=3):
    return GaussianMixture.create(weights=[1.0], means=[np.zeros(d)], covs=[sigma_data**2 * np.eye(d)])


@pytest.mark.parametrize("sde", [EDMSDE(), VPSDE(), CosineVPSDE()], ids=["edm", "vp", "cosine"])
def test_edm_scalings_for_any_alpha(sde):
    """For data of variance σ_d²: Var(c_in x_t) = 1 and Var(F target) = 1 at every t; λ(σ̃) c_out² = 1;
    and for isotropic N(0, σ_d² I) data the optimal F is 0 (D* = c_skip x_t), i.e. a network F ≡ 0
    gives the exact score. All exact identities, checked to float32 rounding."""
    pre, sd = Precond.edm(0.5), 0.5
    t = jnp.linspace(sde.t_min + 0.02 * (sde.T - sde.t_min), sde.T, 6)
    alpha, sigma = sde.marginal_coeffs(t)
    c_in, c_skip, c_out = pre.scalings(alpha, sigma)
    np.testing.assert_allclose(c_in**2 * (alpha**2 * sd**2 + sigma**2), 1.0, rtol=1e-5)
    # F target = (x0 − c_skip x_t)/c_out with x_t = α x0 + σ z: Var = ((1 − c_skip α)² σ_d² + c_skip² σ²)/c_out².
    np.testing.assert_allclose(((1 - c_skip * alpha) ** 2 * sd**2 + c_skip**2 * sigma**2) / c_out**2, 1.0, rtol=1e-5)
    np.testing.assert_allclose(edm_weight(sigma / alpha, sd) * c_out**2, 1.0, rtol=1e-5)
    x = jax.random.normal(jax.random.PRNGKey(0), (6, 3))
    score = get_score_fn(sde, lambda p, x, labels, **k: jnp.zeros_like(x), None, precond=pre)(x, t)
    np.testing.assert_allclose(score, _edm_gaussian(sde).score_fn(sde)(x, t), rtol=2e-5, atol=1e-6)


def test_edm_labels_and_the_default_of_each_schedule():
    sde, t = EDMSDE(), jnp.array([0.002, 1.0, 80.0])
    labels, _, _ = Precond.edm().inputs(sde, t)
    np.testing.assert_allclose(labels, 0.25 * np.log(np.asarray(t)), rtol=1e-6)
    assert EDMSDE().default_precond() == Precond.edm(0.5)
    assert VESDE().default_precond(False) == Precond("score", "smld_index")
    assert subVPSDE().default_precond() == Precond("eps", "time")
    with pytest.raises(ValueError, match="continuous=True"):
        subVPSDE().default_precond(False)
    with pytest.raises(ValueError, match="valid"):
        Precond("eps", "timestep")
    with pytest.raises(ValueError, match="sigma_data"):
        Precond("eps", "edm", 0.5)


@pytest.mark.parametrize("prediction", ["score", "eps", "x0", "v"])
def test_user_schedule_gets_a_score_function(prediction):
    """A new SDE subclass gets a score function without registering anything: the exact network (the
    Gaussian's exact prediction, of any kind) gives the exact score. (Its DSM loss: test_losses.)"""
    sde = UserCosine()
    data = GaussianMixture.create(weights=[1.0], means=[np.array([0.5, -1.0])], covs=[np.diag([0.3, 2.0])])
    exact = data.score_fn(sde)
    from sdejax.score import convert

    def apply_fn(params, x, labels, train=False, rng=None):
        t = labels / 999.0
        alpha, sigma = sde.marginal_coeffs(t)
        return params * convert(exact(x, t), "score", prediction, x, alpha, sigma)

    x, t = jax.random.normal(jax.random.PRNGKey(1), (5, 2)), jnp.linspace(0.1, 0.9, 5)
    np.testing.assert_allclose(get_score_fn(sde, apply_fn, 1.0, prediction=prediction)(x, t), exact(x, t),
                               rtol=1e-4, atol=1e-5)


def test_score_fn_is_a_pytree_that_compiles_once():
    """get_score_fn returns a Partial whose leaves are the parameters: new params reuse the program."""
    sde, traces = VPSDE(), []

    def apply_fn(params, x, labels, train=False, rng=None):
        return params * x

    @jax.jit
    def run(score_fn, x, t):
        traces.append(1)
        return score_fn(x, t)

    x, t = jnp.ones((2, 3)), jnp.array([0.3, 0.6])
    for p in (1.0, 2.0, 3.0):
        out = run(get_score_fn(sde, apply_fn, jnp.asarray(p)), x, t)
        np.testing.assert_allclose(out, -p * x / sde.marginal_coeffs(t)[1][:, None], rtol=1e-6)
    assert len(traces) == 1
    assert set(LABELS) >= {"time", "sigma", "smld_index", "ddpm_index", "chain_time", "edm"}
    assert dataclasses.replace(Precond.plain("v"), output="x0") == Precond.plain("x0")


@pytest.mark.parametrize("method,options", [("dpm_solver", {"num_steps": 6, "order": 3}), ("heun", {"num_steps": 4}),
                                            ("unipc", {"num_steps": 5}), ("ddim", {"num_steps": 5})])
def test_user_schedule_runs_through_the_samplers(method, options):
    """The 12-line user schedule samples point-mass data (the score of δ_μ under any linear schedule is
    −(x − α μ)/σ², so x̂₀ ≡ μ) exactly with every fast solver: the output is μ to float32 rounding
    (every step is a convex combination of x and x̂₀ = μ, ending with x̂₀)."""
    from sdejax.sampling import methods

    sde, mu = UserCosine(), jnp.array([0.7, -1.3])

    def score_fn(x, t):
        alpha, sigma = (v[:, None] for v in sde.marginal_coeffs(t))
        return -(x - alpha * mu) / sigma**2

    x, nfe = methods.sample(method, jax.random.PRNGKey(0), sde, score_fn, (8, 2), **options)
    np.testing.assert_allclose(x, np.broadcast_to(mu, (8, 2)), rtol=1e-5, atol=1e-5)
    assert nfe > 0
