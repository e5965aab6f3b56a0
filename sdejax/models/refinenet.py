"""RefineNet blocks of NCSN (v1, noise-conditional) and NCSNv2 (unconditional), NHWC.

Every block takes `num_classes`: 0 builds the NCSNv2 variant (plain InstanceNorm++ where the
reference normalises, max-pooling in CRP), > 0 the NCSN v1 variant (InstanceNorm++ conditioned
on the noise index, average pooling in CRP, norms before the convs of RCU/CRP/MSF).
Submodule names follow the PyTorch reference (`1_2_conv`, `convs_0`, `adapt_convs_1`, ...).
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sdejax.models import layers
from sdejax.models.normalization import InstanceNormPlus

Array = jax.Array
Act = Callable[[Array], Array]

# PyTorch's default conv init: U(±1/sqrt(fan_in)).
torch_default_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def ncsn_conv(features: int, kernel_size: int = 3, *, dilation: int = 1, use_bias: bool = True,
              dtype: Any = jnp.float32, name: Optional[str] = None) -> nn.Conv:
    """NCSN conv (PyTorch init, "same" padding = dilation · (k // 2))."""
    return layers.conv(features, kernel_size, dilation=dilation, use_bias=use_bias,
                       kernel_init=torch_default_init, dtype=dtype, name=name)


def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of 1-D linear interpolation with align_corners=True:
    source position of output i is i·(n_in − 1)/(n_out − 1)."""
    m = np.zeros((n_out, n_in), np.float64)
    scale = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
    for i in range(n_out):
        src = i * scale
        lo = min(int(np.floor(src)), n_in - 1)
        hi = min(lo + 1, n_in - 1)
        frac = src - lo
        m[i, lo] += 1.0 - frac
        m[i, hi] += frac
    return m


def resize_bilinear_align_corners(x: Array, size: tuple[int, int]) -> Array:
    """Bilinear resize of NHWC `x` to `size` with corner pixels aligned (PyTorch align_corners=True)."""
    if x.shape[1:3] == tuple(size):
        return x
    mh = jnp.asarray(bilinear_matrix(x.shape[1], size[0]), x.dtype)
    mw = jnp.asarray(bilinear_matrix(x.shape[2], size[1]), x.dtype)
    return jnp.einsum("oh,pw,bhwc->bopc", mh, mw, x, precision=jax.lax.Precision.HIGHEST)


def resize_bilinear(x: Array, size: tuple[int, int], align_corners: bool) -> Array:
    """Bilinear resize of NHWC `x`: corners aligned (PyTorch align_corners=True, score_sde_pytorch) or
    half-pixel centres (`jax.image.resize`, score_sde's Flax code)."""
    if align_corners:
        return resize_bilinear_align_corners(x, size)
    return jax.image.resize(x, (x.shape[0], *size, x.shape[-1]), "bilinear")


def _norm(num_classes: int, dtype: Any, name: str, channel_ddof: int = 1) -> InstanceNormPlus:
    return InstanceNormPlus(num_classes=num_classes, dtype=dtype, channel_ddof=channel_ddof, name=name)


def _pool5(x: Array, maximum: bool) -> Array:
    """5x5 stride-1 pooling with 2-pixel padding (-inf for max, zeros counted for mean)."""
    pad = ((0, 0), (2, 2), (2, 2), (0, 0))
    if maximum:
        return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 5, 5, 1), (1, 1, 1, 1), pad)
    return jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 5, 5, 1), (1, 1, 1, 1), pad) / 25.0


class ConvMeanPool(nn.Module):
    """conv then 2x2 mean pooling; adjust_padding pads top/left by one first (28px images)."""
    features: int
    kernel_size: int = 3
    adjust_padding: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        if self.adjust_padding:
            x = jnp.pad(x, ((0, 0), (1, 0), (1, 0), (0, 0)))
        # Named as the torch module path: `conv` or `conv.1` inside nn.Sequential(ZeroPad2d, conv).
        h = ncsn_conv(self.features, self.kernel_size, dtype=self.dtype,
                      name="conv_1" if self.adjust_padding else "conv")(x)
        return (h[:, ::2, ::2] + h[:, 1::2, ::2] + h[:, ::2, 1::2] + h[:, 1::2, 1::2]) / 4.0


