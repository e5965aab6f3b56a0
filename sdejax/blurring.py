"""Blurring diffusion (Hoogeboom & Salimans, 2023): a linear SDE diagonal in the DCT basis.

Heat dissipation on an H×W image is diagonal in the orthonormal DCT-II basis u = C_H x C_Wᵀ (per
channel): frequency k = (k_h, k_w) decays as exp(−λ_k τ), λ_k = π²(k_h²/H² + k_w²/W²), which is a
Gaussian blur of std σ_B = sqrt(2τ) with reflecting boundaries. Blurring diffusion adds white noise:

    u_t = α_k(t) u_0 + σ(t) ε,   α_k(t) = a(t) d_k(t),   d_k(t) = (1 − d_min) e^{−λ_k τ(t)} + d_min,
    τ(t) = σ_B(t)²/2,   σ_B(t) = σ_B,max sin²(π t / 2T),

with (a, σ) a base schedule (default the paper's cosine, log-SNR clipped to [−10, 10]) and d_min
(`min_scale`) keeping the highest frequencies' signal above zero. Per frequency this is the SDE

    du_k = f_k u_k dt + g_k dw_k,   f_k = f_base + d log d_k/dt,   g_k² = g_base² − 2σ² d log d_k/dt.

C is orthonormal, so ε is white in both bases and log-densities agree (|det C| = 1).

`BlurringSDE` is the process in frequency space: its state is u (batch, H, W, C), and
`marginal_coeffs` returns per-frequency (α, σ) of shape t.shape + (H, W, C) (`sdejax.sde`). What is
elementwise in (α, σ) runs on it unchanged: the PF-ODE (`ode_sample`, `ode_encode`), the reverse SDE
(`sde_sample`), `pc_sample`, `ddim_sample`, Euler/Heun on a uniform grid, `log_likelihood`. What steps
in one log-SNR per time (DPM-Solver++, UniPC, karras/log_snr grids, churn) raises a ValueError.
Samples map back with `to_pixels`; a pixel-space network enters through `FrequencyNetwork`.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from sdejax.sde import SDE

Array = jax.Array


def dct_matrix(n: int) -> np.ndarray:
    """The orthonormal DCT-II matrix C[k, j] = sqrt((2 − δ_k0)/n) cos(π k (2j + 1) / 2n), float64; u = C x."""
    k, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    return np.sqrt(np.where(k == 0, 1.0, 2.0) / n) * np.cos(np.pi * k * (2 * j + 1) / (2 * n))


def _expand(v: Array) -> Array:
    """(...,) → (..., 1, 1, 1): a per-time value against (..., H, W, C)."""
    return v[..., None, None, None]


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class CosineLogSNRSDE(SDE):
    """VP cosine schedule with log-SNR clipped to [logsnr_min, logsnr_max] (the blurring paper's base):

        α = cos θ, σ = sin θ, θ(t) = θ_0 + (θ_1 − θ_0) t,  θ_i = atan e^{−λ_i/2},  λ(t) = −2 log tan θ(t),
        f = −θ' tan θ,  g² = 2 θ' tan θ.
    """

    logsnr_min: float = -10.0
    logsnr_max: float = 10.0
    N: int = 1000

    def __post_init__(self):
        if not self.logsnr_min < self.logsnr_max:
            raise ValueError(f"logsnr_min must be < logsnr_max; got {self.logsnr_min} >= {self.logsnr_max}")
        if int(self.N) != self.N or self.N < 1:
            raise ValueError(f"N must be an integer >= 1; got {self.N}")

    @property
    def _limits(self) -> tuple[float, float]:
        return float(np.arctan(np.exp(-0.5 * self.logsnr_max))), float(np.arctan(np.exp(-0.5 * self.logsnr_min)))

    def _theta(self, t: Array) -> Array:
        lo, hi = self._limits
        return lo + (hi - lo) * t

    def marginal_coeffs(self, t: Array) -> tuple[Array, Array]:
        theta = self._theta(t)
        return jnp.cos(theta), jnp.sin(theta)

    def coefficients(self, t: Array) -> tuple[Array, Array]:
        lo, hi = self._limits
        tan = jnp.tan(self._theta(t))
        return -(hi - lo) * tan, jnp.sqrt(2.0 * (hi - lo) * tan)

    def log_snr(self, t: Array) -> Array:
        return -2.0 * jnp.log(jnp.tan(self._theta(t)))

    def t_from_log_snr(self, lam: Array) -> Array:
        lo, hi = self._limits
        return (jnp.arctan(jnp.exp(-0.5 * lam)) - lo) / (hi - lo)

    @property
    def prior_std(self) -> float:
        return 1.0


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class BlurringSDE(SDE):
    """Blurring diffusion on images of `shape` = (H, W, C), in DCT frequency space (module docstring).

    `sigma_blur_max`: σ_B,max (the paper: 20 on CIFAR-10); `min_scale`: d_min (0.001); `base`: the
    schedule of a(t), σ(t), whose T, t_min, N and prior it shares (at T the prior N(0, prior_std² I)
    stands in for p_T in either basis).
    """

    shape: tuple[int, int, int]
    sigma_blur_max: float = 20.0
    min_scale: float = 0.001
    base: SDE = CosineLogSNRSDE()

    def __post_init__(self):
        shape = tuple(int(d) for d in self.shape)
        if len(shape) != 3 or min(shape) < 1 or shape != tuple(self.shape):
            raise ValueError(f"shape must be (H, W, C) of positive ints; got {self.shape!r}")
        object.__setattr__(self, "shape", shape)
        if not self.sigma_blur_max >= 0:
            raise ValueError(f"sigma_blur_max must be >= 0; got {self.sigma_blur_max}")
        if not 0.0 <= self.min_scale <= 1.0:
            raise ValueError(f"min_scale must lie in [0, 1]; got {self.min_scale}")

    @property
    def N(self) -> int:
        return self.base.N

    @property
    def T(self) -> float:
        return self.base.T

    @property
    def t_min(self) -> float:
        return self.base.t_min

    @property
    def sampling_eps(self) -> float:
        return self.base.sampling_eps

    @property
    def prior_std(self) -> float:
        return self.base.prior_std

    @functools.cached_property
    def frequencies(self) -> np.ndarray:
        """λ_k = π²(k_h²/H² + k_w²/W²), shape (H, W, 1), float64."""
        h, w, _ = self.shape
        return (np.pi**2 * ((np.arange(h) / h)[:, None] ** 2 + (np.arange(w) / w)[None, :] ** 2))[..., None]

    def blur_time(self, t: Array) -> Array:
        """τ(t) = σ_B(t)²/2 with σ_B(t) = σ_B,max sin²(π t / 2T)."""
        return 0.5 * (self.sigma_blur_max * jnp.sin(0.5 * np.pi * t / self.T) ** 2) ** 2

    def log_scaling(self, t: Array) -> Array:
        """log d_k(t) = log((1 − d_min) e^{−λ_k τ(t)} + d_min), shape t.shape + (H, W, 1)."""
        t = jnp.asarray(t)
        decay = -jnp.asarray(self.frequencies, t.dtype) * _expand(self.blur_time(t))
        floor = jnp.asarray(self.min_scale, t.dtype)
        return jnp.logaddexp(jnp.log1p(-floor) + decay, jnp.log(floor))

    def marginal_coeffs(self, t: Array) -> tuple[Array, Array]:
        """α_k = a(t) d_k(t) and σ (the base's, the same for every frequency), both t.shape + (H, W, C)."""
        t = jnp.asarray(t)
        a, sigma = self.base.marginal_coeffs(t)
        full = t.shape + self.shape
        return (jnp.broadcast_to(_expand(a) * jnp.exp(self.log_scaling(t)), full),
                jnp.broadcast_to(_expand(sigma), full))

    def coefficients(self, t: Array) -> tuple[Array, Array]:
        """f_k = f_base + d log d_k/dt, g_k = sqrt(g_base² − 2σ² d log d_k/dt) (module docstring)."""
        t = jnp.asarray(t)
        f, g = self.base.coefficients(t)
        _, sigma = self.base.marginal_coeffs(t)
        _, rate = jax.jvp(self.log_scaling, (t,), (jnp.ones_like(t),))
        full = t.shape + self.shape
        return (jnp.broadcast_to(_expand(f) + rate, full),
                jnp.broadcast_to(jnp.sqrt(_expand(g**2) - 2.0 * _expand(sigma**2) * rate), full))

    def _dct(self, dtype) -> tuple[Array, Array]:
        h, w, _ = self.shape
        return jnp.asarray(dct_matrix(h), dtype), jnp.asarray(dct_matrix(w), dtype)

    def from_pixels(self, x: Array) -> Array:
        """u = C_H x C_Wᵀ over the spatial axes of x (..., H, W, C): the orthonormal 2-D DCT-II."""
        c_h, c_w = self._dct(x.dtype)
        return jnp.einsum("kh,lw,...hwc->...klc", c_h, c_w, x)

    def to_pixels(self, u: Array) -> Array:
        """x = C_Hᵀ u C_W: the inverse (and transpose) of `from_pixels`."""
        c_h, c_w = self._dct(u.dtype)
        return jnp.einsum("kh,lw,...klc->...hwc", c_h, c_w, u)

    def default_precond(self, continuous: bool = True):
        """The base schedule's (the paper's network predicts ε)."""
        return self.base.default_precond(continuous)


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class FrequencyNetwork:
    """A pixel-space network `apply_fn(params, x, labels, **kw)` seen from frequency space:
    u ↦ C apply_fn(Cᵀ u). It sees the image x_t = Cᵀ u_t; its prediction (ε, x₀ or the score, a vector
    of the image) maps to frequency space by the same orthonormal change of basis. Pass it as the
    `apply_fn` of `sdejax.score.get_score_fn(sde, ...)`.
    """

    sde: BlurringSDE
    apply_fn: Callable[..., Array]

    def __call__(self, params: Any, u: Array, labels: Array, **kwargs) -> Array:
        return self.sde.from_pixels(self.apply_fn(params, self.sde.to_pixels(u), labels, **kwargs))
