"""Inverse problems by replacement (score_sde's inpainting and colorization, for any SDE and any
fixed-step solver), with RePaint's resampling as an option.

The known part lives in an orthonormal channel basis M (C × C, M Mᵀ = I): z = x Mᵀ per pixel, and a
mask over z marks the known coordinates with their values y. After every step to time t the known
coordinates are replaced by the data perturbed to t, z_known ← α_t y + σ_t ε (fresh ε), and the
output's by y itself, while the unknown ones keep the solver's (clean, denoised) output — score_sde
built its "denoised" output from the noisy state there. Inpainting: M = I, the mask over pixels.
Colorization: M's first row is (1, 1, 1)/√3, so the known coordinate is √3 · the gray value.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sdejax.sampling.loop import check_x
from sdejax.sde import SDE, batch_broadcast

Array = jax.Array


def colorization_basis() -> np.ndarray:
    """An orthonormal 3 × 3 M with first row (1, 1, 1)/√3 (gray), the others spanning colour."""
    m = np.array([[1, 1, 1], [1, -1, 0], [1, 1, -2]], np.float64)
    return m / np.linalg.norm(m, axis=1, keepdims=True)


class Known(NamedTuple):
    """Known coordinates `values` (z-space, shaped like x; entries outside `mask` are ignored) under
    `mask` (1 known, 0 unknown; broadcastable to x) in the channel basis `basis` (None: identity)."""

    values: Array
    mask: Array
    basis: Array | None = None

    def _to(self, x: Array) -> Array:
        return x if self.basis is None else x @ self.basis.T

    def _from(self, z: Array) -> Array:
        return z if self.basis is None else z @ self.basis

    def project(self, sde: SDE, rng: Array, x: Array, t: Array) -> Array:
        """x with its known coordinates replaced by α_t y + σ_t ε."""
        alpha, sigma = (batch_broadcast(v, x) for v in sde.marginal_coeffs(t))
        noisy = alpha * self.values + sigma * jax.random.normal(rng, x.shape, x.dtype)
        z = self._to(x)
        return self._from(self.mask * noisy + (1 - self.mask) * z)

    def final(self, x: Array) -> Array:
        """x with its known coordinates set to the data y exactly."""
        z = self._to(x)
        return self._from(self.mask * self.values + (1 - self.mask) * z)


def inpainting(data: Array, mask: Array) -> Known:
    """Known pixels `data` where `mask` is 1 (mask broadcastable to data, e.g. (B, H, W, 1))."""
    data = check_x("data", data)
    mask = jnp.broadcast_to(jnp.asarray(mask, data.dtype), data.shape)
    if not bool(jnp.all((mask == 0) | (mask == 1))):
        raise ValueError("mask must hold only 0 (unknown) and 1 (known)")
    return Known(data * mask, mask)


def colorization(gray: Array, num_channels: int = 3) -> Known:
    """Known gray-scale image `gray` (B, ..., 1) = mean over the colour channels: the first coordinate
    in `colorization_basis()` is √3 · gray, the two colour coordinates are unknown."""
    gray = check_x("gray", gray)
    if gray.shape[-1] != 1 or num_channels != 3:
        raise ValueError(f"colorization needs gray of shape (..., 1) and 3 colour channels; got {gray.shape}")
    shape = gray.shape[:-1] + (3,)
    mask = jnp.broadcast_to(jnp.asarray([1.0, 0.0, 0.0], gray.dtype), shape)
    values = jnp.concatenate([np.sqrt(3.0) * gray, jnp.zeros(gray.shape[:-1] + (2,), gray.dtype)], -1)
    return Known(values, mask, jnp.asarray(colorization_basis(), gray.dtype))
