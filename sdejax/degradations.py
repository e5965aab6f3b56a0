"""Forward transforms x_t = F_t(x_0, ε) of the unified diffusion model (UDM; `sdejax.udm`).

A degradation is a pytree (a frozen dataclass) with

    apply(x0, eps, t) -> x_t          F_t(x_0, ε), t of shape (batch,), x of shape (batch, ...)
    noise(rng, shape, dtype) -> ε     a draw of ε ~ q(ε); None for a deterministic degradation
    invert(x0, x_t, t) -> ε           ε = F_t⁻¹(x_0, x_t), only where `invertible`
    mix_weight(t, s, eta) -> ρ        the weight of fresh noise in the "interp" update (below)

and the time range [t_min, T] (default [0, 1]; t = 0 is clean data). Instances:

    gaussian(sde)   F_t = α_t x_0 + σ_t ε, ε ~ N(0, I), ε = (x_t − α_t x_0)/σ_t (any linear SDE, its own times)
    blur(σ_max)     F_t = G_{σ(t)} * x_0, a separable Gaussian blur, σ(t) = σ_max √t ("sqrt") or σ_max t
    mask()          F_t = x_0 with a fixed, seeded set of round(t·P) of its P pixels set to `fill` (nested in t)
    linear(e)       F_t = x_0 + t e (the cold-diffusion test case: Algorithm 2 is exact for any restorer)

"interp" (the note's mixture of recovered and fresh noise) uses ε' = sqrt(1 − ρ²) ε̂ + ρ z, z ~ q(ε),
which keeps ε' ~ N(0, I) for Gaussian ε. The default ρ = η. For `gaussian`,

    ρ = c/σ_s = η sqrt(1 − (α_t σ_s / (α_s σ_t))²),

so F_s(x̂_0, ε') = α_s x̂_0 + sqrt(σ_s² − c²) ε̂ + c z is exactly DDIM with η (`sdejax.sampling.ddim`).

Third-party degradations subclass `Degradation` (which supplies the deterministic defaults) or
define the same members; names for configs are in `DEGRADATIONS` (`get_degradation`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from sdejax.sde import SDE, batch_broadcast

Array = jax.Array


def _static(cls):
    """Frozen dataclass registered as a leafless pytree (hashable, part of the jit cache key)."""
    return jax.tree_util.register_static(dataclasses.dataclass(frozen=True)(cls))


class Degradation:
    """Defaults for a deterministic, non-invertible degradation on t ∈ [0, 1]; a subclass defines
    `apply` (and, with `invertible = True`, `noise`, `invert` and perhaps `mix_weight`)."""

    name: ClassVar[str] = "degradation"
    invertible: ClassVar[bool] = False

    @property
    def t_min(self) -> float:
        return 0.0

    @property
    def T(self) -> float:
        return 1.0

    def noise(self, rng: Array, shape: tuple[int, ...], dtype: Any) -> Array | None:
        """No noise: F_t depends on x_0 and t only."""
        return None

    def mix_weight(self, t: Array, s: Array, eta: float | Array) -> Array:
        """ρ = η for every example (the fresh-noise weight of "interp")."""
        return jnp.broadcast_to(jnp.asarray(eta, t.dtype), t.shape)


@_static
class Gaussian(Degradation):
    """x_t = α_t x_0 + σ_t ε, ε ~ N(0, I), with (α_t, σ_t) = `sde.marginal_coeffs(t)` on the SDE's times."""

    sde: SDE
    name: ClassVar[str] = "gaussian"
    invertible: ClassVar[bool] = True

    @property
    def t_min(self) -> float:
        return self.sde.t_min

    @property
    def T(self) -> float:
        return self.sde.T

    def _coeffs(self, t: Array, x: Array) -> tuple[Array, Array]:
        alpha, sigma = self.sde.marginal_coeffs(t)
        return batch_broadcast(alpha, x), batch_broadcast(sigma, x)

    def apply(self, x0: Array, eps: Array, t: Array) -> Array:
        a, s = self._coeffs(t, x0)
        return a * x0 + s * eps

    def noise(self, rng: Array, shape: tuple[int, ...], dtype: Any) -> Array:
        return jax.random.normal(rng, shape, dtype)

    def invert(self, x0: Array, x: Array, t: Array) -> Array:
        """ε = (x_t − α_t x_0)/σ_t (needs σ_t > 0)."""
        a, s = self._coeffs(t, x)
        return (x - a * x0) / s

    def mix_weight(self, t: Array, s: Array, eta: float | Array) -> Array:
        """ρ = η sqrt(1 − (α_t σ_s/(α_s σ_t))²): "interp" is DDIM with η (module docstring)."""
        a_t, s_t = self.sde.marginal_coeffs(t)
        a_s, s_s = self.sde.marginal_coeffs(s)
        ratio = (a_t * s_s) / (a_s * s_t)
        return eta * jnp.sqrt(jnp.maximum(1.0 - ratio**2, 0.0))


