"""Diffusion Transformer (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers") in Flax linen.

x (B, H, W, C) → patchify p×p → tokens (B, T, p²C), T = HW/p² → Dense to hidden + fixed 2-D sin-cos position
embedding → N adaLN-Zero blocks → final adaLN layer → Dense to p²·C_out → unpatchify (B, H, W, C_out).
Conditioning c = MLP(sinusoidal₂₅₆(labels)) + E[y] (E has num_classes + 1 rows, y=None → the null class,
`sdejax.models.conditioning`). Block: (β₁, γ₁, α₁, β₂, γ₂, α₂) = Dense₀(SiLU(c));
h ← h + α₁·Attn(LN(h)(1+γ₁)+β₁); h ← h + α₂·MLP(LN(h)(1+γ₂)+β₂), Dense₀ zero-initialised so every block is
the identity at init and the zero-initialised final Dense makes the network output 0 at init.
`labels` are whatever the preconditioner/score function passes (999·t for VP, σ or c_noise for VE/EDM); they
enter only through the sinusoidal embedding (`layers.timestep_embedding`, max period 10⁴), so they should be
O(1)–O(10³) in scale. With learn_sigma the output has 2C channels (prediction first, then the variance
interpolation of Nichol & Dhariwal); sdejax's losses use C, so configs keep learn_sigma = False.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sdejax.models import conditioning
from sdejax.models.layers import timestep_embedding

Array = jax.Array

# name: (depth, hidden_size, num_heads), the paper's Table 1
SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
PATCH_SIZES = (2, 4, 8)
CONFIG_KEYS = frozenset({"size", "patch_size", "mlp_ratio", "learn_sigma", "num_classes", "guidance_embedding",
                         "dtype", "shape"})


def _check_patch(shape: tuple[int, ...], p: int) -> None:
    if p not in PATCH_SIZES:
        raise ValueError(f"patch_size = {p} is not valid; choose from {PATCH_SIZES}")
    if len(shape) != 4 or shape[1] % p or shape[2] % p:
        raise ValueError(f"x must be NHWC with H and W divisible by patch_size = {p}; got x.shape = {shape}")


def patchify(x: Array, p: int) -> Array:
    """(B, H, W, C) → (B, (H/p)(W/p), p·p·C), tokens in row-major patch order, each patch (p, p, C) flattened."""
    _check_patch(x.shape, p)
    b, h, w, c = x.shape
    x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(tokens: Array, p: int, height: int, width: int) -> Array:
    """Inverse of `patchify`: (B, (H/p)(W/p), p·p·C) → (B, H, W, C)."""
    b, t, d = tokens.shape
    _check_patch((b, height, width, 1), p)
    if t != (height // p) * (width // p) or d % (p * p):
        raise ValueError(f"tokens of shape {tokens.shape} do not tile a {height}×{width} image with patch_size {p}")
    c = d // (p * p)
    x = tokens.reshape(b, height // p, width // p, p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, height, width, c)


def sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    """[sin(pos ω_k), cos(pos ω_k)], ω_k = 10000^(−k/(dim/2)), k = 0..dim/2−1; shape (len(pos), dim)."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    args = np.outer(pos.reshape(-1), omega)
    return np.concatenate([np.sin(args), np.cos(args)], axis=1)


