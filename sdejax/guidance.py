"""Guidance as score-function transforms: each takes score functions and returns one, so every
sampler uses it unchanged (`score_fn(x, t)`, a `jax.tree_util.Partial` whose leaves are the inner
score functions' parameters and labels).

Convention: one guidance weight w, the w of Ho & Salimans,

    s̃ = s_c + w (s_c − s_u) = s_u + (1 + w) ∇ₓ log p_t(y | x),

so w = 0 is the conditional score, w = −1 the unconditional one. Other conventions: diffusers'
`guidance_scale` g = 1 + w (ε̃ = ε_u + g(ε_c − ε_u)); classifier guidance with scale γ on the
unconditional score equals CFG with w = γ − 1. Plain CFG is affine in the prediction at fixed
(x, t) with weights summing to one, so it gives the same result applied to ε, x₀, v or the score;
the rescale of Lin et al. is not, so it names its space.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from sdejax.score import convert
from sdejax.sde import SDE, ScoreFn, batch_broadcast

Array = jax.Array
Interval = tuple[float, float] | None
RESCALE_SPACES = ("eps", "x0", "v", "score")


def check_classes(name: str, y, batch: int, num_classes: int) -> Array:
    """`y` as int32 classes of shape (batch,) in [0, num_classes), else a ValueError naming it."""
    y = jnp.asarray(y)
    if y.shape != (batch,) or not jnp.issubdtype(y.dtype, jnp.integer):
        raise ValueError(f"{name} must be integer classes of shape ({batch},); got {y.dtype}{tuple(y.shape)}")
    if not isinstance(y, jax.core.Tracer):  # values are checked where they are known (outside jit)
        v = np.asarray(y)
        if v.size and (v.min() < 0 or v.max() >= num_classes):
            raise ValueError(f"{name} must lie in [0, {num_classes}); got values in [{v.min()}, {v.max()}]")
    return y.astype(jnp.int32)


def edm_sigma(sde: SDE, t: Array) -> Array:
    """σ̃(t) = σ_t / α_t: the noise level of EDM's scaled variable x/α, in which intervals are stated."""
    alpha, sigma = sde.marginal_coeffs(t)
    return sigma / alpha


def _in_interval(sde: SDE, t: Array, interval: Interval) -> Array:
    lo, hi = interval
    s = edm_sigma(sde, t)
    return (s > lo) & (s <= hi)


def _rescale(sde: SDE, x: Array, t: Array, guided: Array, cond: Array, phi: float, space: str) -> Array:
    """Lin et al.'s rescale in `space`: g_r = g·std(c)/std(g) per example, then φ g_r + (1 − φ) g."""
    alpha, sigma = sde.marginal_coeffs(t)
    g, c = (convert(v, "score", space, x, alpha, sigma) for v in (guided, cond))
    std = lambda v: jnp.std(jnp.reshape(v, (v.shape[0], -1)), axis=-1)  # noqa: E731
    ratio = batch_broadcast(std(c) / std(g), g)
    return convert(phi * g * ratio + (1.0 - phi) * g, space, "score", x, alpha, sigma)


def _check_interval(interval: Interval) -> Interval:
    if interval is None:
        return None
    lo, hi = (float(v) for v in interval)
    if not 0.0 <= lo < hi:
        raise ValueError(f"interval must be (sigma_lo, sigma_hi) with 0 <= sigma_lo < sigma_hi; got {interval}")
    return lo, hi


@dataclasses.dataclass(frozen=True)
class _CFG:
    sde: SDE
    w: float
    rescale: float
    space: str
    interval: Interval

    def __call__(self, cond: ScoreFn, uncond: ScoreFn, x: Array, t: Array) -> Array:
        def guided(x):
            c, u = cond(x, t), uncond(x, t)
            g = c + self.w * (c - u)
            if self.rescale:
                g = _rescale(self.sde, x, t, g, c, self.rescale, self.space)
            return g if self.interval is None else jnp.where(
                batch_broadcast(_in_interval(self.sde, t, self.interval), x), g, c)

        if self.interval is None:
            return guided(x)
        # Outside the interval only the conditional score is evaluated (the unconditional one is skipped).
        return jax.lax.cond(jnp.any(_in_interval(self.sde, t, self.interval)), guided, lambda x: cond(x, t), x)


