"""Noise-level and class conditioning shared by the U-Nets.

Class conditioning is separate from the noise labels: `y` holds integer classes in
[0, num_classes); the extra index `num_classes` is the *null class* used for classifier-free
guidance (and is what `y=None` means). The class embedding is added to the time embedding:
temb ← temb + E[y]. A guidance-weight embedding (latent consistency models: the student of guided
distillation is told the CFG weight w) is added likewise: temb ← temb + W sin/cos(scale·w) + b with
W, b zero-initialised, so a w-conditioned network equals the unconditioned one at initialisation.
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from sdejax.models.layers import timestep_embedding
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


def add_guidance_embedding(temb: Array, w: Optional[Array], enabled: bool, embedding_size: int = 64,
                           scale: float = 1000.0, dtype: Any = jnp.float32) -> Array:
    """temb + Dense₀(sinusoidal(scale·w)) (LCM's w-embedding, `timestep_embedding` of 1000 w), the Dense
    zero-initialised (kernel and bias), so the sum is temb bit for bit at init. Call inside a compact method."""
    if not enabled:
        if w is not None:
            raise ValueError("a guidance weight w was given but the model has model.guidance_embedding = False")
        return temb
    if w is None:
        raise ValueError("model.guidance_embedding = True needs the guidance weight w (batch,)")
    w = jnp.asarray(w)
    if w.shape != (temb.shape[0],):
        raise ValueError(f"w must have shape ({temb.shape[0]},); got {tuple(w.shape)}")
    emb = timestep_embedding(scale * w, embedding_size)
    zeros = nn.initializers.zeros
    return temb + nn.Dense(temb.shape[-1], dtype=dtype, kernel_init=zeros, bias_init=zeros,
                           name="guidance_embed")(emb)


def sigmas_at(labels: Array, sigma_min: float, sigma_max: float, num_scales: int) -> Array:
    """σ[int(labels)] of the descending SMLD table (`sdejax.sde.smld_sigmas`, its one home), with
    truncation, as the reference indexes its sigma table."""
    table = jnp.asarray(smld_sigmas(sigma_min, sigma_max, num_scales)[::-1], dtype=jnp.float32)
    return table[labels.astype(jnp.int32)]
