"""Sampler structure: grids, caller-owned x_T, trajectories and callbacks, callables, score_sde's
ending, Langevin's batch statistics, DDIM's options, the fixed-step ODE, eps checks, compile counts
and float64.

Oracles are exact identities or hand computations (numpy, float64 where the tolerance is tight):
- equal inputs and a deterministic sampler give bitwise-equal outputs (x_T owned by the caller);
- the trajectory is the loop's state: its last entry is the returned pre-denoise x;
- score_sde's PC loop re-implemented in numpy (its algorithm: linspace(T, eps, N); for each t a
  corrector, then a predictor returning (x, x_mean); output x_mean) with the same noise draws;
- one Langevin / DDIM / Euler step written out by hand.
Float64 runs compare with float64 references to 1e-10 relative: a single float32 rounding anywhere
on the path would show as ≥ 6e-8, so these tolerances prove the whole computation ran in float64.
"""
from __future__ import annotations

import functools
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.tree_util import Partial

from helpers import ROOT, subprocess_env
from sdejax import guidance
from sdejax.likelihood import log_likelihood
from sdejax.sampling import grids
from sdejax.sampling.ddim import ddim_sample
from sdejax.sampling.langevin import annealed_langevin_sample
from sdejax.sampling.ode import ode_encode, ode_sample
from sdejax.sampling.pc import EulerMaruyama, Langevin, pc_nfe, pc_sample
from sdejax.sampling.sde import sde_sample
from sdejax.sde import VESDE, VPSDE

MU = np.array([0.5, -1.0])
COV = np.array([[1.0, 0.6], [0.6, 0.8]])
VE, VP = VESDE(sigma_min=0.01, sigma_max=20.0, N=10), VPSDE(N=30)
TRACES = [0]  # trace-time calls of the score functions below


@functools.lru_cache(maxsize=None)
def gaussian_score(sde):
    """score(mu, lam, u, x, t) of data N(mu, cov), cov = u diag(lam) uᵀ, under `sde`:
    −u diag(1/(α_t² lam + σ_t²)) uᵀ (x − α_t mu) (no LAPACK in traced code: see test_sampling_pc).

    One function object per SDE, so `Partial(gaussian_score(sde), mu, lam, u)` with new arrays has
    the same tree structure; its body counts how often it is traced.
    """
    def score(mu, lam, u, x, t):
        TRACES[0] += 1
        alpha, sigma = sde.marginal_coeffs(t)
        z = (x - alpha[:, None] * mu) @ u
        return -(z / (alpha[:, None] ** 2 * lam + sigma[:, None] ** 2)) @ u.T

    return score


def score_of(sde, mu=MU, cov=COV, dtype=jnp.float32) -> Partial:
    lam, u = np.linalg.eigh(cov)
    return Partial(gaussian_score(sde), *(jnp.asarray(v, dtype) for v in (mu, lam, u)))


def np_coeffs(sde, t):
    """(α_t, σ_t) in float64 numpy, from the SDE's own schedule."""
    with jax.enable_x64(True):
        a, s = sde.marginal_coeffs(jnp.asarray(t, jnp.float64))
        return np.asarray(a), np.asarray(s)


def np_score(sde, x, t):
    """The exact score of N(MU, COV) in float64 numpy at a scalar time t."""
    a, s = (float(v[0]) for v in np_coeffs(sde, np.array([t])))
    c = a**2 * COV + s**2 * np.eye(2)
    return -np.linalg.solve(c, (x - a * MU).T).T


# --- x_T, trajectory, callback, callables ------------------------------------------------------
def test_x_T_is_owned_by_the_caller():
    """A deterministic sampler from a given x_T ignores rng (bitwise); without x_T the prior is drawn
    from the first half of split(rng), so passing that draw reproduces the default call bitwise."""
    score, x_T = score_of(VP), VP.prior_sampling(jax.random.PRNGKey(9), (16, 2))
    for sample in (lambda r, **k: ddim_sample(r, VP, score, (16, 2), 20, **k),
                   lambda r, **k: pc_sample(r, VP, score, (16, 2), "ancestral_sampling", "none", probability_flow=True, **k)):
        a, _ = sample(jax.random.PRNGKey(0), x_T=x_T)
        b, _ = sample(jax.random.PRNGKey(1), x_T=x_T)
        np.testing.assert_array_equal(a, b)
    rng = jax.random.PRNGKey(3)
    prior = VP.prior_sampling(jax.random.split(rng)[0], (16, 2))
    a, _ = pc_sample(rng, VP, score, (16, 2), "euler_maruyama", "langevin")
    b, _ = pc_sample(rng, VP, score, (16, 2), "euler_maruyama", "langevin", x_T=prior)
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="x_T must have shape"):
        pc_sample(rng, VP, score, (8, 2), x_T=prior)


