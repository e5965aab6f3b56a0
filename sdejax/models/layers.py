"""Building blocks of the DDPM / NCSN++ / DDPM++ U-Nets (NHWC).

Submodule names follow the PyTorch reference (`Conv_0`, `GroupNorm_1`, `NIN_3`, ...) so that
`sdejax.models.convert` can map state dicts name by name. Parameters are float32; `dtype` is the
compute dtype. Group-norm statistics, softmax and the noise-level embeddings run in float32.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sdejax.models import up_down

Array = jax.Array
Dtype = Any

ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "elu": nn.elu,
    "relu": nn.relu,
    "lrelu": lambda x: nn.leaky_relu(x, negative_slope=0.2),
    "swish": nn.swish,
}


def get_act(name: str) -> Callable[[Array], Array]:
    """Activation by its config name (`elu`, `relu`, `lrelu`, `swish`)."""
    try:
        return ACTIVATIONS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown nonlinearity {name!r}; valid: {sorted(ACTIVATIONS)}") from None


def default_init(scale: float = 1.0) -> Callable[..., Array]:
    """DDPM initialiser: variance scaling, fan_avg, uniform; Var = scale / ((fan_in + fan_out)/2).

    scale 0 means 1e-10 (the reference's "zero" init that keeps gradients alive).
    """
    return nn.initializers.variance_scaling(1e-10 if scale == 0 else scale, "fan_avg", "uniform")


def conv(features: int, kernel_size: int = 3, *, stride: int = 1, padding: int | None = None,
         dilation: int = 1, use_bias: bool = True, init_scale: float = 1.0, dtype: Dtype = jnp.float32,
         kernel_init: Callable[..., Array] | None = None, name: str | None = None) -> nn.Conv:
    """Conv2d with torch-style symmetric zero padding (default: "same" for odd kernels)."""
    pad = dilation * (kernel_size // 2) if padding is None else padding
    return nn.Conv(features, (kernel_size, kernel_size), strides=(stride, stride),
                   padding=((pad, pad), (pad, pad)), kernel_dilation=(dilation, dilation),
                   use_bias=use_bias, kernel_init=kernel_init or default_init(init_scale),
                   dtype=dtype, name=name)


def group_norm(channels: int, groups: Optional[int] = None, *, dtype: Dtype = jnp.float32,
               name: str | None = None) -> nn.GroupNorm:
    """GroupNorm(eps=1e-6) with fp32 statistics; groups=None -> min(C // 4, 32) as in NCSN++."""
    num_groups = groups if groups is not None else min(channels // 4, 32)
    return nn.GroupNorm(num_groups=num_groups, epsilon=1e-6, dtype=dtype, use_fast_variance=False, name=name)


def timestep_embedding(t: Array, dim: int, max_positions: int = 10000) -> Array:
    """Sinusoidal embedding [sin(t ω_i), cos(t ω_i)], ω_i = max_positions^(-i/(dim/2 - 1)); fp32."""
    if t.ndim != 1:
        raise ValueError(f"timestep_embedding expects labels of shape (batch,), got {t.shape}")
    half = dim // 2
    freqs = jnp.exp(jnp.arange(half, dtype=jnp.float32) * -(math.log(max_positions) / (half - 1)))
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=1)
    return jnp.pad(emb, ((0, 0), (0, dim % 2)))


class GaussianFourierProjection(nn.Module):
    """Random Fourier features [sin(2π W x), cos(2π W x)] with frozen W ~ N(0, scale²).

    W lives in the `constants` collection (never trained; counted in the parameter total).
    """
    embedding_size: int = 256
    scale: float = 1.0

    @nn.compact
    def __call__(self, x: Array) -> Array:
        w = self.variable("constants", "W",
                          lambda: jax.random.normal(self.make_rng("params"), (self.embedding_size,)) * self.scale)
        proj = x.astype(jnp.float32)[:, None] * jax.lax.stop_gradient(w.value)[None, :] * 2 * np.pi
        return jnp.concatenate([jnp.sin(proj), jnp.cos(proj)], axis=-1)


class NIN(nn.Module):
    """Network-in-network (per-pixel linear map over channels): y = x W + b, W of shape (in, out)."""
    num_units: int
    init_scale: float = 0.1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        w = self.param("W", default_init(self.init_scale), (x.shape[-1], self.num_units))
        b = self.param("b", nn.initializers.zeros, (self.num_units,))
        return jnp.einsum("...c,cd->...d", x.astype(self.dtype), w.astype(self.dtype)) + b.astype(self.dtype)


class AttnBlock(nn.Module):
    """Single-head self-attention over pixels: x + NIN(softmax(q kᵀ / √C) v), optionally / √2.

    DDPM: groups=32, skip_rescale=False, init_scale=0. NCSN++ ("AttnBlockpp"): groups=None.
    """
    groups: Optional[int] = None
    skip_rescale: bool = False
    init_scale: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b, hgt, wid, c = x.shape
        h = group_norm(c, self.groups, dtype=self.dtype, name="GroupNorm_0")(x)
        q = NIN(c, dtype=self.dtype, name="NIN_0")(h).reshape(b, hgt * wid, c)
        k = NIN(c, dtype=self.dtype, name="NIN_1")(h).reshape(b, hgt * wid, c)
        v = NIN(c, dtype=self.dtype, name="NIN_2")(h).reshape(b, hgt * wid, c)
        logits = jnp.einsum("bic,bjc->bij", q, k).astype(jnp.float32) * (c ** -0.5)
        weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        h = jnp.einsum("bij,bjc->bic", weights, v).reshape(b, hgt, wid, c)
        h = NIN(c, init_scale=self.init_scale, dtype=self.dtype, name="NIN_3")(h)
        out = x + h
        return out / np.sqrt(2.0) if self.skip_rescale else out


class Upsample(nn.Module):
    """2x upsampling: nearest (+ conv3x3) or FIR (with a fused FIR conv when with_conv)."""
    out_ch: Optional[int] = None
    with_conv: bool = False
    fir: bool = False
    fir_kernel: tuple[int, ...] = (1, 3, 3, 1)
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        out_ch = self.out_ch or x.shape[-1]
        if not self.fir:
            h = up_down.naive_upsample_2d(x)
            return conv(out_ch, dtype=self.dtype, name="Conv_0")(h) if self.with_conv else h
        if self.with_conv:
            return up_down.FIRConv2d(out_ch, up=True, resample_kernel=self.fir_kernel,
                                     kernel_init=default_init(), dtype=self.dtype, name="Conv2d_0")(x)
        return up_down.upsample_2d(x, self.fir_kernel)


class Downsample(nn.Module):
    """2x downsampling: pad (0,1) + strided conv3x3 or 2x2 average, or FIR (with fused FIR conv)."""
    out_ch: Optional[int] = None
    with_conv: bool = False
    fir: bool = False
    fir_kernel: tuple[int, ...] = (1, 3, 3, 1)
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        out_ch = self.out_ch or x.shape[-1]
        if not self.fir:
            if not self.with_conv:
                return up_down.naive_downsample_2d(x)
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))  # emulate TF "SAME" for stride 2
            return conv(out_ch, stride=2, padding=0, dtype=self.dtype, name="Conv_0")(x)
        if self.with_conv:
            return up_down.FIRConv2d(out_ch, down=True, resample_kernel=self.fir_kernel,
                                     kernel_init=default_init(), dtype=self.dtype, name="Conv2d_0")(x)
        return up_down.downsample_2d(x, self.fir_kernel)