_BLUR_SCHEDULES: dict[str, Callable[[Array], Array]] = {"sqrt": jnp.sqrt, "linear": lambda t: t}


@_static
class Blur(Degradation):
    """x_t = G_{σ(t)} * x_0 along `axes` (default (1, 2): NHWC images), one 1-D Gaussian per axis.

    Taps w_k ∝ exp(−k²/(2σ²)), k = −r..r, r = ceil(truncate·σ_max), normalised to Σ w_k = 1 (σ = 0: the
    identity). Boundaries are half-sample symmetric (scipy.ndimage "reflect", numpy "symmetric":
    d c b a | a b c d | d c b a), so each axis is a doubly stochastic n×n matrix: constants and the image
    mean are preserved exactly. σ(t) = σ_max √t ("sqrt": σ² linear in t, the heat equation, i.e. t/Δ
    cumulative blurs of variance σ_max² Δ) or σ_max t ("linear").
    """

    sigma_max: float
    schedule: str = "sqrt"
    axes: tuple[int, ...] = (1, 2)
    truncate: float = 4.0
    name: ClassVar[str] = "blur"

    def __post_init__(self):
        if not (math.isfinite(self.sigma_max) and self.sigma_max >= 0):
            raise ValueError(f"blur: sigma_max must be a finite number >= 0; got {self.sigma_max!r}")
        if self.schedule not in _BLUR_SCHEDULES:
            raise ValueError(f"blur: unknown schedule {self.schedule!r}; valid: {sorted(_BLUR_SCHEDULES)}")
        if not self.truncate > 0:
            raise ValueError(f"blur: truncate must be > 0; got {self.truncate!r}")
        if not self.axes or min(self.axes) < 1:
            raise ValueError(f"blur: axes must be non-empty and not the batch axis 0; got {self.axes!r}")

    @property
    def radius(self) -> int:
        return int(math.ceil(self.truncate * self.sigma_max))

    def sigma(self, t: Array) -> Array:
        """σ(t) of the schedule, (batch,)."""
        return self.sigma_max * _BLUR_SCHEDULES[self.schedule](t)

    def kernel(self, t: Array) -> Array:
        """Taps (batch, 2r + 1), each row summing to 1; σ(t) = 0 gives the unit impulse."""
        k = jnp.arange(-self.radius, self.radius + 1, dtype=t.dtype)
        sig = jnp.maximum(self.sigma(t), 1e-6)[:, None]  # below 1e-6 every tap k ≠ 0 underflows to 0
        w = jnp.exp(-0.5 * (k[None] / sig) ** 2)
        return w / jnp.sum(w, axis=-1, keepdims=True)

    def matrix(self, t: Array, n: int) -> Array:
        """(batch, n, n) blur matrix of one axis of length n: M[i, j] = Σ_{k: refl(i + k) = j} w_k."""
        r = self.radius
        i, k = np.meshgrid(np.arange(n), np.arange(-r, r + 1), indexing="ij")
        j = np.mod(i + k, 2 * n)
        j = np.where(j >= n, 2 * n - 1 - j, j)  # the 2n-periodic mirrored extension
        w = self.kernel(t)
        out = jnp.zeros((t.shape[0], n, n), t.dtype)
        return out.at[:, i, j].add(jnp.broadcast_to(w[:, None, :], (t.shape[0], n, 2 * r + 1)))

    def apply(self, x0: Array, eps: None, t: Array) -> Array:
        x = x0
        for axis in self.axes:
            m = self.matrix(t.astype(x.dtype), x.shape[axis])
            y = jnp.einsum("bij,b...j->b...i", m, jnp.moveaxis(x, axis, -1), precision=jax.lax.Precision.HIGHEST)
            x = jnp.moveaxis(y, -1, axis)
        return x


