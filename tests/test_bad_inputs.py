"""Bad inputs to the library give a clear error (issue 14, section 4).

A score that turns NaN for some examples below some time: every fixed-step sampler names the step,
its times and the number of examples; the diffrax paths (probability-flow ODE, reverse SDE, the
likelihood) stop within a few hundred score evaluations of the NaN instead of the 16,384-step limit.
Bad numbers (negative snr / tolerances / eta), empty batches and a state too large for memory raise
before anything runs.
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdejax.analytic import GaussianMixture
from sdejax.likelihood import log_likelihood
from sdejax.losses import get_sde_loss_fn
from sdejax.sampling import ddim_sample, ode_encode, ode_sample, pc_sample, sample, sde_sample
from sdejax.sampling.diffrax_utils import MAX_STEPS
from sdejax.sampling.loop import NonFiniteError
from sdejax.sde import VPSDE

VP = VPSDE(N=40)
BATCH, BAD, T_BAD = 16, 3, 0.5
RNG = jax.random.PRNGKey(0)


def gaussian_score(x, t):
    """Exact score of N(0, I) data under VP: −x (the marginals stay N(0, I))."""
    return -x


def nan_score(x, t):
    """−x, but NaN for the first BAD examples at times below T_BAD."""
    bad = (t < T_BAD) & (jnp.arange(x.shape[0]) < BAD)
    return jnp.where(bad[:, None], jnp.nan, -x)


FIXED = {
    "pc": lambda score, **kw: pc_sample(RNG, VP, score, (BATCH, 2), **kw),
    "ddim": lambda score, **kw: ddim_sample(RNG, VP, score, (BATCH, 2), num_steps=20, **kw),
    "dpm_solver": lambda score, **kw: sample("dpm_solver", RNG, VP, score, (BATCH, 2), num_steps=12, **kw),
    "heun": lambda score, **kw: sample("heun", RNG, VP, score, (BATCH, 2), num_steps=12, **kw),
    "unipc": lambda score, **kw: sample("unipc", RNG, VP, score, (BATCH, 2), num_steps=12, **kw),
}


def _grid_of(name: str) -> list[float]:
    """The sampler's grid t_1 … t_{n−1} as its callback sees it (a finite run)."""
    times = []
    jax.block_until_ready(FIXED[name](gaussian_score, callback=lambda i, t, x: times.append(float(t))))
    jax.effects_barrier()
    return times


@pytest.mark.parametrize("name", sorted(FIXED))
def test_fixed_step_samplers_name_the_step_time_and_count(name):
    with pytest.raises(NonFiniteError, match=rf"in {BAD} of {BATCH} examples") as info:
        FIXED[name](nan_score)
    step, t_from, t_to = re.search(r"at step (\d+) of \d+ \(t = ([\d.e-]+) -> ([\d.e-]+)\)", str(info.value)).groups()
    step, t_from, t_to = int(step), float(t_from), float(t_to)
    ts = _grid_of(name)  # ts[k - 1] is t_k; step k goes t_{k−1} -> t_k
    assert t_to == pytest.approx(ts[step - 1], rel=1e-3)
    straddle = next(k for k, t in enumerate(ts, 1) if t < T_BAD)  # the step that crosses T_BAD
    # solvers that evaluate the score at a step's end catch it in that step, the others in the next
    assert step in (straddle, straddle + 1), (step, straddle, ts)


def test_nan_in_x_T_is_reported():
    x_T = jnp.ones((4, 2)).at[1, 0].set(jnp.nan)
    with pytest.raises(NonFiniteError, match=r"in x_T in 1 of 4 examples"):
        pc_sample(RNG, VP, gaussian_score, (4, 2), x_T=x_T)


def _nfe_of(message: str) -> int:
    return int(re.search(r"stopped after (\d+) score evaluations", message).group(1))


DIFFRAX = {
    "ode_sample": lambda: ode_sample(RNG, VP, nan_score, (BATCH, 2)),
    "ode_sample_grid": lambda: ode_sample(RNG, VP, nan_score, (BATCH, 2), ts=np.linspace(1.0, 1e-3, 30)),
    "sde_sample_adaptive": lambda: sde_sample(RNG, VP, nan_score, (BATCH, 2)),
    "sde_sample_fixed": lambda: sde_sample(RNG, VP, nan_score, (BATCH, 2), num_steps=50),
    "log_likelihood": lambda: log_likelihood(RNG, VP, lambda x, t: nan_score(x, 1.0 - t), jnp.ones((BATCH, 2))),
}


def _diffrax_report(call) -> tuple[float, float, int]:
    """(step start, step end, score evaluations) of the NonFiniteError `call` raises for nan_score."""
    with pytest.raises(NonFiniteError, match=rf"in {BAD} of {BATCH} examples") as info:
        call()
    message = str(info.value)
    t0, t1 = re.search(r"in the step t = ([\d.e-]+) -> ([\d.e-]+)", message).groups()
    return float(t0), float(t1), _nfe_of(message)


@pytest.mark.parametrize("name", sorted(DIFFRAX))
def test_diffrax_paths_stop_early_at_the_nan(name):
    t0, t1, nfe = _diffrax_report(DIFFRAX[name])
    # the step named holds the NaN's onset, or (fixed steps, drift at the step's start) follows it
    lo, hi = min(t0, t1), max(t0, t1)
    assert lo < T_BAD <= hi + (hi - lo), (t0, t1)
    assert nfe < MAX_STEPS // 20, nfe


