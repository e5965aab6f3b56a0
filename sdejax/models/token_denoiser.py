"""Small transformer denoiser for masked diffusion over token grids (`sdejax.masked`).

    h₀ = E[z] + P + W_t emb(t);   h_{l+1} = h_l' + MLP(LN(h_l')),  h_l' = h_l + MHA(LN(h_l));   logits = W_out LN(h_L)

z (B, ...) holds tokens in {0..K} (K = MASK), flattened to D positions with a learned position table
P (D, d); E has K+1 rows (MASK is an input), the output has K columns (a real token only: the SUBS
parameterisation, `sdejax.masked.subs_log_probs`, gives MASK zero mass and copies unmasked tokens).
t (B,) enters as a sinusoidal embedding of 1000 t. Output logits (B, ..., K).
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from sdejax.models.layers import timestep_embedding

Array = jax.Array


class TokenDenoiser(nn.Module):
    """Pre-LN transformer: (z (B, ...) ints in 0..K, t (B,)) -> logits (B, ..., K)."""

    num_tokens: int
    features: int = 64
    depth: int = 2
    num_heads: int = 4
    mlp_ratio: int = 4

    @nn.compact
    def __call__(self, z: Array, t: Array, y: Array | None = None, train: bool = False) -> Array:
        del train  # no dropout
        if y is not None:
            raise ValueError("TokenDenoiser is unconditional: it takes no class labels y")
        if t.shape != (z.shape[0],):
            raise ValueError(f"t must have shape ({z.shape[0]},) (one time per example); got {t.shape}")
        tokens = jnp.reshape(z, (z.shape[0], -1))
        dim = tokens.shape[1]
        h = nn.Embed(self.num_tokens + 1, self.features, name="embed")(tokens)
        h = h + self.param("pos", nn.initializers.normal(0.02), (dim, self.features))
        temb = nn.Dense(self.features, name="time")(timestep_embedding(1000.0 * t, self.features))
        h = h + temb[:, None, :]
        for _ in range(self.depth):
            h = h + nn.MultiHeadDotProductAttention(num_heads=self.num_heads)(nn.LayerNorm()(h))
            u = nn.Dense(self.mlp_ratio * self.features)(nn.LayerNorm()(h))
            h = h + nn.Dense(self.features)(nn.gelu(u))
        logits = nn.Dense(self.num_tokens, name="out")(nn.LayerNorm()(h))
        return jnp.reshape(logits, z.shape + (self.num_tokens,))


def param_count(model: nn.Module, shape: tuple[int, ...]) -> int:
    """Number of parameters for inputs of `shape` (B, ...), via `jax.eval_shape` (no initialisation)."""
    z = jnp.zeros(shape, jnp.int32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), z, jnp.zeros((shape[0],)))
    return sum(math.prod(p.shape) for p in jax.tree_util.tree_leaves(shapes))