@_static
class Mask(Degradation):
    """x_t = x_0 with round(t·P) of its P pixels set to `fill`; a pixel is the trailing `event_ndim` axes
    (1: the channels of NHWC images, 0: single tokens). Pixels are masked in the order of a fixed
    permutation (numpy `default_rng(seed)`), so masks are deterministic given t and nest: what is masked
    at t is masked at every t' > t. `fill` may be the MASK index K for integer tokens."""

    fill: float = 0.0
    event_ndim: int = 1
    seed: int = 0
    name: ClassVar[str] = "mask"

    def __post_init__(self):
        if self.event_ndim < 0:
            raise ValueError(f"mask: event_ndim must be >= 0; got {self.event_ndim}")

    def masked(self, t: Array, shape: tuple[int, ...]) -> Array:
        """Bool (batch, *pixel axes, 1, …): True where a pixel is masked at t."""
        if len(shape) - 1 < self.event_ndim:
            raise ValueError(f"mask: x of shape {shape} has fewer than event_ndim = {self.event_ndim} trailing axes")
        pixel_shape = shape[1:len(shape) - self.event_ndim]
        num = math.prod(pixel_shape)
        rank = np.empty(num, np.int32)
        rank[np.random.default_rng(self.seed).permutation(num)] = np.arange(num, dtype=np.int32)
        count = jnp.round(t * num).astype(jnp.int32)
        hidden = jnp.asarray(rank)[None, :] < count[:, None]
        return jnp.reshape(hidden, (t.shape[0], *pixel_shape) + (1,) * self.event_ndim)

    def apply(self, x0: Array, eps: None, t: Array) -> Array:
        return jnp.where(self.masked(t, x0.shape), jnp.asarray(self.fill, x0.dtype), x0)


@dataclasses.dataclass(frozen=True)
class Linear(Degradation):
    """D(x_0, t) = x_0 + t e with a fixed direction e (shape x.shape[1:]; a traced pytree leaf)."""

    e: Array
    name: ClassVar[str] = "linear"

    def apply(self, x0: Array, eps: None, t: Array) -> Array:
        return x0 + batch_broadcast(t, x0) * self.e


jax.tree_util.register_dataclass(Linear, data_fields=["e"], meta_fields=[])


def gaussian(sde: SDE) -> Gaussian:
    """F_t(x_0, ε) = α_t x_0 + σ_t ε of the linear SDE `sde` (its time range)."""
    return Gaussian(sde)


def blur(sigma_max: float, schedule: str = "sqrt", axes: tuple[int, ...] = (1, 2), truncate: float = 4.0) -> Blur:
    """Cold Gaussian blur x_t = G_{σ(t)} * x_0 (`Blur`)."""
    return Blur(float(sigma_max), schedule, tuple(int(a) for a in axes), float(truncate))


def mask(fill: float = 0.0, event_ndim: int = 1, seed: int = 0) -> Mask:
    """Cold pixel masking: a fraction t of the pixels set to `fill`, in a fixed seeded order (`Mask`)."""
    return Mask(fill, int(event_ndim), int(seed))


def linear(e: Array) -> Linear:
    """D(x_0, t) = x_0 + t e (`Linear`)."""
    return Linear(jnp.asarray(e))


DEGRADATIONS: dict[str, Callable[..., Degradation]] = {"gaussian": gaussian, "blur": blur, "mask": mask,
                                                       "linear": linear}


def get_degradation(name: str, **kwargs) -> Degradation:
    """The degradation `name` built with `kwargs` (gaussian: sde=; blur: sigma_max=, …; linear: e=)."""
    if name not in DEGRADATIONS:
        raise ValueError(f"unknown degradation {name!r}; valid: {sorted(DEGRADATIONS)}")
    return DEGRADATIONS[name](**kwargs)