@pytest.mark.parametrize("sampler", ["ddim", "pc"])
def test_trajectory_and_callback(sampler):
    """xs[k] is the state at ts[k + 1]; the last is the returned x (denoise=False); the callback sees
    (i, t_i, x_i) for i = 1 … n−1 in order, equal to the trajectory."""
    ts = grids.quadratic(VP, 12, eps=1e-3)
    seen = []
    callback = lambda i, t, x: seen.append((i, float(t), np.asarray(x)))
    kwargs = dict(ts=ts, denoise=False, trajectory=True, callback=callback)
    if sampler == "ddim":
        x, xs, nfe = ddim_sample(jax.random.PRNGKey(0), VP, score_of(VP), (8, 2), eta=1.0, **kwargs)
    else:
        x, xs, nfe = pc_sample(jax.random.PRNGKey(0), VP, score_of(VP), (8, 2), "euler_maruyama", "none", **kwargs)
    jax.effects_barrier()
    assert xs.shape == (11, 8, 2) and nfe == 11
    np.testing.assert_array_equal(xs[-1], x)
    assert [i for i, _, _ in seen] == list(range(1, 12))
    np.testing.assert_array_equal([t for _, t, _ in seen], ts[1:].astype(np.float32))
    np.testing.assert_array_equal(np.stack([v for _, _, v in seen]), xs)


def test_callable_predictor_and_corrector():
    """A hand-written Euler–Maruyama predictor (the formula, with the documented signature) gives the
    named one's result (same noise; float32 rounding of a reordered formula over 9 steps: 1e-5), and
    a callable's `nfe` attribute enters the count."""
    def my_em(rng, sde, score_fn, x, t, s):
        f, g = sde.sde(x, t)
        mean = x + (f - (g**2)[:, None] * score_fn(x, t)) * (s - t)[:, None]
        return mean + (g * jnp.sqrt(t - s))[:, None] * jax.random.normal(rng, x.shape, x.dtype), mean

    rng, score = jax.random.PRNGKey(4), score_of(VE)
    a, nfe_a = pc_sample(rng, VE, score, (32, 2), "euler_maruyama", "ald")
    b, nfe_b = pc_sample(rng, VE, score, (32, 2), my_em, "ald")
    c, _ = pc_sample(rng, VE, score, (32, 2), EulerMaruyama(), "ald")
    assert nfe_a == nfe_b == 9 + 10 + 1
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(c, a)

    class TwoMoves:
        nfe = 2

        def __call__(self, rng, sde, score_fn, x, t):
            move = Langevin(0.1, "sigma")
            return move(jax.random.fold_in(rng, 1), sde, score_fn, move(rng, sde, score_fn, x, t)[0], t)

    assert pc_nfe(10, "none", TwoMoves(), n_steps=3) == 10 * 3 * 2 + 1


# --- Langevin step size, score_sde's loop ----------------------------------------------------
@pytest.mark.parametrize("norm", ["per_example", "batch"])
def test_langevin_step_by_hand(norm):
    """One move x + ε s + sqrt(2ε) z with ε = 2 a (snr r)², a = 1 (VE), r = ‖z‖/‖s‖ per example or
    mean‖z‖/mean‖s‖ over the batch (score_sde), against numpy on the same z (float32: 1e-5)."""
    rng, x = jax.random.PRNGKey(5), jax.random.normal(jax.random.PRNGKey(6), (16, 2)) * 3
    t = jnp.full((16,), 0.4)
    out, mean = Langevin(0.16, norm)(rng, VE, score_of(VE), x, t)
    z, s, x = (np.asarray(v, np.float64) for v in (jax.random.normal(rng, x.shape), score_of(VE)(x, t), x))
    nz, ns = np.linalg.norm(z, axis=1), np.linalg.norm(s, axis=1)
    r = nz / ns if norm == "per_example" else np.full(16, nz.mean() / ns.mean())
    step = (2 * (0.16 * r) ** 2)[:, None]
    np.testing.assert_allclose(mean, x + step * s, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out, x + step * s + np.sqrt(2 * step) * z, rtol=1e-5, atol=1e-5)