def sincos_2d(dim: int, grid_h: int, grid_w: int) -> np.ndarray:
    """Fixed 2-D embedding of token (i, j) (row-major): [sincos_1d(dim/2, j), sincos_1d(dim/2, i)]; (T, dim)."""
    if dim % 4:
        raise ValueError(f"hidden_size must be divisible by 4 for the 2-D sin-cos embedding; got {dim}")
    ii, jj = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
    return np.concatenate([sincos_1d(dim // 2, jj), sincos_1d(dim // 2, ii)], axis=1)


def _modulate(h: Array, shift: Array, scale: Array) -> Array:
    """LN(h)(1 + γ) + β (LayerNorm without affine, ε = 1e-6), γ, β broadcast over tokens."""
    h = nn.LayerNorm(epsilon=1e-6, use_bias=False, use_scale=False)(h)
    return h * (1 + scale[:, None]) + shift[:, None]


def _as_tokens(hint: Array, tokens: Array) -> Array:
    """A ControlNet hint (B, H/p, W/p, D) on the patch grid, or tokens (B, T, D), shaped like `tokens`."""
    b, t, d = tokens.shape
    if hint.shape[0] != b or hint.shape[-1] != d or hint.size != tokens.size:
        raise ValueError(f"hint must be (B, H/p, W/p, hidden) or tokens {tokens.shape}; got {hint.shape}")
    return hint.reshape(tokens.shape).astype(tokens.dtype)


def _zero_dense(features: int, dtype: Any, name: str) -> nn.Dense:
    return nn.Dense(features, kernel_init=nn.initializers.zeros, bias_init=nn.initializers.zeros,
                    dtype=dtype, name=name)


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block; the identity (bitwise) while its adaLN Dense is zero."""

    hidden_size: int
    num_heads: int
    mlp_ratio: float = 4.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h: Array, c: Array) -> Array:
        mod = _zero_dense(6 * self.hidden_size, self.dtype, "adaLN")(nn.silu(c))
        b1, g1, a1, b2, g2, a2 = jnp.split(mod, 6, axis=-1)
        attn = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, dtype=self.dtype,
                                               kernel_init=nn.initializers.xavier_uniform(), name="attn")
        h = h + a1[:, None] * attn(_modulate(h, b1, g1))
        dense = lambda f, n: nn.Dense(f, dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform(), name=n)
        z = dense(int(self.hidden_size * self.mlp_ratio), "fc1")(_modulate(h, b2, g2))
        z = dense(self.hidden_size, "fc2")(nn.gelu(z, approximate=True))
        return h + a2[:, None] * z


class DiT(nn.Module):
    """DiT-{S,B,L,XL}/p; `__call__(x, labels, y=None, train=False)` → (B, H, W, C or 2C). `shape` =
    (depth, hidden_size, num_heads) overrides the named size (tiny models for tests).

    ControlNet hooks (`sdejax.models.controlnet`), all no-ops by default: `control` holds residuals for
    the first len(control) blocks, control[i] added to block i's output before the next block reads it;
    `hint` (B, H/p, W/p, hidden) on the patch grid (or tokens (B, T, hidden)) is added to the input
    tokens; `features_only` returns the list of the blocks' output tokens (B, T, hidden).
    """

    image_size: int
    num_channels: int
    size: str = "S"
    patch_size: int = 2
    mlp_ratio: float = 4.0
    learn_sigma: bool = False
    num_classes: int = 0
    guidance_embedding: bool = False
    dtype: Any = jnp.float32
    shape: Optional[tuple[int, int, int]] = None

    @property
    def dims(self) -> tuple[int, int, int]:
        """(depth, hidden_size, num_heads): `shape`, else the named size's."""
        if self.shape is None and self.size not in SIZES:
            raise ValueError(f"DiT size {self.size!r} is not valid; choose from {sorted(SIZES)}")
        return tuple(self.shape or SIZES[self.size])

    @nn.compact
    def __call__(self, x: Array, labels: Array, y: Optional[Array] = None, train: bool = False,
                 w: Optional[Array] = None, control: Optional[Sequence[Array]] = None,
                 hint: Optional[Array] = None, features_only: bool = False) -> Any:
        depth, hidden, heads = self.dims
        expected = (self.image_size, self.image_size, self.num_channels)
        if x.ndim != 4 or x.shape[1:] != expected:
            raise ValueError(f"x must be NHWC of shape (B, {expected[0]}, {expected[1]}, {expected[2]}), got {x.shape}")
        if labels.shape != (x.shape[0],):
            raise ValueError(f"labels must have shape ({x.shape[0]},), got {labels.shape}")
        control = [] if control is None else list(control)
        if len(control) > depth:
            raise ValueError(f"control holds {len(control)} residuals for a DiT of depth {depth}")
        p, grid = self.patch_size, self.image_size // self.patch_size
        xavier = nn.initializers.xavier_uniform()
        h = nn.Dense(hidden, dtype=self.dtype, kernel_init=xavier, name="patch_embed")(patchify(x, p))
        h = h + jnp.asarray(sincos_2d(hidden, grid, grid), h.dtype)[None]
        if hint is not None:
            h = h + _as_tokens(hint, h)
        temb = timestep_embedding(labels, 256)
        temb = nn.Dense(hidden, dtype=self.dtype, kernel_init=nn.initializers.normal(0.02), name="t_embed_0")(temb)
        c = nn.Dense(hidden, dtype=self.dtype, kernel_init=nn.initializers.normal(0.02),
                     name="t_embed_1")(nn.silu(temb))
        c = conditioning.add_class_embedding(c, y, self.num_classes, self.dtype)
        c = conditioning.add_guidance_embedding(c, w, self.guidance_embedding, 256, dtype=self.dtype)
        states = []
        for i in range(depth):
            h = DiTBlock(hidden, heads, self.mlp_ratio, self.dtype, name=f"block_{i}")(h, c)
            if i < len(control):
                h = h + control[i].astype(h.dtype)
            states.append(h)
        if features_only:
            return states
        shift, scale = jnp.split(_zero_dense(2 * hidden, self.dtype, "final_adaLN")(nn.silu(c)), 2, axis=-1)
        out_ch = self.num_channels * (2 if self.learn_sigma else 1)
        h = _zero_dense(p * p * out_ch, self.dtype, "final_linear")(_modulate(h, shift, scale))
        return unpatchify(h.astype(jnp.float32), p, self.image_size, self.image_size)
