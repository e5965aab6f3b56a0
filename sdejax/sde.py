"""Forward SDEs dx = f(x, t) dt + g(t) dw and their discretisations (Song et al., 2021).

All SDEs here are linear: x_t = α_t x_0 + σ_t z with z ~ N(0, I), exposed through
`marginal_coeffs(t) -> (alpha, sigma)`. Every sampler, loss and conversion in sdejax is written
against that pair, so a new schedule only needs these methods.

Shapes: `x` has a leading batch axis and any trailing shape; `t` is `(batch,)`. (α, σ) have the
shape of `t` (one pair per example), or both `t.shape + x.shape[1:]` for a schedule that is diagonal
per dimension (x_t,i = α_t,i x_0,i + σ_t,i z_i, e.g. `sdejax.blurring.BlurringSDE` in the DCT basis);
`batch_broadcast` handles both, so whatever is elementwise in (α, σ) works on either, and what needs
one log-SNR per example refuses a per-dimension schedule (`check_per_example`). SDE objects are
frozen dataclasses registered as static pytrees, so they can be closed over or passed into jitted
functions.
"""
from __future__ import annotations

import abc
import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
ScoreFn = Callable[[Array, Array], Array]


def batch_broadcast(v: Array, x: Array) -> Array:
    """Reshape a per-example `(batch,)` array so it broadcasts against `x` of shape `(batch, ...)`
    (a per-dimension `(batch, ...)` array is returned as it is)."""
    return jnp.reshape(v, v.shape + (1,) * (x.ndim - v.ndim))


def check_per_example(values: Array, t: Array, what: str) -> Array:
    """`values` (computed from the schedule at times `t`) if they have the shape of `t`, else a ValueError:
    `what` needs one (α, σ) pair, i.e. one log-SNR, per time, which a per-dimension schedule lacks."""
    if jnp.shape(values) != jnp.shape(t):
        raise ValueError(
            f"{what} needs one log-SNR per time, but this schedule's (alpha, sigma) are per dimension (shape "
            f"{jnp.shape(values)} at times of shape {jnp.shape(t)}); use a sampler that is elementwise in "
            "(alpha, sigma): ode_sample, sde_sample, pc_sample, ddim_sample, Euler/Heun on a "
            "uniform grid without churn, or log_likelihood"
        )
    return values


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