def np_forward_sde(sde, x, t):
    """(f(x, t), g(t)) of the original's VE (σ(t) = σ_min (σ_max/σ_min)^t) and VP (β linear) SDEs."""
    if sde is VE:
        return 0.0 * x, VE.sigma_min * (VE.sigma_max / VE.sigma_min) ** t * np.sqrt(2 * np.log(VE.sigma_max / VE.sigma_min))
    beta = sde.beta_min + t * (sde.beta_max - sde.beta_min)
    return -0.5 * beta * x, np.sqrt(beta)


def score_sde_pc(sde, predictor, corrector, x, noise, snr, n_steps, eps):
    """score_sde's PC sampler (Song et al.'s `get_pc_sampler`) in float64 numpy, on Gaussian data.

    timesteps = linspace(T, eps, N); for each t: the corrector (x, x_mean), then the predictor
    (x, x_mean); output x_mean. `noise(i, part, j)` returns the z of step i ('c', j) or ('p', 0).
    """
    n = sde.N
    sigmas = np.exp(np.linspace(np.log(VE.sigma_min), np.log(VE.sigma_max), n))  # the SMLD table (VE)
    for i, t in enumerate(np.linspace(sde.T, eps, n)):
        for j in range(n_steps if corrector else 0):  # LangevinCorrector, alpha = 1 (VE)
            grad, z = np_score(sde, x, t), noise(i, "c", j)
            ratio = np.linalg.norm(z, axis=1).mean() / np.linalg.norm(grad, axis=1).mean()
            step = 2 * (snr * ratio) ** 2
            x_mean = x + step * grad
            x = x_mean + np.sqrt(2 * step) * z
        z = noise(i, "p", 0)
        if predictor == "reverse_diffusion":  # VE: f = 0, G = sqrt(σ_i² − σ_{i−1}²), i = int(t(N−1)/T)
            k = int(t * (n - 1) / sde.T)
            g2 = sigmas[k] ** 2 - (sigmas[k - 1] ** 2 if k > 0 else 0.0)
            x_mean = x + g2 * np_score(sde, x, t)
            x = x_mean + np.sqrt(g2) * z
        else:  # EulerMaruyamaPredictor: dt = −1/N, x_mean = x + (f − g² s) dt
            f, g = np_forward_sde(sde, x, t)
            x_mean = x + (f - g**2 * np_score(sde, x, t)) * (-1.0 / n)
            x = x_mean + g * np.sqrt(1.0 / n) * z
    return x_mean


@pytest.mark.parametrize("sde,predictor,corrector", [(VE, "reverse_diffusion", "langevin"),
                                                     (VE, "euler_maruyama", "langevin"),
                                                     (VP, "euler_maruyama", "none")])
def test_score_sde_ending_reproduces_the_original(sde, predictor, corrector):
    """ending="score_sde" (+ langevin_norm="batch") equals the numpy re-implementation of score_sde's
    loop to 1e-6 relative, in float64 with the sampler's own noise draws (documented key use: prior
    from split(rng)[0]; step i uses split(fold_in(rng_loop, i)) -> (corrector key, predictor key),
    corrector move j fold_in(corrector key, j)). Float64 rounding, amplified over ≤ 30 steps, stays
    far below 1e-6; a wrong step (dt, grid, index, mean vs sample, norm) is O(1/N) (measured: sdejax's
    ending 8e-3 on VP; per-example norms 1.4 on VE)."""
    snr, n_steps, eps, shape = 0.16, 2, 1e-3, (16, 2)
    rng = jax.random.PRNGKey(11)
    with jax.enable_x64(True):
        prior_rng, loop_rng = jax.random.split(rng)
        x_T = sde.prior_sampling(prior_rng, shape, jnp.float64)

        def noise(i, part, j):
            c_rng, p_rng = jax.random.split(jax.random.fold_in(loop_rng, i))
            key = jax.random.fold_in(c_rng, j) if part == "c" else p_rng
            return np.asarray(jax.random.normal(key, shape, jnp.float64))

        out, nfe = pc_sample(rng, sde, score_of(sde, dtype=jnp.float64), shape, predictor, corrector, snr=snr,
                             n_steps=n_steps, eps=eps, langevin_norm="batch", ending="score_sde", dtype=jnp.float64)
        assert out.dtype == jnp.float64
        ref = score_sde_pc(sde, predictor, corrector != "none", np.asarray(x_T), noise, snr, n_steps, eps)
    assert nfe == sde.N * (1 + n_steps * (corrector != "none"))
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())