def test_ode_encode_stops_early():
    t0, t1, nfe = _diffrax_report(lambda: ode_encode(VP, lambda x, t: nan_score(x, 1.0 - t), jnp.ones((BATCH, 2))))
    assert t0 < T_BAD <= t1 and nfe < MAX_STEPS // 20


def test_too_large_a_request_is_a_python_error():
    with pytest.raises(MemoryError, match=r"\(10000000000, 2\)"):
        pc_sample(RNG, VP, gaussian_score, (10**10, 2))


@pytest.mark.parametrize("call, name", [
    (lambda: pc_sample(RNG, VP, gaussian_score, (4, 2), snr=-0.1), "snr"),
    (lambda: ode_sample(RNG, VP, gaussian_score, (4, 2), rtol=-1e-5), "rtol"),
    (lambda: ode_sample(RNG, VP, gaussian_score, (4, 2), atol=-1e-5), "atol"),
    (lambda: ode_encode(VP, gaussian_score, jnp.ones((4, 2)), rtol=-1.0), "rtol"),
    (lambda: sde_sample(RNG, VP, gaussian_score, (4, 2), atol=-1.0), "atol"),
    (lambda: log_likelihood(RNG, VP, gaussian_score, jnp.ones((4, 2)), rtol=float("nan")), "rtol"),
    (lambda: ddim_sample(RNG, VP, gaussian_score, (4, 2), num_steps=10, eta=-0.5), "eta"),
    (lambda: sample("dpm_solver", RNG, VP, gaussian_score, (4, 2), num_steps=10, eta=-0.5), "eta"),
    (lambda: sample("heun", RNG, VP, gaussian_score, (4, 2), num_steps=10, s_churn=-1.0), "s_churn"),
])
def test_negative_numbers_name_the_argument(call, name):
    with pytest.raises(ValueError, match=rf"^{name} must be"):
        call()


EMPTY = {
    "pc": lambda: pc_sample(RNG, VP, gaussian_score, (0, 2)),
    "ddim": lambda: ddim_sample(RNG, VP, gaussian_score, (0, 2), num_steps=10),
    "dpm_solver": lambda: sample("dpm_solver", RNG, VP, gaussian_score, (0, 2), num_steps=10),
    "ode": lambda: ode_sample(RNG, VP, gaussian_score, (0, 2)),
    "sde": lambda: sde_sample(RNG, VP, gaussian_score, (0, 2)),
    "ode_encode": lambda: ode_encode(VP, gaussian_score, jnp.ones((0, 2))),
    "likelihood": lambda: log_likelihood(RNG, VP, gaussian_score, jnp.ones((0, 2))),
    "pc_x_T": lambda: pc_sample(RNG, VP, gaussian_score, (0, 2), x_T=jnp.ones((0, 2))),
}


@pytest.mark.parametrize("name", sorted(EMPTY))
def test_empty_batch_in_samplers(name):
    with pytest.raises(ValueError, match=r"must have a non-empty leading batch axis; got shape \(0, 2\)"):
        EMPTY[name]()


def test_zero_feature_dimension():
    with pytest.raises(ValueError, match=r"shape must have positive dimensions; got \(4, 0\)"):
        pc_sample(RNG, VP, gaussian_score, (4, 0))


def test_empty_batch_in_losses():
    loss_fn = get_sde_loss_fn(VP, lambda params, x, t, train=False, rngs=None: x, train=False)
    with pytest.raises(ValueError, match=r"batch\['x'\] must have a non-empty leading batch axis"):
        loss_fn({}, RNG, {"x": jnp.zeros((0, 2))})


def test_eps_range_checked_everywhere():
    for call in (lambda: ode_sample(RNG, VP, gaussian_score, (4, 2), eps=1.5),
                 lambda: ode_encode(VP, gaussian_score, jnp.ones((4, 2)), eps=-0.1),
                 lambda: sde_sample(RNG, VP, gaussian_score, (4, 2), eps=1.0),
                 lambda: log_likelihood(RNG, VP, gaussian_score, jnp.ones((4, 2)), eps=2.0),
                 lambda: pc_sample(RNG, VP, gaussian_score, (4, 2), eps=1.0),
                 lambda: ddim_sample(RNG, VP, gaussian_score, (4, 2), num_steps=5, eps=-1.0)):
        with pytest.raises(ValueError, match=r"^eps must lie in \[t_min, T\)"):
            call()


@pytest.mark.parametrize("weights", [[1.0, -0.5], [0.0, 0.0], [1.0], [np.nan, 1.0]])
def test_mixture_weights_validated(weights):
    with pytest.raises(ValueError, match=r"^weights must"):
        GaussianMixture.create(weights, [[0.0, 0.0], [1.0, 1.0]])


def test_under_the_callers_jit_the_nan_stays_in_the_samples():
    """Nothing can be raised inside the caller's jit: fixed steps keep the NaN, a stopped diffrax solve is NaN."""
    fixed = jax.jit(lambda x: pc_sample(RNG, VP, nan_score, (BATCH, 2), x_T=x)[0])(jnp.ones((BATCH, 2)))
    assert np.isnan(np.asarray(fixed)[:BAD]).all() and np.isfinite(np.asarray(fixed)[BAD:]).all()
    flow = jax.jit(lambda z: ode_sample(RNG, VP, nan_score, (BATCH, 2), z=z)[0])(jnp.ones((BATCH, 2)))
    assert np.isnan(np.asarray(flow)).all()
