"""Noise-level and class conditioning shared by the U-Nets.

Class conditioning is separate from the noise labels: `y` holds integer classes in
[0, num_classes); the extra index `num_classes` is the *null class* used for classifier-free
guidance (and is what `y=None` means). The class embedding is added to the time embedding:
temb ← temb + E[y].
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from sdejax.sde import smld_sigmas

Array = jax.Array


def null_class(num_classes: int) -> int:
    """Index of the unconditional ("null") class for a model with `num_classes` classes."""
    return num_classes


def add_class_embedding(temb: Array, y: Optional[Array], num_classes: int, dtype: Any) -> Array:
    """temb + E[y] (E has num_classes + 1 rows; y=None selects the null class). Call inside a compact method."""
    if num_classes <= 0:
        if y is not None:
            raise ValueError("class labels y were given but the model has model.num_classes = 0")
        return temb
    if y is None:
        y = jnp.full((temb.shape[0],), null_class(num_classes), dtype=jnp.int32)
    if y.shape != (temb.shape[0],) or not jnp.issubdtype(y.dtype, jnp.integer):
        raise ValueError(f"y must be integer classes of shape ({temb.shape[0]},), got {y.dtype}{tuple(y.shape)}")
    emb = nn.Embed(num_classes + 1, temb.shape[-1], dtype=dtype, name="class_embed")(y)
    return temb + emb


def sigmas_at(labels: Array, sigma_min: float, sigma_max: float, num_scales: int) -> Array:
    """σ[int(labels)] of the descending SMLD table (`sdejax.sde.smld_sigmas`, its one home), with
    truncation, as the reference indexes its sigma table."""
    table = jnp.asarray(smld_sigmas(sigma_min, sigma_max, num_scales)[::-1], dtype=jnp.float32)
    return table[labels.astype(jnp.int32)]