class SDE(abc.ABC):
    """A linear forward SDE dx = f(t) x dt + g(t) dw on t ∈ [t_min, T], defined by its marginals.

    `marginal_coeffs(t) -> (α_t, σ_t)` and `prior_std` are the only required members. The rest
    derives from them (closed forms override where they are more accurate):

        f(t) = d log α/dt,   g(t)² = dσ²/dt − 2σ² d log α/dt,   λ(t) = log(α_t²/σ_t²),

    with t(λ) by a monotone bisection. `N` is the default number of steps of the samplers that
    use a fixed grid; the discrete chains (DDPM β table, SMLD σ table) live on the classes that
    have one and are validated only when used.
    """

    N: int

    @property
    def T(self) -> float:
        return 1.0

    @property
    def t_min(self) -> float:
        """Smallest valid time of the schedule (0 unless the schedule starts later, as EDM's σ_min)."""
        return 0.0

    @property
    def sampling_eps(self) -> float:
        """Default last time of a sampling grid (1e-3·T, as score_sde; EDM: σ_min)."""
        return 1e-3 * self.T

    @abc.abstractmethod
    def marginal_coeffs(self, t: Array) -> tuple[Array, Array]:
        """(α_t, σ_t) of the perturbation kernel x_t = α_t x_0 + σ_t z, elementwise in t."""

    @property
    @abc.abstractmethod
    def prior_std(self) -> float:
        """Standard deviation of the prior N(0, prior_std² I) that stands in for p_T."""

    def coefficients(self, t: Array) -> tuple[Array, Array]:
        """(f(t), g(t)) from the marginals by forward-mode differentiation (class docstring; needs σ_t > 0)."""
        t = jnp.asarray(t)
        (log_alpha, var), (dlog_alpha, dvar) = jax.jvp(
            lambda u: (lambda a, s: (jnp.log(a), s**2))(*self.marginal_coeffs(u)), (t,), (jnp.ones_like(t),))
        return dlog_alpha, jnp.sqrt(jnp.maximum(dvar - 2.0 * var * dlog_alpha, 0.0))

    def sde(self, x: Array, t: Array) -> tuple[Array, Array]:
        """Drift f(t) x and diffusion g(t) of the forward SDE."""
        check_time(x, t)
        f, g = self.coefficients(t)
        return batch_broadcast(f, x) * x, g

    def log_snr(self, t: Array) -> Array:
        """λ(t) = log(α_t² / σ_t²), strictly decreasing in t."""
        alpha, sigma = self.marginal_coeffs(t)
        return 2.0 * (jnp.log(alpha) - jnp.log(sigma))

    def t_from_log_snr(self, lam: Array, iters: int = 64) -> Array:
        """The time t with λ(t) = lam, by bisection on [t_min, T] (λ is monotone); clamped to the ends."""
        lam = jnp.asarray(lam)
        lo, hi = jnp.full_like(lam, self.t_min), jnp.full_like(lam, self.T)
        check_per_example(self.log_snr(lo), lam, "t_from_log_snr")
        for _ in range(iters):
            mid = 0.5 * (lo + hi)
            above = self.log_snr(mid) > lam  # λ decreasing: the root lies later
            lo, hi = jnp.where(above, mid, lo), jnp.where(above, hi, mid)
        return 0.5 * (lo + hi)

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

    def default_precond(self, continuous: bool = True):
        """How networks trained on this schedule see (x, t) by default (`sdejax.precond`): plain ε with
        labels 999 t/T. Schedules with an established convention override it."""
        from sdejax.precond import Precond

        return Precond.plain("eps", "time")

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


def _check_steps(n: int) -> None:
    if int(n) != n or n < 1:
        raise ValueError(f"N must be an integer >= 1; got {n}")


def _check_sigma_range(sigma_min: float, sigma_max: float, n: int) -> None:
    """0 < σ_min < σ_max and N ≥ 1 (the VE-type schedules)."""
    _positive("sigma_min", sigma_min)
    if not sigma_max > sigma_min:
        raise ValueError(f"sigma_max must exceed sigma_min; got {sigma_max} <= {sigma_min}")
    _check_steps(n)


