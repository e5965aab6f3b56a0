"""Preconditioning: how a network sees (x_t, t) and what its output means.

A network F is wrapped as (Karras et al. 2022, EDM, generalised to any α_t):

    prediction(x_t, t) = c_skip(t) · x_t + c_out(t) · F(c_in(t) · x_t, c_noise(t)),

where `prediction` is of the kind `output` ("score", "eps", "x0" or "v", see `sdejax.score`).
Plain outputs have c_in = 1, c_skip = 0, c_out = 1. With `sigma_data` set, the EDM scalings act on
the VE-form variables x̃ = x/α, σ̃ = σ/α and predict x₀:

    c_in = 1/(α sqrt(σ̃² + σ_d²)),  c_skip = σ_d² / (α (σ̃² + σ_d²)),  c_out = σ̃ σ_d / sqrt(σ̃² + σ_d²).

A consistency model (Song et al. 2023) sets `sigma_min` as well: the boundary-shifted scalings

    c_skip = σ_d² / (α ((σ̃ − σ_min)² + σ_d²)),  c_out = (σ̃ − σ_min) σ_d / sqrt(σ̃² + σ_d²)

(c_in, c_noise as EDM's) give c_skip = 1/α, c_out = 0 at σ̃ = σ_min, so f(x, σ_min) = x/α exactly.

`labels` names the noise conditioning c_noise and where (α, σ) come from (`LABELS`):

    time        999 t/T, schedule (α, σ)                 score_sde continuous VP / sub-VP
    sigma       σ_t, schedule (α, σ)                     score_sde continuous VE
    smld_index  round((T − t)(N − 1)), σ from the SMLD table (descending)   score_sde discrete VE
    ddpm_index  t(N − 1)/T, (α, σ) = sqrt(ᾱ), sqrt(1 − ᾱ) at int(t(N − 1)/T)  score_sde discrete VP
    chain_time  t(N − 1)/T, schedule (α, σ)               a discrete chain's timestep (DiscreteVPSDE)
    edm         ¼ ln σ̃, schedule (α, σ)                  EDM

Every SDE names its default through `sde.default_precond(continuous)`, so nothing asks which
class an SDE is. Losses regress F on F_target = (target − c_skip x_t)/c_out (`target_F`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

Array = jax.Array
PREDICTIONS = ("score", "eps", "x0", "v")


def _time(sde: Any, t: Array) -> tuple[Array, Array, Array]:
    alpha, sigma = sde.marginal_coeffs(t)
    return 999.0 * t / sde.T, alpha, sigma


def _sigma(sde: Any, t: Array) -> tuple[Array, Array, Array]:
    alpha, sigma = sde.marginal_coeffs(t)
    return sigma, alpha, sigma


def _smld_index(sde: Any, t: Array) -> tuple[Array, Array, Array]:
    labels = jnp.round((sde.T - t) * (sde.N - 1) / sde.T).astype(jnp.int32)
    sigma = jnp.asarray(sde.discrete_sigmas[::-1], t.dtype)[labels]
    return labels, jnp.ones_like(sigma), sigma


def _ddpm_index(sde: Any, t: Array) -> tuple[Array, Array, Array]:
    labels = t * (sde.N - 1) / sde.T
    abar = jnp.asarray(sde.alphas_cumprod, t.dtype)[labels.astype(jnp.int32)]
    return labels, jnp.sqrt(abar), jnp.sqrt(1.0 - abar)


def _chain_time(sde: Any, t: Array) -> tuple[Array, Array, Array]:
    alpha, sigma = sde.marginal_coeffs(t)
    return t * (sde.N - 1) / sde.T, alpha, sigma


def _edm(sde: Any, t: Array) -> tuple[Array, Array, Array]:
    alpha, sigma = sde.marginal_coeffs(t)
    return 0.25 * jnp.log(sigma / alpha), alpha, sigma


LABELS: dict[str, Callable[[Any, Array], tuple[Array, Array, Array]]] = {
    "time": _time, "sigma": _sigma, "smld_index": _smld_index, "ddpm_index": _ddpm_index,
    "chain_time": _chain_time, "edm": _edm,
}


def check_prediction(kind: str) -> None:
    if kind not in PREDICTIONS:
        raise ValueError(f"unknown prediction {kind!r}; valid: {list(PREDICTIONS)}")


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class Precond:
    """c_in, c_noise, c_skip, c_out and the output kind (module docstring). Hashable and jit-static."""

    output: str = "eps"
    labels: str = "time"
    sigma_data: float | None = None
    sigma_min: float | None = None

    def __post_init__(self):
        check_prediction(self.output)
        if self.labels not in LABELS:
            raise ValueError(f"unknown noise labels {self.labels!r}; valid: {sorted(LABELS)}")
        if self.sigma_data is not None and not (self.sigma_data > 0 and self.output == "x0"):
            raise ValueError(f"EDM scalings need sigma_data > 0 and output 'x0'; got sigma_data={self.sigma_data}, "
                             f"output={self.output!r}")
        if self.sigma_min is not None and not (self.sigma_data is not None and self.sigma_min > 0):
            raise ValueError(f"the consistency boundary sigma_min needs sigma_data set and sigma_min > 0; got "
                             f"sigma_min={self.sigma_min}, sigma_data={self.sigma_data}")

    # Named constructors -------------------------------------------------------------------------
    @classmethod
    def plain(cls, output: str = "eps", labels: str = "time") -> "Precond":
        """The network outputs `output` directly from (x_t, c_noise)."""
        return cls(output, labels)

    @classmethod
    def score_sde_ve(cls, continuous: bool = True) -> "Precond":
        """score_sde's VE convention: score output, labels σ(t) (continuous) or the SMLD index."""
        return cls("score", "sigma" if continuous else "smld_index")

    @classmethod
    def score_sde_vp(cls, continuous: bool = True) -> "Precond":
        """score_sde's VP / sub-VP convention: ε output, labels 999 t (continuous) or t(N − 1) (DDPM)."""
        return cls("eps", "time" if continuous else "ddpm_index")

    @classmethod
    def edm(cls, sigma_data: float = 0.5) -> "Precond":
        """EDM's preconditioning: x₀ output, c_noise = ¼ ln σ̃, scalings with σ_data."""
        return cls("x0", "edm", float(sigma_data))

    @classmethod
    def consistency(cls, sigma_data: float = 0.5, sigma_min: float = 0.002) -> "Precond":
        """A consistency model's: EDM's with c_skip, c_out shifted so that f(x, σ_min) = x (module docstring)."""
        return cls("x0", "edm", float(sigma_data), float(sigma_min))

    # The maps ------------------------------------------------------------------------------------
    def inputs(self, sde: Any, t: Array) -> tuple[Array, Array, Array]:
        """(c_noise labels, α, σ) at times t of shape (batch,)."""
        return LABELS[self.labels](sde, t)

    def scalings(self, alpha: Array, sigma: Array) -> tuple[Array, Array, Array]:
        """(c_in, c_skip, c_out) per example."""
        if self.sigma_data is None:
            one = jnp.ones_like(sigma)
            return one, jnp.zeros_like(sigma), one
        sd2, st = self.sigma_data**2, sigma / alpha
        norm = st**2 + sd2
        if self.sigma_min is not None:  # consistency boundary: c_skip = 1/α, c_out = 0 at σ̃ = σ_min
            shift = st - self.sigma_min
            return (1.0 / (alpha * jnp.sqrt(norm)), sd2 / (alpha * (shift**2 + sd2)),
                    shift * self.sigma_data / jnp.sqrt(norm))
        return 1.0 / (alpha * jnp.sqrt(norm)), sd2 / (alpha * norm), st * self.sigma_data / jnp.sqrt(norm)

    def apply(self, net: Callable[[Array, Array], Array], sde: Any, x: Array, t: Array) -> tuple[Array, Array, Array]:
        """(prediction of kind `output`, α, σ) at (x, t) for the network `net(x_in, labels)`."""
        labels, alpha, sigma = self.inputs(sde, t)
        if self.sigma_data is None:  # plain output: the network's value itself, bit for bit
            return net(x, labels), alpha, sigma
        c_in, c_skip, c_out = (_b(v, x) for v in self.scalings(alpha, sigma))
        return c_skip * x + c_out * net(c_in * x, labels), alpha, sigma

    def target_F(self, target: Array, x: Array, alpha: Array, sigma: Array) -> Array:
        """The regression target of F for a target of kind `output`: (target − c_skip x)/c_out."""
        _, c_skip, c_out = (_b(v, x) for v in self.scalings(alpha, sigma))
        return (target - c_skip * x) / c_out

    def output_scale(self, alpha: Array, sigma: Array) -> Array:
        """c_out per example (errors in F are errors in the prediction divided by c_out)."""
        return self.scalings(alpha, sigma)[2]


def _b(v: Array, x: Array) -> Array:
    return jnp.reshape(v, v.shape + (1,) * (x.ndim - v.ndim))


def edm_weight(sigma: Array, sigma_data: float) -> Array:
    """EDM's loss weight λ(σ) = (σ² + σ_d²)/(σ σ_d)² on ‖x̂₀ − x₀‖² (λ c_out² = 1)."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def lognormal_sigmas(u: Array, p_mean: float = -1.2, p_std: float = 1.2) -> Array:
    """EDM's training noise levels ln σ̃ ~ N(P_mean, P_std²) from standard normals u."""
    return jnp.exp(p_mean + p_std * u)


__all__ = ["LABELS", "PREDICTIONS", "Precond", "check_prediction", "edm_weight", "lognormal_sigmas"]
