"""InstanceNorm++ (Song & Ermon 2019), plain or conditioned on a noise-level index.

    μ_c, s_c = per-image channel mean and std (biased) over pixels
    μ̃_c = (μ_c − mean_c μ) / sqrt(var_c μ + 1e-5)        (var over channels: unbiased as PyTorch, or
                                                       biased as score_sde's Flax code: `channel_ddof`)
    y = γ_c ((x − μ_c) / sqrt(s_c² + 1e-5) + α_c μ̃_c) + β_c

With `num_classes > 0`, (γ, α, β) are rows of an embedding indexed by the label (NCSN v1);
otherwise they are parameters (NCSNv2). Statistics run in float32.
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


def _scale_init(key: Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
    """N(1, 0.02²), the reference's init of γ and α."""
    return 1.0 + 0.02 * jax.random.normal(key, shape, dtype)


def _embed_init(key: Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
    """Rows [γ | α | β]: γ, α ~ N(1, 0.02²), β = 0."""
    c = shape[1] // 3
    return jnp.concatenate([_scale_init(key, (shape[0], 2 * c), dtype), jnp.zeros((shape[0], c), dtype)], axis=1)


class InstanceNormPlus(nn.Module):
    """InstanceNorm++ on NHWC; conditional on integer labels when num_classes > 0.

    channel_ddof: 1 (unbiased variance of the channel means, score_sde_pytorch) or 0 (biased, score_sde's Flax).
    """
    num_classes: int = 0
    dtype: Any = jnp.float32
    channel_ddof: int = 1

    @nn.compact
    def __call__(self, x: Array, labels: Optional[Array] = None) -> Array:
        c = x.shape[-1]
        xf = x.astype(jnp.float32)
        means = xf.mean(axis=(1, 2))
        var_means = jnp.var(means, -1, ddof=self.channel_ddof, keepdims=True)
        means_plus = (means - means.mean(-1, keepdims=True)) / jnp.sqrt(var_means + 1e-5)
        h = (xf - means[:, None, None]) / jnp.sqrt(jnp.var(xf, axis=(1, 2), keepdims=True) + 1e-5)
        if self.num_classes > 0:
            if labels is None:
                raise ValueError("conditional InstanceNorm++ needs integer labels")
            gamma, alpha, beta = jnp.split(nn.Embed(self.num_classes, 3 * c, embedding_init=_embed_init,
                                                    name="embed")(labels), 3, axis=-1)
        else:
            gamma = self.param("gamma", _scale_init, (c,))
            alpha = self.param("alpha", _scale_init, (c,))
            beta = self.param("beta", nn.initializers.zeros, (c,))
        h = h + means_plus[:, None, None] * alpha.reshape(-1, 1, 1, c)
        out = gamma.reshape(-1, 1, 1, c) * h + beta.reshape(-1, 1, 1, c)
        return out.astype(self.dtype)