def smld_sigmas(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    """The SMLD noise levels σ_i = exp(linspace(log σ_min, log σ_max, N)), ascending, float64.

    The one copy of the table: `VESDE.discrete_sigmas` and the NCSN networks read it from here.
    """
    return np.exp(np.linspace(np.log(sigma_min), np.log(sigma_max), n))


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
        _check_sigma_range(self.sigma_min, self.sigma_max, self.N)

    @functools.cached_property
    def discrete_sigmas(self) -> np.ndarray:
        """σ_i of the SMLD chain, ascending (`smld_sigmas`)."""
        return smld_sigmas(self.sigma_min, self.sigma_max, self.N)

    def sigma(self, t: Array) -> Array:
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** t

    def coefficients(self, t: Array) -> tuple[Array, Array]:
        """f = 0, g(t) = σ(t) sqrt(2 log(σ_max/σ_min))."""
        return jnp.zeros_like(t), self.sigma(t) * np.sqrt(2 * np.log(self.sigma_max / self.sigma_min))

    def marginal_coeffs(self, t: Array) -> tuple[Array, Array]:
        return jnp.ones_like(t), self.sigma(t)

    def t_from_log_snr(self, lam: Array) -> Array:
        """t = log(σ/σ_min) / log(σ_max/σ_min) with σ = e^{−λ/2}."""
        return (-0.5 * lam - np.log(self.sigma_min)) / np.log(self.sigma_max / self.sigma_min)

    @property
    def prior_std(self) -> float:
        return self.sigma_max

    def default_precond(self, continuous: bool = True):
        """score_sde's VE convention: score output, labels σ(t) or the SMLD index."""
        from sdejax.precond import Precond

        return Precond.score_sde_ve(continuous)

    def discretize(self, x: Array, t: Array) -> tuple[Array, Array]:
        """SMLD chain: f = 0, G = sqrt(σ_i² − σ_{i−1}²) with σ_{−1} = 0."""
        check_time(x, t)
        i = self.time_index(t)
        sigmas = jnp.asarray(self.discrete_sigmas, x.dtype)
        sigma = sigmas[i]
        prev = jnp.where(i == 0, jnp.zeros_like(sigma), sigmas[jnp.maximum(i - 1, 0)])
        return jnp.zeros_like(x), jnp.sqrt(sigma**2 - prev**2)


class _DDPMChain:
    """The DDPM chain x_{i+1} = sqrt(1 − β_i) x_i + sqrt(β_i) z of a class with `discrete_betas`."""

    @functools.cached_property
    def alphas_cumprod(self) -> np.ndarray:
        """ᾱ_i = Π_{j≤i} (1 − β_j) of the DDPM chain."""
        return np.cumprod(1.0 - self.discrete_betas)

    def discretize(self, x: Array, t: Array) -> tuple[Array, Array]:
        """DDPM chain: f = (sqrt(1 − β_i) − 1) x, G = sqrt(β_i), i = `time_index(t)`."""
        check_time(x, t)
        beta = jnp.asarray(self.discrete_betas, x.dtype)[self.time_index(t)]
        # sqrt(1 − β) − 1 written without cancellation.
        f = batch_broadcast(-beta / (jnp.sqrt(1.0 - beta) + 1.0), x) * x
        return f, jnp.sqrt(beta)


class _LinearBeta(SDE):
    """β(t) = β_min + t(β_max − β_min) and m(t) = log α_t = −t²(β_max − β_min)/4 − t β_min/2."""

    beta_min: float
    beta_max: float

    def __post_init__(self):
        _positive("beta_min", self.beta_min)
        if not self.beta_max >= self.beta_min:
            raise ValueError(f"beta_max must be >= beta_min; got {self.beta_max} < {self.beta_min}")
        _check_steps(self.N)

    def beta(self, t: Array) -> Array:
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def log_mean_coeff(self, t: Array) -> Array:
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def t_from_log_mean_coeff(self, m: Array) -> Array:
        """The root t ≥ 0 of a t² + b t + m = 0 (a = Δβ/4, b = β_min/2), written without cancellation."""
        a, b = 0.25 * (self.beta_max - self.beta_min), 0.5 * self.beta_min
        return -2.0 * m / (b + jnp.sqrt(b**2 - 4.0 * a * m))

    @property
    def prior_std(self) -> float:
        return 1.0


@_static_dataclass
class VPSDE(_DDPMChain, _LinearBeta):
    """Variance preserving SDE: dx = −β(t) x/2 dt + sqrt(β(t)) dw, β(t) = β_min + t(β_max − β_min).

    α_t = e^{m(t)}, σ_t = sqrt(1 − e^{2m(t)}). Its discretisation is the DDPM chain with
    β_i = linspace(β_min/N, β_max/N, N), which needs β_max/N < 1 (checked when the chain is used).
    """

    beta_min: float = 0.1
    beta_max: float = 20.0
    N: int = 1000

    @functools.cached_property
    def discrete_betas(self) -> np.ndarray:
        if self.beta_max / self.N >= 1:
            raise ValueError(
                f"VPSDE(beta_max={self.beta_max}, N={self.N}): the discrete DDPM betas "
                f"beta_i = linspace(beta_min/N, beta_max/N, N) reach {self.beta_max / self.N:g} >= 1, so "
                f"sqrt(1 - beta_i) is undefined; use N > beta_max (e.g. N >= {int(np.floor(self.beta_max)) + 1}) "
                "for the discrete chain (continuous-time use accepts any N)"
            )
        return np.linspace(self.beta_min / self.N, self.beta_max / self.N, self.N)

    def coefficients(self, t: Array) -> tuple[Array, Array]:
        beta = self.beta(t)
        return -0.5 * beta, jnp.sqrt(beta)

    def default_precond(self, continuous: bool = True):
        """score_sde's VP convention: ε output, labels 999 t or the DDPM index t(N − 1)."""
        from sdejax.precond import Precond

        return Precond.score_sde_vp(continuous)

    def marginal_coeffs(self, t: Array) -> tuple[Array, Array]:
        m = self.log_mean_coeff(t)
        return jnp.exp(m), jnp.sqrt(-jnp.expm1(2.0 * m))

    def log_snr(self, t: Array) -> Array:
        m = self.log_mean_coeff(t)
        return 2.0 * m - jnp.log(-jnp.expm1(2.0 * m))

    def t_from_log_snr(self, lam: Array) -> Array:
        """α² = sigmoid(λ), so m = −softplus(−λ)/2, then t from the quadratic m(t) = m."""
        return self.t_from_log_mean_coeff(-0.5 * jax.nn.softplus(-lam))


@_static_dataclass
class subVPSDE(_LinearBeta):
    """Sub-VP SDE: dx = −β(t) x/2 dt + sqrt(β(t)(1 − e^{−2∫β})) dw.

    α_t = e^{m(t)} as VP, σ_t = 1 − e^{2m(t)} (its variance is (1 − e^{2m})², always below VP's).
    Discretised by Euler–Maruyama, as the original.
    """

    beta_min: float = 0.1
    beta_max: float = 20.0
    N: int = 1000

    def coefficients(self, t: Array) -> tuple[Array, Array]:
        beta = self.beta(t)
        discount = -jnp.expm1(-2 * self.beta_min * t - (self.beta_max - self.beta_min) * t**2)
        return -0.5 * beta, jnp.sqrt(beta * discount)

    def marginal_coeffs(self, t: Array) -> tuple[Array, Array]:
        m = self.log_mean_coeff(t)
        return jnp.exp(m), -jnp.expm1(2.0 * m)

    def default_precond(self, continuous: bool = True):
        """score_sde's sub-VP convention (continuous only): ε output, labels 999 t."""
        if not continuous:
            raise ValueError("subVPSDE has no discrete-time score parameterisation; use continuous=True")
        return super().default_precond(True)

    def t_from_log_snr(self, lam: Array) -> Array:
        """e^{λ/2} = u/(1 − u²) with u = α_t, so u = sqrt(1 + w²) − w, log u = −asinh(w), w = e^{−λ/2}/2."""
        return self.t_from_log_mean_coeff(-jnp.arcsinh(0.5 * jnp.exp(-0.5 * lam)))


@_static_dataclass
class CosineVPSDE(SDE):
    """The cosine schedule of improved DDPM (Nichol & Dhariwal, 2021) in continuous time.

    ᾱ(t) = f(t)/f(0), f(t) = cos²(θ(t)), θ(t) = (t + s)/(1 + s)·π/2; α_t = sqrt(ᾱ), σ_t = sqrt(1 − ᾱ);
    β(t) = g² = π tan θ / (1 + s). At t = 1, ᾱ = 0 and β = ∞; the paper clips its discrete β_i at
    0.999, and in continuous time the schedule ends at T = 0.9946 (as dpm-solver), where α_T = 0.0084
    and λ(T) = −9.56. The paper's clipped 1000-step chain itself is
    `DiscreteVPSDE.from_beta_schedule("squaredcos_cap_v2")`.
    """

    s: float = 0.008
    t_max: float = 0.9946
    N: int = 1000

    def __post_init__(self):
        _positive("s", self.s)
        if not 0.0 < self.t_max < 1.0:
            raise ValueError(f"t_max must be in (0, 1) (the schedule is singular at 1); got {self.t_max}")
        _check_steps(self.N)

    @property
    def T(self) -> float:
        return self.t_max

    def _theta(self, t: Array) -> Array:
        return (t + self.s) / (1.0 + self.s) * (0.5 * np.pi)

    def coefficients(self, t: Array) -> tuple[Array, Array]:
        """f = −β/2, g = sqrt(β), β(t) = −d log ᾱ/dt = π tan θ(t) / (1 + s)."""
        beta = np.pi * jnp.tan(self._theta(t)) / (1.0 + self.s)
        return -0.5 * beta, jnp.sqrt(beta)

    def marginal_coeffs(self, t: Array) -> tuple[Array, Array]:
        """α = cos θ / cos θ₀; σ² = 1 − ᾱ = sin(θ − θ₀) sin(θ + θ₀) / cos² θ₀, free of cancellation near t = 0."""
        theta, theta0 = self._theta(t), self._theta(0.0)
        alpha = jnp.cos(theta) / np.cos(theta0)
        return alpha, jnp.sqrt(jnp.sin(theta - theta0) * jnp.sin(theta + theta0)) / np.cos(theta0)

    def t_from_log_snr(self, lam: Array) -> Array:
        """θ = atan2(sin θ, cos θ) with cos θ = α cos θ₀ and sin² θ = sin² θ₀ + σ² cos² θ₀ (α² = sigmoid(λ))."""
        c0, s0 = np.cos(self._theta(0.0)), np.sin(self._theta(0.0))
        theta = jnp.arctan2(jnp.sqrt(s0**2 + jax.nn.sigmoid(-lam) * c0**2), jnp.sqrt(jax.nn.sigmoid(lam)) * c0)
        return theta * (2.0 / np.pi) * (1.0 + self.s) - self.s

    @property
    def prior_std(self) -> float:
        return 1.0


@_static_dataclass
class EDMSDE(SDE):
    """The EDM / Karras VE family (Karras et al., 2022): α_t = 1, σ(t) = t on [σ_min, σ_max].

    dx = sqrt(2t) dw, so T = σ_max, t_min = σ_min and the prior is N(0, σ_max² I); the ODE is
    dx/dt = −t ∇log p_t(x) = (x − D(x; t))/t.
    """

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    N: int = 1000

    def __post_init__(self):
        _check_sigma_range(self.sigma_min, self.sigma_max, self.N)

    @property
    def T(self) -> float:
        return self.sigma_max

    @property
    def t_min(self) -> float:
        return self.sigma_min

    @property
    def sampling_eps(self) -> float:
        return self.sigma_min

    def coefficients(self, t: Array) -> tuple[Array, Array]:
        return jnp.zeros_like(t), jnp.sqrt(2.0 * t)

    def marginal_coeffs(self, t: Array) -> tuple[Array, Array]:
        return jnp.ones_like(t), t

    def t_from_log_snr(self, lam: Array) -> Array:
        return jnp.exp(-0.5 * lam)

    def default_precond(self, continuous: bool = True):
        """EDM's preconditioning with σ_data = 0.5."""
        from sdejax.precond import Precond

        return Precond.edm(0.5)

    @property
    def prior_std(self) -> float:
        return self.sigma_max


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


SDES = {"vesde": VESDE, "vpsde": VPSDE, "subvpsde": subVPSDE, "cosinevpsde": CosineVPSDE, "edmsde": EDMSDE}


def get_sde(name: str, **kwargs) -> SDE:
    """Build an SDE by name (case-insensitive): vesde, vpsde, subvpsde, cosinevpsde, edmsde."""
    key = name.lower()
    if key not in SDES:
        raise ValueError(f"unknown SDE {name!r}; valid names: {sorted(SDES)}")
    return SDES[key](**kwargs)