def cfg(sde: SDE, cond_score: ScoreFn, uncond_score: ScoreFn, w: float, *, rescale: float = 0.0,
        space: str = "eps", interval: Interval = None) -> Partial:
    """Classifier-free guidance s̃ = s_c + w(s_c − s_u) (module docstring for the convention).

    `rescale` φ ∈ [0, 1]: Lin et al.'s rescale of the guided prediction to the per-example standard
    deviation of the conditional one, applied in `space` (one of RESCALE_SPACES; diffusers rescales
    the network's own output, ε for ε-models). `interval=(σ_lo, σ_hi)`: guidance only where
    σ_lo < σ̃(t) ≤ σ_hi (σ̃ = σ_t/α_t, EDM's σ), the conditional score elsewhere (Kynkäänniemi et al.).
    """
    if space not in RESCALE_SPACES:
        raise ValueError(f"unknown rescale space {space!r}; valid: {list(RESCALE_SPACES)}")
    if not 0.0 <= rescale <= 1.0:
        raise ValueError(f"rescale must be in [0, 1]; got {rescale}")
    return Partial(_CFG(sde, float(w), float(rescale), space, _check_interval(interval)), cond_score, uncond_score)


@dataclasses.dataclass(frozen=True)
class _ClassifierGuidance:
    scale: float

    def __call__(self, score_fn: ScoreFn, log_prob_fn, y: Array, x: Array, t: Array) -> Array:
        def log_p(x):
            logits = log_prob_fn(x, t)
            return jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), y[:, None], axis=-1))

        return score_fn(x, t) + self.scale * jax.grad(log_p)(x)


def classifier_guidance(score_fn: ScoreFn, log_prob_fn, y: Array, scale: float = 1.0) -> Partial:
    """s̃ = s + γ ∇ₓ log p_φ(y | x_t, t), with `log_prob_fn(x, t)` the logits (B, K) of a
    noise-conditional classifier (normalised here by log-softmax) and `y` the classes (B,).

    With the exact classifier and γ = 1 this is the class-conditional score; γ = 1 + w equals CFG(w).
    """
    y = jnp.asarray(y)
    if y.ndim != 1 or not jnp.issubdtype(y.dtype, jnp.integer):
        raise ValueError(f"y must be integer classes of shape (batch,); got {y.dtype}{tuple(y.shape)}")
    return Partial(_ClassifierGuidance(float(scale)), score_fn, log_prob_fn, y.astype(jnp.int32))


@dataclasses.dataclass(frozen=True)
class _Threshold:
    sde: SDE
    lo: float
    hi: float
    percentile: float | None

    def x0(self, x0: Array) -> Array:
        center, half = (self.hi + self.lo) / 2, (self.hi - self.lo) / 2
        u = (x0 - center) / half
        if self.percentile is None:
            return center + half * jnp.clip(u, -1.0, 1.0)
        flat = jnp.abs(jnp.reshape(u, (u.shape[0], -1)))
        s = batch_broadcast(jnp.maximum(jnp.quantile(flat, self.percentile, axis=-1), 1.0), u)
        return center + half * jnp.clip(u, -s, s) / s

    def __call__(self, score_fn: ScoreFn, x: Array, t: Array) -> Array:
        alpha, sigma = self.sde.marginal_coeffs(t)
        x0 = self.x0(convert(score_fn(x, t), "score", "x0", x, alpha, sigma))
        return convert(x0, "x0", "score", x, alpha, sigma)


def threshold(sde: SDE, score_fn: ScoreFn, lo: float = -1.0, hi: float = 1.0, percentile: float | None = None
              ) -> Partial:
    """The score whose Tweedie estimate is x̂₀ thresholded to [lo, hi]: s̃ = (α x̂₀' − x)/σ².

    Static (`percentile=None`): x̂₀' = clip(x̂₀, lo, hi). Dynamic (Imagen): with u = (x̂₀ − c)/h the
    estimate in units of the range (c, h its centre and half-width) and s = max(1, quantile_p |u|)
    per example, u' = clip(u, −s, s)/s. Every sampler that reads x̂₀ through the score then sees x̂₀'.
    """
    lo, hi = float(lo), float(hi)
    if not lo < hi:
        raise ValueError(f"threshold needs lo < hi; got ({lo}, {hi})")
    if percentile is not None and not 0.0 < percentile <= 1.0:
        raise ValueError(f"percentile must be in (0, 1]; got {percentile}")
    return Partial(_Threshold(sde, lo, hi, None if percentile is None else float(percentile)), score_fn)
