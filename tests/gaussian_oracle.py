"""Closed-form Gaussian oracles shared by the sampler tests (a module, so test files never import each
other): exact scores, a self-counting score, the denoised target and the moment check.

Oracle. Data N(μ, Σ) (non-diagonal Σ), exact score (`gaussian_score`). With `denoise=True` the
sampler's ideal output is Tweedie's x̂_0(x_eps), x_eps ~ p_eps = N(α μ, C), C = α²Σ + σ²I at t = eps:
mean μ and covariance (C − 2σ²I + σ⁴C⁻¹)/α² (`denoised_target`).

Tolerance (`assert_moments`, entrywise for the mean and covariance). A first-order sampler's
statistic with N steps is m_N = m + c/N + O(1/N²). Halving every step (N → 2N grid points; for
correctors ε ∝ snr², so snr → snr/√2; corrector-only runs keep snr and n_steps: there the error is the
lag of the chain behind the moving target, ∝ 1/N) gives the Richardson extrapolation
E = 2 m_2N − m_N = m + O(1/N²), which must match the target within
    4 Monte-Carlo standard errors of E (from the paired per-example terms 2 f(x_2N,i) − f(x_N,i): the
    two runs share the prior draw, which makes deterministic samplers' pairs nearly identical, so
    SE(E) ≈ SE(m_N) there and ≤ √5 SE(m_N) for independent noise; `richardson_moments`)
  + the prior mismatch: started from N(0, prior_std² I) instead of p_T, the exact reverse process ends
    with mean error K α_T μ and covariance error K (prior_std² I − C_T) Kᵀ, K = α_T Σ C_T⁻¹ (x_0 | x_T is
    Gaussian with mean μ + K(x_T − α_T μ)); ≤ 1e-3 here (σ_max = 20 for VE, α_T ≈ 7e-3 for VP/sub-VP).
    It does not depend on N, so E carries it unchanged.
  + for the `langevin` corrector only, twice the bias bound D of its per-example step (see
    `langevin_allowance`; it does not vanish with the step: if both runs' biases lie between 0 and D,
    2 b_2N − b_N lies between −D and 2D).
The N-step run itself is then allowed its estimated bias b = m_N − E = 2(m_N − m_2N) (printed) on top
of 4 of its own standard errors and the same extra terms. Unlike the earlier allowance
(4 SE + 2|m_N − m_2N|, which grows with the sampler's own error), a sampler that converges to a wrong
law fails the check on E however large its step-dependence.

The exact scores here (`gaussian_score`, `isotropic_mixture_score`) do their linear algebra on the host.
`GaussianMixture.marginal_score` differentiates a Cholesky-based density: four batched LAPACK calls
per evaluation that XLA:CPU may run concurrently, which deadlocks its intra-op thread pool on 2 cores
(observed in these PC runs).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from sdejax.sde import VESDE, VPSDE, subVPSDE

EPS = 1e-3
SDES = {
    "ve": lambda n: VESDE(sigma_min=0.01, sigma_max=20.0, N=n),
    "vp": lambda n: VPSDE(beta_min=0.1, beta_max=20.0, N=n),
    "subvp": lambda n: subVPSDE(beta_min=0.1, beta_max=20.0, N=n),
}


def make_gaussian(d: int):
    """N(μ, Σ) in R^d with correlated Σ (eigenvalues in [0.3, 2])."""
    rs = np.random.RandomState(d)
    q, _ = np.linalg.qr(rs.randn(d, d))
    sigma = q @ np.diag(np.linspace(0.3, 2.0, d)) @ q.T
    mu = rs.uniform(-0.5, 0.5, d)
    return mu, sigma


GAUSSIANS = {d: make_gaussian(d) for d in (2, 8)}


# --- score function that counts its own evaluations ------------------------------------------
CALLS = [0]


def _tick():
    CALLS[0] += 1


def _counted(score, x, t):
    jax.debug.callback(_tick)
    return score(x, t)


def _gaussian_score(sde, mu, lam, u, x, t):
    alpha, sigma = sde.marginal_coeffs(t)
    z = (x - alpha[:, None] * mu) @ u
    return -(z / (alpha[:, None] ** 2 * lam + sigma[:, None] ** 2)) @ u.T


def gaussian_score(sde, mu, sigma, dtype=jnp.float32) -> Partial:
    """The exact score of N(mu, sigma) under `sde`: with sigma = U diag(λ) Uᵀ (eigh on the host),
    C_t = α_t² sigma + σ_t² I = U diag(α_t² λ + σ_t²) Uᵀ and s(x, t) = −C_t⁻¹ (x − α_t mu)."""
    lam, u = np.linalg.eigh(np.asarray(sigma, np.float64))
    return Partial(_gaussian_score, sde, *(jnp.asarray(v, dtype) for v in (mu, lam, u)))


def _isotropic_mixture_score(sde, log_w, means, x, t):
    alpha, sigma = sde.marginal_coeffs(t)
    var = (alpha**2 + sigma**2)[:, None, None]
    diff = alpha[:, None, None] * means[None] - x[:, None, :]  # (B, K, d)
    resp = jax.nn.softmax(log_w - 0.5 * jnp.sum(diff**2, axis=-1) / var[..., 0], axis=-1)
    return jnp.sum(resp[..., None] * diff / var, axis=1)


def isotropic_mixture_score(sde, weights, means) -> Partial:
    """The exact score of Σ_k w_k N(μ_k, I): p_t = Σ_k w_k N(α μ_k, (α² + σ²) I), so
    s = Σ_k r_k(x) (α μ_k − x)/(α² + σ²) with r = softmax_k(log w_k − |x − α μ_k|²/(2(α² + σ²)))."""
    return Partial(_isotropic_mixture_score, sde, jnp.log(jnp.asarray(weights, jnp.float32)),
                   jnp.asarray(means, jnp.float32))


def counted_score(sde, d: int) -> Partial:
    """Exact score of GAUSSIANS[d] under `sde`, incrementing CALLS at every evaluation."""
    return Partial(_counted, gaussian_score(sde, *GAUSSIANS[d]))


def run_counted(sampler, *args, **kwargs):
    """Run a sampler, returning (samples as numpy, nfe reported, score calls counted)."""
    CALLS[0] = 0
    x, nfe = sampler(*args, **kwargs)
    x = np.asarray(jax.block_until_ready(x))
    jax.effects_barrier()
    return x, nfe, CALLS[0]


# --- oracle -----------------------------------------------------------------------------------
def coeffs(sde, t: float):
    alpha, sigma = sde.marginal_coeffs(jnp.array([t], jnp.float32))
    return float(alpha[0]), float(sigma[0])


def denoised_target(sde, d: int):
    """Mean and covariance of x̂_0(x_eps) = (x + σ² s(x))/α for x ~ p_eps (module docstring)."""
    mu, sig = GAUSSIANS[d]
    a, s = coeffs(sde, EPS)
    c = a**2 * sig + s**2 * np.eye(d)
    return mu, (c - 2 * s**2 * np.eye(d) + s**4 * np.linalg.inv(c)) / a**2


def prior_mismatch(sde, d: int):
    """|mean| and |covariance| error of the exact reverse process started from the prior, not p_T."""
    mu, sig = GAUSSIANS[d]
    a, s = coeffs(sde, sde.T)
    c_t = a**2 * sig + s**2 * np.eye(d)
    k = a * sig @ np.linalg.inv(c_t)
    return np.abs(k @ (a * mu)), np.abs(k @ (sde.prior_std**2 * np.eye(d) - c_t) @ k.T)


def langevin_allowance(d: int):
    """Covariance bias allowed for the per-example `langevin` corrector on N(0, Σ) in R^d.

    Its step ε ∝ ‖z‖²/‖s(x)‖² depends on the example's own state and noise. In the small-step limit the
    chain x ← x + ε s + sqrt(2ε) z then has noise ∝ E[‖z‖² zzᵀ] = (d+2)I against drift ∝ E‖z‖² = d
    (temperature τ = (d+2)/d) and a state-dependent rate D(x) ∝ 1/‖s(x)‖², whose stationary law is
    p^{1/τ}(x)/D(x) ∝ N(x; 0, τΣ)·‖Σ⁻¹x‖², with covariance τ(Σ + 2I/tr(Σ⁻¹)). The sampler's output lies
    between the exact law and this stationary law, so |τ(Σ + 2I/tr Σ⁻¹) − Σ| bounds the bias
    (≈ (1 + 2/d)² − 1 relative: 56% at d = 8, infinite variance at d = 2, 0.1% for 32×32×3 images).
    The mean is unbiased (the law stays symmetric about the mean).
    """
    _, sig = GAUSSIANS[d]
    tau = (d + 2) / d
    return np.abs(tau * (sig + 2 * np.eye(d) / np.trace(np.linalg.inv(sig))) - sig)


def sample_moments(x: np.ndarray):
    """Mean, covariance (divisor n − 1) and their standard errors (from the per-sample terms)."""
    x = np.asarray(x, np.float64)
    n = x.shape[0]
    m = x.mean(0)
    dev = x - m
    prods = dev[:, :, None] * dev[:, None, :] * (n / (n - 1))
    return m, prods.mean(0), x.std(0) / np.sqrt(n), prods.std(0) / np.sqrt(n)


def richardson_moments(x: np.ndarray, x_fine: np.ndarray, ratio: float = 2.0):
    """First-order Richardson extrapolation of the mean and covariance, with its standard errors.

    If a statistic's error is ∝ h (h: step, or tolerance) and `x_fine` ran with h/ratio, then
    E = (ratio·m_fine − m)/(ratio − 1) cancels the leading error (ratio 2: E = 2 m_2N − m_N). Row i of
    `x` and row i of `x_fine` are one pair (the same prior draw, and the same Brownian path where the
    sampler allows it), the pairs independent across i; so E is the mean of the per-pair terms
    e_i = w f(x_fine_i) − (w − 1) f(x_i), w = ratio/(ratio − 1), with f(x) = x for the mean and the
    centred product for the covariance (delta method), and SE(E) = std(e)/√n. Coupled pairs make
    SE(E) ≈ SE(m) (deterministic samplers); independent ones give √(w² + (w − 1)²)·SE (√5 at ratio 2).
    Returns (E_mean, E_cov, SE of E_mean, SE of E_cov).
    """
    x, x_fine = np.asarray(x, np.float64), np.asarray(x_fine, np.float64)
    if x.shape != x_fine.shape:
        raise ValueError(f"the two runs must be paired row by row; got shapes {x.shape} and {x_fine.shape}")
    n, w = x.shape[0], ratio / (ratio - 1.0)

    def centred_products(y):
        dev = y - y.mean(0)
        return dev[:, :, None] * dev[:, None, :] * (n / (n - 1))

    e_m = w * x_fine - (w - 1.0) * x
    e_c = w * centred_products(x_fine) - (w - 1.0) * centred_products(x)
    return e_m.mean(0), e_c.mean(0), e_m.std(0) / np.sqrt(n), e_c.std(0) / np.sqrt(n)


def assert_moments(x, x_fine, target_mean, target_cov, extra_mean=0.0, extra_cov=0.0, label="", ratio=2.0,
                   n_se=4.0):
    """Richardson check of a first-order sampler's mean and covariance (module docstring), entrywise:

    - the extrapolation E = (ratio·m_fine − m)/(ratio − 1) matches the target within n_se of its own
      Monte-Carlo standard errors (`richardson_moments`) plus `extra` (the prior mismatch and other
      biases that do not vanish with the step): |E − target| ≤ n_se·SE(E) + extra;
    - each run (`x`, then `x_fine`) is allowed its estimated bias b = m − E on top of its own
      Monte-Carlo error: |m − target| ≤ n_se·SE(m) + |b| + extra.
    Returns the bias estimates (b_mean, b_cov) of `x` (printed with the errors).
    """
    e_m, e_c, se_em, se_ec = richardson_moments(x, x_fine, ratio)
    checks = [("extrapolated mean", e_m, target_mean, n_se * se_em + extra_mean),
              ("extrapolated cov", e_c, target_cov, n_se * se_ec + extra_cov)]
    biases = []
    for run, y in (("run", x), ("fine run", x_fine)):
        assert np.all(np.isfinite(y)), f"{label}: {run} has non-finite samples"
        m, c, se_m, se_c = sample_moments(y)
        biases.append((m - e_m, c - e_c))
        checks += [(f"{run} mean", m, target_mean, n_se * se_m + np.abs(m - e_m) + extra_mean),
                   (f"{run} cov", c, target_cov, n_se * se_c + np.abs(c - e_c) + extra_cov)]
    (b_m, b_c), _ = biases
    worst = [float(np.max(np.abs(got - target) / tol)) for _, got, target, tol in checks]
    print(f"{label}: Richardson E: max |err| mean {np.abs(e_m - target_mean).max():.4f}, cov "
          f"{np.abs(e_c - target_cov).max():.4f} (max err/tol {worst[0]:.2f}, {worst[1]:.2f}; {n_se:g} SE(E) "
          f"mean {n_se * se_em.max():.4f}, cov {n_se * se_ec.max():.4f}); bias of the run b = m − E: "
          f"mean {np.abs(b_m).max():.4f}, cov {np.abs(b_c).max():.4f} (run max err/tol {worst[2]:.2f}, {worst[3]:.2f})")
    for name, got, target, tol in checks:
        assert np.all(np.abs(got - target) <= tol), f"{label}: {name} {got} vs {target}, tol {tol}"
    return b_m, b_c