class Combine(nn.Module):
    """Merge the input pyramid into the main path: conv1x1(x) concatenated with, or added to, y."""
    method: str = "cat"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, y: Array) -> Array:
        h = conv(y.shape[-1], 1, dtype=self.dtype, name="Conv_0")(x)
        if self.method == "cat":
            return jnp.concatenate([h, y], axis=-1)
        if self.method == "sum":
            return h + y
        raise ValueError(f"unknown combine method {self.method!r}; valid: ['cat', 'sum']")


def _add_temb(h: Array, temb: Optional[Array], act: Callable[[Array], Array], dtype: Dtype) -> Array:
    """h + Dense(act(temb)) broadcast over pixels (the per-channel noise-level bias)."""
    if temb is None:
        return h
    return h + nn.Dense(h.shape[-1], kernel_init=default_init(), dtype=dtype, name="Dense_0")(act(temb))[:, None, None, :]


class ResnetBlockDDPM(nn.Module):
    """DDPM residual block: h = conv(act(GN(x))) + Dense(act(temb)); h = conv(dropout(act(GN(h))));
    out = shortcut(x) + h (divided by √2 with skip_rescale). Shortcut: NIN, or conv3x3 (conv_shortcut).

    DDPM: groups=32, skip_rescale=False, init_scale=0. DDPM++: groups=None (min(C/4, 32)).
    """
    act: Callable[[Array], Array]
    out_ch: Optional[int] = None
    conv_shortcut: bool = False
    dropout: float = 0.1
    skip_rescale: bool = False
    init_scale: float = 0.0
    groups: Optional[int] = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, temb: Optional[Array] = None, train: bool = False) -> Array:
        in_ch = x.shape[-1]
        out_ch = self.out_ch or in_ch
        h = self.act(group_norm(in_ch, self.groups, dtype=self.dtype, name="GroupNorm_0")(x))
        h = conv(out_ch, dtype=self.dtype, name="Conv_0")(h)
        h = _add_temb(h, temb, self.act, self.dtype)
        h = self.act(group_norm(out_ch, self.groups, dtype=self.dtype, name="GroupNorm_1")(h))
        h = nn.Dropout(self.dropout, name="Dropout_0")(h, deterministic=not train)
        h = conv(out_ch, init_scale=self.init_scale, dtype=self.dtype, name="Conv_1")(h)
        if in_ch != out_ch:
            x = (conv(out_ch, dtype=self.dtype, name="Conv_2")(x) if self.conv_shortcut
                 else NIN(out_ch, dtype=self.dtype, name="NIN_0")(x))
        out = x.astype(h.dtype) + h
        return out / np.sqrt(2.0) if self.skip_rescale else out


