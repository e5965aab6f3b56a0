"""Forward SDEs dx = f(x, t) dt + g(t) dw and their discretisations (Song et al., 2021).

All SDEs here are linear: x_t = α_t x_0 + σ_t z with z ~ N(0, I), exposed through
`marginal_coeffs(t) -> (alpha, sigma)`. Every sampler, loss and conversion in sdejax is written
against that pair, so a new schedule only needs these methods.

Shapes: `x` has a leading batch axis and any trailing shape; `t` is `(batch,)`. SDE objects are
frozen dataclasses registered as static pytrees, so they can be closed over or passed into jitted
functions.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
ScoreFn = Callable[[Array, Array], Array]


def batch_broadcast(v: Array, x: Array) -> Array:
    """Reshape a per-example `(batch,)` array so it broadcasts against `x` of shape `(batch, ...)`."""
    return jnp.reshape(v, v.shape + (1,) * (x.ndim - v.ndim))


def check_time(x: Array, t: Array, name: str = "t") -> None:
    """Raise a clear error unless `t` has shape `(batch,)` matching the leading axis of `x`."""
    if jnp.ndim(x) < 1:
        raise ValueError(f"x must have a leading batch axis; got shape {jnp.shape(x)}")
    if jnp.shape(t) != (jnp.shape(x)[0],):
        raise ValueError(
            f"{name} must have shape (batch,) = ({jnp.shape(x)[0]},) matching x of shape "
            f"{jnp.shape(x)}; got {name} of shape {jnp.shape(t)}"
        )


def _gaussian_logp(z: Array, std: float) -> Array:
    """log N(z; 0, std² I) summed over all but the batch axis."""
    d = np.prod(z.shape[1:])
    sq = jnp.sum(jnp.reshape(z, (z.shape[0], -1)) ** 2, axis=-1)
    return -0.5 * d * np.log(2 * np.pi * std**2) - sq / (2 * std**2)


class SDE:
    """Shared behaviour of linear forward SDEs on t ∈ [0, T].

    Subclasses implement `sde`, `marginal_coeffs`, `prior_std` and optionally `discretize`.
    """

    N: int

    @property
    def T(self) -> float:
        return 1.0

    def sde(self, x: Array, t: Array) -> tuple[Array, Array]:  # pragma: no cover - abstract
        raise NotImplementedError

    def marginal_coeffs(self, t: Array) -> tuple[Array, Array]:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def prior_std(self) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def marginal_prob(self, x: Array, t: Array) -> tuple[Array, Array]:
        """Mean α_t x and std σ_t of the perturbation kernel p_t(x_t | x_0 = x)."""
        check_time(x, t)
        alpha, sigma = self.marginal_coeffs(t)
        return batch_broadcast(alpha, x) * x, sigma

    def prior_sampling(self, rng: Array, shape: tuple[int, ...], dtype=jnp.float32) -> Array:
        """Draw x_T ~ N(0, prior_std² I)."""
        return self.prior_std * jax.random.normal(rng, shape, dtype)

    def prior_logp(self, z: Array) -> Array:
        """log N(z; 0, prior_std² I) per example, shape `(batch,)`."""
        return _gaussian_logp(z, self.prior_std)

    def time_index(self, t: Array) -> Array:
        """Grid index i = floor(t (N − 1) / T) of the discrete chain, as the original."""
        return (t * (self.N - 1) / self.T).astype(jnp.int32)

    def discretize(self, x: Array, t: Array) -> tuple[Array, Array]:
        """Euler–Maruyama step x_{i+1} = x_i + f + G z with f = f(x,t)·Δt, G = g(t)·√Δt, Δt = T/N."""
        drift, diffusion = self.sde(x, t)
        dt = self.T / self.N
        return drift * dt, diffusion * np.sqrt(dt)

    def reverse(self, score_fn: ScoreFn, probability_flow: bool = False) -> "ReverseSDE":
        """The reverse-time SDE (or probability-flow ODE) driven by `score_fn(x, t)`."""
        return ReverseSDE(self, score_fn, probability_flow)


def _static_dataclass(cls):
    """Frozen dataclass registered as a pytree without leaves (hashable, jit-static)."""
    cls = dataclasses.dataclass(frozen=True)(cls)
    return jax.tree_util.register_static(cls)


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0; got {value}")


def _check_betas(beta_min: float, beta_max: float, n: int) -> None:
    _positive("beta_min", beta_min)
    if not beta_max >= beta_min:
        raise ValueError(f"beta_max must be >= beta_min; got {beta_max} < {beta_min}")
    if n < 1:
        raise ValueError(f"N must be >= 1; got {n}")


@_static_dataclass
class VESDE(SDE):
    """Variance exploding SDE: dx = sqrt(d σ²(t)/dt) dw, σ(t) = σ_min (σ_max/σ_min)^t.

    As in the original code the marginal std at t is σ(t) (not sqrt(σ(t)² − σ_min²)): the data are
    taken as already perturbed by σ_min, so the SDE started at x_0 + σ_min z has these marginals.
    """

    sigma_min: float = 0.01
    sigma_max: float = 50.0
    N: int = 1000

    def __post_init__(self):
        _positive("sigma_min", self.sigma_min)
        if not self.sigma_max > self.sigma_min:
            raise ValueError(f"sigma_max must exceed sigma_min; got {self.sigma_max} <= {self.sigma_min}")
        if self.N < 1:
            raise ValueError(f"N must be >= 1; got {self.N}")

    @functools.cached_property
    def discrete_sigmas(self) -> np.ndarray:
        """σ_i = exp(linspace(log σ_min, log σ_max, N)), ascending (the SMLD noise levels)."""
        return np.exp(np.linspace(np.log(self.sigma_min), np.log(self.sigma_max), self.N))

    def sigma(self, t: Array) -> Array:
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** t

    def sde(self, x: Array, t: Array) -> tuple[Array, Array]:
        """f = 0, g(t) = σ(t) sqrt(2 log(σ_max/σ_min))."""
        check_time(x, t)
        g = self.sigma(t) * np.sqrt(2 * np.log(self.sigma_max / self.sigma_min))
        return jnp.zeros_like(x), g

    def marginal_coeffs(self, t: Array) -> tuple[Array, Array]:
        return jnp.ones_like(t), self.sigma(t)

    @property
    def prior_std(self) -> float:
        return self.sigma_max

    def discretize(self, x: Array, t: Array) -> tuple[Array, Array]:
        """SMLD chain: f = 0, G = sqrt(σ_i² − σ_{i−1}²) with σ_{−1} = 0."""
        check_time(x, t)
        i = self.time_index(t)
        sigmas = jnp.asarray(self.discrete_sigmas, x.dtype)
        sigma = sigmas[i]
        prev = jnp.where(i == 0, jnp.zeros_like(sigma), sigmas[jnp.maximum(i - 1, 0)])
        return jnp.zeros_like(x), jnp.sqrt(sigma**2 - prev**2)


@_static_dataclass
class VPSDE(SDE):
    """Variance preserving SDE: dx = −β(t) x/2 dt + sqrt(β(t)) dw, β(t) = β_min + t(β_max − β_min).

    α_t = e^{m(t)}, σ_t = sqrt(1 − e^{2m(t)}), m(t) = −t²(β_max − β_min)/4 − t β_min/2.
    Its discretisation is the DDPM chain with β_i = linspace(β_min/N, β_max/N, N).
    """

    beta_min: float = 0.1
    beta_max: float = 20.0
    N: int = 1000

    def __post_init__(self):
        _check_betas(self.beta_min, self.beta_max, self.N)
        if self.beta_max / self.N >= 1:
            raise ValueError(
                f"{type(self).__name__}(beta_max={self.beta_max}, N={self.N}): the discrete DDPM betas "
                f"beta_i = linspace(beta_min/N, beta_max/N, N) reach {self.beta_max / self.N:g} >= 1, so "
                f"sqrt(1 - beta_i) is undefined; use N > beta_max (e.g. N >= {int(np.floor(self.beta_max)) + 1})"
            )

    @functools.cached_property
    def discrete_betas(self) -> np.ndarray:
        return np.linspace(self.beta_min / self.N, self.beta_max / self.N, self.N)

    @functools.cached_property
    def alphas_cumprod(self) -> np.ndarray:
        """ᾱ_i = Π_{j≤i} (1 − β_j) of the DDPM chain."""
        return np.cumprod(1.0 - self.discrete_betas)

    def beta(self, t: Array) -> Array:
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def log_mean_coeff(self, t: Array) -> Array:
        """m(t) = log α_t = −t²(β_max − β_min)/4 − t β_min/2."""
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def sde(self, x: Array, t: Array) -> tuple[Array, Array]:
        check_time(x, t)
        beta = self.beta(t)
        return -0.5 * batch_broadcast(beta, x) * x, jnp.sqrt(beta)

    def marginal_coeffs(self, t: Array) -> tuple[Array, Array]:
        m = self.log_mean_coeff(t)
        return jnp.exp(m), jnp.sqrt(-jnp.expm1(2.0 * m))

    @property
    def prior_std(self) -> float:
        return 1.0

    def discretize(self, x: Array, t: Array) -> tuple[Array, Array]:
        """DDPM chain: x_{i+1} = sqrt(1 − β_i) x_i + sqrt(β_i) z, i.e. f = (sqrt(1 − β_i) − 1) x, G = sqrt(β_i)."""
        check_time(x, t)
        beta = jnp.asarray(self.discrete_betas, x.dtype)[self.time_index(t)]
        # sqrt(1 − β) − 1 written without cancellation.
        f = batch_broadcast(-beta / (jnp.sqrt(1.0 - beta) + 1.0), x) * x
        return f, jnp.sqrt(beta)


@_static_dataclass
class subVPSDE(VPSDE):
    """Sub-VP SDE: dx = −β(t) x/2 dt + sqrt(β(t)(1 − e^{−2∫β})) dw.

    α_t = e^{m(t)} as VP, σ_t = 1 − e^{2m(t)} (its variance is (1 − e^{2m})², always below VP's).
    Discretised by Euler–Maruyama, as the original.
    """

    def __post_init__(self):
        _check_betas(self.beta_min, self.beta_max, self.N)

    def sde(self, x: Array, t: Array) -> tuple[Array, Array]:
        check_time(x, t)
        beta = self.beta(t)
        discount = -jnp.expm1(-2 * self.beta_min * t - (self.beta_max - self.beta_min) * t**2)
        return -0.5 * batch_broadcast(beta, x) * x, jnp.sqrt(beta * discount)

    def marginal_coeffs(self, t: Array) -> tuple[Array, Array]:
        m = self.log_mean_coeff(t)
        return jnp.exp(m), -jnp.expm1(2.0 * m)

    discretize = SDE.discretize


@dataclasses.dataclass(frozen=True)
class ReverseSDE:
    """Reverse-time SDE dx = [f − g² ∇log p_t] dt + g dw̄, or with `probability_flow` the ODE
    dx = [f − g²/2 ∇log p_t] dt (diffusion 0)."""

    forward: SDE
    score_fn: ScoreFn
    probability_flow: bool = False

    @property
    def T(self) -> float:
        return self.forward.T

    @property
    def N(self) -> int:
        return self.forward.N

    def _combine(self, f: Array, g: Array, x: Array, t: Array) -> tuple[Array, Array]:
        weight = 0.5 if self.probability_flow else 1.0
        drift = f - batch_broadcast(g**2, x) * self.score_fn(x, t) * weight
        return drift, (jnp.zeros_like(g) if self.probability_flow else g)

    def sde(self, x: Array, t: Array) -> tuple[Array, Array]:
        f, g = self.forward.sde(x, t)
        return self._combine(f, g, x, t)

    def discretize(self, x: Array, t: Array) -> tuple[Array, Array]:
        """Reverse of the forward discretisation: f − G² s(x, t) (halved for the ODE), G (0 for the ODE)."""
        f, g = self.forward.discretize(x, t)
        return self._combine(f, g, x, t)


SDES = {"vesde": VESDE, "vpsde": VPSDE, "subvpsde": subVPSDE}


def get_sde(name: str, **kwargs) -> SDE:
    """Build an SDE by name (case-insensitive: 'vesde', 'vpsde', 'subvpsde')."""
    key = name.lower()
    if key not in SDES:
        raise ValueError(f"unknown SDE {name!r}; valid names: {sorted(SDES)}")
    return SDES[key](**kwargs)
