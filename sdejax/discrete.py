"""Discrete-time schedules: a DDPM chain's ᾱ table as a schedule every sampler can use.

Models trained on a discrete chain (DDPM's linear β, latent diffusion's scaled-linear β, improved
DDPM's squared cosine) are sampled exactly on the chain's knots and with a continuous
interpolation (piecewise linear in log-SNR) everywhere else.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from sdejax.sde import SDE, Array, _check_steps, _DDPMChain, _positive, _static_dataclass

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def beta_table(name: str, num_train_timesteps: int = 1000, beta_start: float = 1e-4,
               beta_end: float = 0.02, max_beta: float = 0.999) -> np.ndarray:
    """The discrete β tables other libraries train with (float64).

    linear: linspace(β_start, β_end, N) (DDPM); scaled_linear: linspace(√β_start, √β_end, N)²
    (latent diffusion); squaredcos_cap_v2: β_i = min(1 − ᾱ((i+1)/N)/ᾱ(i/N), max_beta) with the
    cosine ᾱ of improved DDPM (s = 0.008).
    """
    n = num_train_timesteps
    _check_steps(n)
    if name == "linear":
        return np.linspace(beta_start, beta_end, n)
    if name == "scaled_linear":
        return np.linspace(beta_start**0.5, beta_end**0.5, n) ** 2
    if name == "squaredcos_cap_v2":
        abar = np.cos((np.arange(n + 1) / n + 0.008) / 1.008 * np.pi / 2) ** 2
        return np.minimum(1.0 - abar[1:] / abar[:-1], max_beta)
    raise ValueError(f"unknown beta schedule {name!r}; valid: {list(BETA_SCHEDULES)}")


@_static_dataclass
class DiscreteVPSDE(_DDPMChain, SDE):
    """A schedule given by a discrete ᾱ table (a DDPM chain of N steps), as a continuous schedule.

    Knot i sits at t_i = i/(N − 1)·T (the label convention of score_sde's discrete VP models:
    label = t(N − 1)); there α_t² = ᾱ_i exactly. Between knots λ(t) is piecewise linear, with
    α² = sigmoid(λ), σ² = sigmoid(−λ), so continuous-time solvers see a monotone schedule and
    samplers on the knots (`grids.ddpm_grid`) use the table exactly. `discretize` is the chain itself.
    """

    alphas_cumprod_table: tuple[float, ...]
    T_end: float = 1.0

    def __post_init__(self):
        abar = np.asarray(self.alphas_cumprod_table, np.float64)
        if abar.ndim != 1 or abar.shape[0] < 2:
            raise ValueError(f"alphas_cumprod must be a 1-D table of at least 2 entries; got shape {abar.shape}")
        if not (np.all(np.isfinite(abar)) and np.all(abar > 0) and np.all(abar < 1) and np.all(np.diff(abar) < 0)):
            raise ValueError("alphas_cumprod must be finite, strictly decreasing and inside (0, 1)")
        _positive("T", self.T_end)

    @classmethod
    def from_betas(cls, betas, T: float = 1.0) -> "DiscreteVPSDE":
        """From the chain's β_i: ᾱ_i = Π_{j≤i}(1 − β_j)."""
        betas = np.asarray(betas, np.float64)
        if betas.ndim != 1 or not np.all((betas > 0) & (betas < 1)):
            raise ValueError("betas must be a 1-D table with entries in (0, 1)")
        return cls(tuple(float(v) for v in np.cumprod(1.0 - betas)), T)

    @classmethod
    def from_beta_schedule(cls, name: str, num_train_timesteps: int = 1000, **kwargs) -> "DiscreteVPSDE":
        """One of the tables of `beta_table` (linear, scaled_linear, squaredcos_cap_v2)."""
        return cls.from_betas(beta_table(name, num_train_timesteps, **kwargs))

    @property
    def N(self) -> int:
        return len(self.alphas_cumprod_table)

    @property
    def T(self) -> float:
        return self.T_end

    @functools.cached_property
    def alphas_cumprod(self) -> np.ndarray:
        return np.asarray(self.alphas_cumprod_table, np.float64)

    @functools.cached_property
    def discrete_betas(self) -> np.ndarray:
        abar = self.alphas_cumprod
        return 1.0 - abar / np.concatenate([[1.0], abar[:-1]])

    @functools.cached_property
    def _knots(self) -> tuple[np.ndarray, np.ndarray]:
        abar = self.alphas_cumprod
        return np.linspace(0.0, self.T, self.N), np.log(abar) - np.log1p(-abar)

    def log_snr(self, t: Array) -> Array:
        knots, lams = self._knots
        t = jnp.asarray(t)
        return jnp.interp(t, jnp.asarray(knots, t.dtype), jnp.asarray(lams, t.dtype))

    def t_from_log_snr(self, lam: Array) -> Array:
        knots, lams = self._knots
        lam = jnp.asarray(lam)
        return jnp.interp(lam, jnp.asarray(lams[::-1], lam.dtype), jnp.asarray(knots[::-1], lam.dtype))

    def marginal_coeffs(self, t: Array) -> tuple[Array, Array]:
        lam = self.log_snr(t)
        return jnp.sqrt(jax.nn.sigmoid(lam)), jnp.sqrt(jax.nn.sigmoid(-lam))

    @property
    def prior_std(self) -> float:
        return 1.0

    def default_precond(self, continuous: bool = True):
        """ε output with the chain's timestep t(N − 1)/T as the label (an integer at the knots)."""
        from sdejax.precond import Precond

        return Precond.plain("eps", "chain_time")