MESH_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from sdejax.sampling.pc import pc_sample
    from sdejax.sde import VESDE
    from gaussian_oracle import gaussian_score
    assert jax.device_count() == 8 and jax.config.jax_enable_x64, jax.devices()
    sde = VESDE(sigma_min=0.01, sigma_max=20.0, N=10)
    score = gaussian_score(sde, [0.5, -1.0], np.eye(2), jnp.float64)
    sample = lambda x: pc_sample(jax.random.PRNGKey(2), sde, score, (64, 2), langevin_norm="batch", x_T=x)[0]
    x_T = sde.prior_sampling(jax.random.PRNGKey(1), (64, 2), jnp.float64)
    sharding = NamedSharding(Mesh(np.array(jax.devices()), ("batch",)), P("batch"))
    one = jax.jit(sample)(x_T)
    eight = jax.jit(sample, in_shardings=sharding, out_shardings=sharding)(x_T)
    assert one.dtype == jnp.float64 and len(eight.sharding.device_set) == 8
    print(float(jnp.max(jnp.abs(one - eight)) / jnp.max(jnp.abs(one))))
""")


def test_batch_langevin_is_global_over_a_mesh():
    """The batch statistic under jit over 8 emulated devices, batch sharded 8 ways, equals the one-
    device result (float64: the all-reduce's summation order changes the means by ~1e-16; a
    per-device mean over 8 of the 64 examples would change every step size by O(10%))."""
    out = subprocess.run([sys.executable, "-c", MESH_SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env=subprocess_env(XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_ENABLE_X64="1"))
    assert out.returncode == 0, out.stderr[-4000:]
    assert float(out.stdout.strip().splitlines()[-1]) < 1e-10


# --- DDIM options ------------------------------------------------------------------------------
def test_ddim_with_thresholded_score_by_hand():
    """One DDIM step (2-point grid, denoise=False returns x at t_1, NFE 1) on the score thresholded to
    x̂₀ ∈ [−0.2, 0.2] (`guidance.threshold`): α_s x̂₀ᶜ + k ε̂ + c z, k = sqrt(σ_s² − c²), with ε̂ =
    (x − α_t x̂₀ᶜ)/σ_t implied by the thresholded x̂₀. numpy float64 on the same z; float32 sampler: 1e-5."""
    ts, eta, rng = np.array([0.6, 0.3]), 0.5, jax.random.PRNGKey(8)
    x_T = 2.0 * jax.random.normal(jax.random.PRNGKey(7), (16, 2))
    x, nfe = ddim_sample(rng, VP, guidance.threshold(VP, score_of(VP), -0.2, 0.2), (16, 2), ts=ts, eta=eta, x_T=x_T,
                         denoise=False)
    assert nfe == 1
    z = np.asarray(jax.random.normal(jax.random.fold_in(jax.random.split(rng)[1], 0), (16, 2)), np.float64)
    (a_t, a_s), (s_t, s_s) = np_coeffs(VP, ts)
    xt = np.asarray(x_T, np.float64)
    score = np_score(VP, xt, ts[0])
    x0 = np.clip((xt + s_t**2 * score) / a_t, -0.2, 0.2)
    assert np.mean(np.abs(x0) == 0.2) > 0.25  # the threshold acts
    eps_hat = (xt - a_t * x0) / s_t
    c = eta * s_s * np.sqrt(1 - (a_t * s_s / (a_s * s_t)) ** 2)
    np.testing.assert_allclose(x, a_s * x0 + np.sqrt(s_s**2 - c**2) * eps_hat + c * z, rtol=1e-5, atol=1e-5)


# --- the fixed-step ODE ------------------------------------------------------------------------
def np_euler(sde, x, ts):
    """Euler on the probability-flow ODE dx/dt = −β(t)/2 (x + s) (VP) along ts, float64 numpy."""
    for t, t_next in zip(ts[:-1], ts[1:]):
        beta = sde.beta_min + t * (sde.beta_max - sde.beta_min)
        x = x + (t_next - t) * (-0.5 * beta * (x + np_score(sde, x, t)))
    return x


def test_ode_on_a_grid_is_euler_by_hand_and_counts_nfe():
    """ode_sample/ode_encode with ts and solver="euler" are Euler along the grid (and its reverse), as
    is PC's probability-flow Euler–Maruyama: all equal a numpy Euler in float64 to 1e-10 relative.
    NFE: Euler 1 per step, Heun 2 per step, Tsit5 (7 stages, FSAL) 6 per step + 1."""
    ts = grids.log_snr(VP, 9, eps=1e-2)
    with jax.enable_x64(True):
        score, z = score_of(VP, dtype=jnp.float64), VP.prior_sampling(jax.random.PRNGKey(0), (8, 2), jnp.float64)
        x, nfe = ode_sample(None, VP, score, (8, 2), solver="euler", z=z, ts=ts)
        x_pc, _ = pc_sample(jax.random.PRNGKey(1), VP, score, (8, 2), "euler_maruyama", "none", probability_flow=True, ts=ts,
                            x_T=z, denoise=False)
        back, nfe_back = ode_encode(VP, score, x, solver="euler", ts=ts)
        nfes = {name: int(ode_sample(None, VP, score, (8, 2), solver=name, z=z, ts=ts)[1])
                for name in ("heun", "tsit5")}
    assert x.dtype == back.dtype == jnp.float64
    ref = np_euler(VP, np.asarray(z), ts)
    for got, want in ((x, ref), (x_pc, ref), (back, np_euler(VP, np.asarray(x), ts[::-1]))):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-10, atol=1e-10 * np.abs(want).max())
    assert (int(nfe), int(nfe_back), nfes["heun"], nfes["tsit5"]) == (8, 8, 16, 6 * 8 + 1)
    with pytest.raises(ValueError, match="strictly decreasing"):
        ode_sample(None, VP, score_of(VP), (8, 2), z=jnp.zeros((8, 2)), ts=ts[::-1])


# --- eps range, compile counts -----------------------------------------------------------------
@pytest.mark.parametrize("call", [
    lambda s: ode_sample(jax.random.PRNGKey(0), VP, s, (2, 2), eps=1.5),
    lambda s: ode_encode(VP, s, jnp.zeros((2, 2)), eps=-0.1),
    lambda s: sde_sample(jax.random.PRNGKey(0), VP, s, (2, 2), eps=1.0),
    lambda s: log_likelihood(jax.random.PRNGKey(0), VP, s, jnp.zeros((2, 2)), eps=2.0),
    lambda s: pc_sample(jax.random.PRNGKey(0), VP, s, (2, 2), eps=1.5),
    lambda s: ddim_sample(jax.random.PRNGKey(0), VP, s, (2, 2), 10, eps=-1e-3),
], ids=["ode_sample", "ode_encode", "sde_sample", "log_likelihood", "pc_sample", "ddim_sample"])
def test_eps_outside_the_time_range_raises(call):
    with pytest.raises(ValueError, match=r"eps must lie in \[t_min, T\)"):
        call(score_of(VP))


SAMPLERS = {
    "pc": lambda s: pc_sample(jax.random.PRNGKey(0), VP, s, (4, 2), "reverse_diffusion", "langevin")[0],
    "ddim": lambda s: ddim_sample(jax.random.PRNGKey(0), VP, s, (4, 2), 10)[0],
    "ode": lambda s: ode_sample(jax.random.PRNGKey(0), VP, s, (4, 2), rtol=1e-3, atol=1e-3)[0],
    "ode_grid": lambda s: ode_sample(jax.random.PRNGKey(0), VP, s, (4, 2), ts=grids.uniform(VP, 5))[0],
    "ode_encode": lambda s: ode_encode(VP, s, jnp.ones((4, 2)), rtol=1e-3, atol=1e-3)[0],
    "sde": lambda s: sde_sample(jax.random.PRNGKey(0), VP, s, (4, 2), num_steps=10)[0],
    "likelihood": lambda s: log_likelihood(jax.random.PRNGKey(0), VP, s, jnp.ones((4, 2)), divergence="exact",
                                           rtol=1e-3, atol=1e-3)[0],
    "annealed_langevin": lambda s: annealed_langevin_sample(jax.random.PRNGKey(0), VE, s, (4, 2), 2, 1e-3)[0],
}


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_new_parameters_reuse_the_compiled_sampler(name):
    """score_fn = Partial(score, mu, cov) with three different (mu, cov): the score's Python body is
    traced during the first call only (a recompilation would trace it again), and the results differ."""
    sde = VE if name == "annealed_langevin" else VP
    outs, traces = [], []
    for k in range(3):
        before = TRACES[0]
        outs.append(np.asarray(SAMPLERS[name](score_of(sde, MU + k, COV * (1 + k)))))
        traces.append(TRACES[0] - before)
    assert traces[0] > 0 and traces[1:] == [0, 0], traces
    assert not np.allclose(outs[0], outs[1])


# --- float64 -----------------------------------------------------------------------------------
def test_float64_runs_in_float64():
    """With x64 on and float64 data, every sampler returns float64. DDIM (η = 0, deterministic) equals
    its numpy float64 recursion to 1e-9 (rounding only). The adaptive ODE equals the closed-form flow
    map, and the likelihood the closed-form log-density, to 1e-8: at rtol = atol = 1e-11 each of the
    ≲ 100 steps errs by ≤ 1e-11·(1 + |x|) ≤ 4e-11, so the global error is ≤ 4e-9 (measured 1e-12, 5e-12).
    A float32 rounding anywhere (≥ 6e-8·|x|) would exceed these. x64 is off again afterwards."""
    ts = grids.uniform(VP, 15)
    with jax.enable_x64(True):
        score, x_T = score_of(VP, dtype=jnp.float64), VP.prior_sampling(jax.random.PRNGKey(1), (8, 2), jnp.float64)
        rng = jax.random.PRNGKey(0)
        x_ddim, _ = ddim_sample(rng, VP, score, (8, 2), 15, x_T=x_T)
        x_ode, _ = ode_sample(rng, VP, score, (8, 2), rtol=1e-11, atol=1e-11, z=x_T)
        logp, z, _ = log_likelihood(rng, VP, score, x_ode, divergence="exact", rtol=1e-11, atol=1e-11, eps=1e-3)
        others = [pc_sample(rng, VP, score, (8, 2), dtype=jnp.float64)[0],
                  sde_sample(rng, VP, score, (8, 2), num_steps=10, dtype=jnp.float64)[0],
                  annealed_langevin_sample(rng, VE, score_of(VE, dtype=jnp.float64), (8, 2), 2, 1e-3,
                                           dtype=jnp.float64)[0]]
    assert not jax.config.jax_enable_x64
    assert all(v.dtype == jnp.float64 for v in [x_ddim, x_ode, logp, z, *others])
    # DDIM η = 0 by hand: x_s = α_s x̂₀ + σ_s (x − α_t x̂₀)/σ_t, then x̂₀ at t_{n−1}.
    x = np.asarray(x_T)
    (alphas, sigmas) = np_coeffs(VP, ts)
    for k in range(14):
        x0 = (x + sigmas[k] ** 2 * np_score(VP, x, ts[k])) / alphas[k]
        x = alphas[k + 1] * x0 + sigmas[k + 1] * (x - alphas[k] * x0) / sigmas[k]
    x = (x + sigmas[-1] ** 2 * np_score(VP, x, ts[-1])) / alphas[-1]
    np.testing.assert_allclose(np.asarray(x_ddim), x, rtol=1e-9, atol=1e-9)
    # PF-ODE flow map of N(MU, COV): x_ε − α_ε MU = C_ε^{1/2} C_T^{−1/2} (x_T − α_T MU).
    lam, u = np.linalg.eigh(COV)
    (a0, a1), (s0, s1) = np_coeffs(VP, np.array([VP.sampling_eps, VP.T]))
    gain = u @ np.diag(np.sqrt((a0**2 * lam + s0**2) / (a1**2 * lam + s1**2))) @ u.T
    flow = a0 * MU + (np.asarray(x_T) - a1 * MU) @ gain.T
    np.testing.assert_allclose(np.asarray(x_ode), flow, rtol=0, atol=1e-8)
    # log p_ε(x) + (log p_T(z) − prior log p(z)) = log N(x; α_ε MU, C_ε) (test_likelihood's correction).
    c0, c1 = a0**2 * COV + s0**2 * np.eye(2), a1**2 * COV + s1**2 * np.eye(2)

    def log_normal(v, m, c):
        d = v - m
        return -0.5 * (np.einsum("bi,ij,bj->b", d, np.linalg.inv(c), d) + np.log(np.linalg.det(2 * np.pi * c)))

    zn = np.asarray(z)
    prior = log_normal(zn, 0.0, np.eye(2))
    corrected = np.asarray(logp) - prior + log_normal(zn, a1 * MU, c1)
    np.testing.assert_allclose(corrected, log_normal(np.asarray(x_ode), a0 * MU, c0), rtol=0, atol=1e-8)