class ResidualBlock(nn.Module):
    """out = shortcut(x) + conv2(act(norm2(conv1(act(norm1(x)))))).

    resample='down' halves the resolution through ConvMeanPool when dilation == 1; with dilation > 1
    it only changes channels (the reference's dilated "down" blocks keep the size). `channel_ddof`
    is that of the InstanceNorm++ layers.
    """
    out_ch: int
    act: Act
    resample: Optional[str] = None
    dilation: int = 1
    adjust_padding: bool = False
    num_classes: int = 0
    dtype: Any = jnp.float32
    channel_ddof: int = 1

    @nn.compact
    def __call__(self, x: Array, labels: Optional[Array] = None) -> Array:
        if self.resample not in (None, "down"):
            raise ValueError(f"resample must be None or 'down', got {self.resample!r}")
        in_ch, dt, d = x.shape[-1], self.dtype, self.dilation
        down = self.resample == "down"
        mid = in_ch if down else self.out_ch
        h = self.act(_norm(self.num_classes, dt, "normalize1", self.channel_ddof)(x, labels))
        h = ncsn_conv(mid, dilation=d, dtype=dt, name="conv1")(h)
        h = self.act(_norm(self.num_classes, dt, "normalize2", self.channel_ddof)(h, labels))
        if down and d == 1:
            h = ConvMeanPool(self.out_ch, 3, self.adjust_padding, dt, name="conv2")(h)
        else:
            h = ncsn_conv(self.out_ch, dilation=d, dtype=dt, name="conv2")(h)
        if in_ch == self.out_ch and not down:
            return x + h
        if down and d == 1:
            shortcut = ConvMeanPool(self.out_ch, 1, self.adjust_padding, dt, name="shortcut")(x)
        elif d > 1:
            shortcut = ncsn_conv(self.out_ch, dilation=d, dtype=dt, name="shortcut")(x)
        else:
            shortcut = ncsn_conv(self.out_ch, 1, dtype=dt, name="shortcut")(x)
        return shortcut + h


class RCUBlock(nn.Module):
    """Residual conv units: n_blocks × (x ← x + [ (norm) → act → conv3x3 ] × n_stages)."""
    n_blocks: int
    n_stages: int
    act: Act
    num_classes: int = 0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, labels: Optional[Array] = None) -> Array:
        c = x.shape[-1]
        for i in range(1, self.n_blocks + 1):
            residual = x
            for j in range(1, self.n_stages + 1):
                if self.num_classes > 0:
                    x = _norm(self.num_classes, self.dtype, f"{i}_{j}_norm")(x, labels)
                x = ncsn_conv(c, use_bias=False, dtype=self.dtype, name=f"{i}_{j}_conv")(self.act(x))
            x = x + residual
        return x


class CRPBlock(nn.Module):
    """Chained residual pooling: x ← act(x); path ← conv(pool5(norm(path))); x ← x + path, n_stages times."""
    n_stages: int
    act: Act
    num_classes: int = 0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, labels: Optional[Array] = None) -> Array:
        x = self.act(x)
        path = x
        for i in range(self.n_stages):
            if self.num_classes > 0:
                path = _norm(self.num_classes, self.dtype, f"norms_{i}")(path, labels)
            path = _pool5(path, maximum=self.num_classes == 0)
            path = ncsn_conv(x.shape[-1], use_bias=False, dtype=self.dtype, name=f"convs_{i}")(path)
            x = path + x
        return x


class MSFBlock(nn.Module):
    """Multi-scale fusion: Σ_i resize_bilinear(conv3x3((norm) x_i), shape), corners aligned or not."""
    features: int
    num_classes: int = 0
    dtype: Any = jnp.float32
    align_corners: bool = True

    @nn.compact
    def __call__(self, xs: Sequence[Array], shape: tuple[int, int], labels: Optional[Array] = None) -> Array:
        total = 0.0
        for i, x in enumerate(xs):
            if self.num_classes > 0:
                x = _norm(self.num_classes, self.dtype, f"norms_{i}")(x, labels)
            h = ncsn_conv(self.features, dtype=self.dtype, name=f"convs_{i}")(x)
            total = total + resize_bilinear(h, shape, self.align_corners)
        return total


class RefineBlock(nn.Module):
    """RefineNet block: RCU(2,2) on each input, multi-scale fusion, CRP(2), RCU(3 if end else 1, 2)."""
    features: int
    act: Act
    start: bool = False
    end: bool = False
    num_classes: int = 0
    dtype: Any = jnp.float32
    align_corners: bool = True

    @nn.compact
    def __call__(self, xs: Sequence[Array], shape: tuple[int, int], labels: Optional[Array] = None) -> Array:
        kw = dict(act=self.act, num_classes=self.num_classes, dtype=self.dtype)
        hs = [RCUBlock(2, 2, name=f"adapt_convs_{i}", **kw)(x, labels) for i, x in enumerate(xs)]
        if self.start:
            if len(hs) != 1:
                raise ValueError("the first RefineBlock takes exactly one input")
            h = hs[0]
        else:
            h = MSFBlock(self.features, self.num_classes, self.dtype, self.align_corners, name="msf")(hs, shape, labels)
        h = CRPBlock(2, name="crp", **kw)(h, labels)
        return RCUBlock(3 if self.end else 1, 2, name="output_convs", **kw)(h, labels)