class ResnetBlockBigGAN(nn.Module):
    """BigGAN residual block (optionally 2x up/down inside, FIR or naive):
    h = conv(resample(act(GN(x)))) + Dense(act(temb)); h = conv(dropout(act(GN(h))));
    out = (conv1x1(resample(x)) + h) / √2 (skip_rescale)."""
    act: Callable[[Array], Array]
    out_ch: Optional[int] = None
    up: bool = False
    down: bool = False
    dropout: float = 0.1
    fir: bool = False
    fir_kernel: tuple[int, ...] = (1, 3, 3, 1)
    skip_rescale: bool = True
    init_scale: float = 0.0
    dtype: Dtype = jnp.float32

    def _resample(self, x: Array) -> Array:
        if self.up:
            return up_down.upsample_2d(x, self.fir_kernel) if self.fir else up_down.naive_upsample_2d(x)
        if self.down:
            return up_down.downsample_2d(x, self.fir_kernel) if self.fir else up_down.naive_downsample_2d(x)
        return x

    @nn.compact
    def __call__(self, x: Array, temb: Optional[Array] = None, train: bool = False) -> Array:
        in_ch = x.shape[-1]
        out_ch = self.out_ch or in_ch
        h = self.act(group_norm(in_ch, dtype=self.dtype, name="GroupNorm_0")(x))
        h = self._resample(h)
        x = self._resample(x)
        h = conv(out_ch, dtype=self.dtype, name="Conv_0")(h)
        h = _add_temb(h, temb, self.act, self.dtype)
        h = self.act(group_norm(out_ch, dtype=self.dtype, name="GroupNorm_1")(h))
        h = nn.Dropout(self.dropout, name="Dropout_0")(h, deterministic=not train)
        h = conv(out_ch, init_scale=self.init_scale, dtype=self.dtype, name="Conv_1")(h)
        if in_ch != out_ch or self.up or self.down:
            x = conv(out_ch, 1, dtype=self.dtype, name="Conv_2")(x)
        out = x.astype(h.dtype) + h
        return out / np.sqrt(2.0) if self.skip_rescale else out


def add_control(hs: list[Array], h: Array, control: Sequence[Array]) -> tuple[list[Array], Array]:
    """(hs[i] + control[i], h + control[-1]): ControlNet's residuals on the skips and the middle block."""
    if len(control) != len(hs) + 1:
        raise ValueError(f"control must hold {len(hs) + 1} residuals ({len(hs)} skips + the middle block); "
                         f"got {len(control)}")
    return [a + c.astype(a.dtype) for a, c in zip(hs, control)], h + control[-1].astype(h.dtype)
