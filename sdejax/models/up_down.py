"""FIR up/down-sampling (StyleGAN2 style, as used by NCSN++), written in pure JAX on NHWC arrays.

`upfirdn2d(x, k, up, down, pad)` upsamples by inserting `up - 1` zeros after every pixel, pads,
convolves every channel with the 2-D FIR kernel `k` and keeps every `down`-th pixel:

    y = downsample_down( pad(upsample_up(x)) * k )

The naive variants (`naive_upsample_2d`, `naive_downsample_2d`) are nearest-neighbour repetition
and 2x2 average pooling. `FIRConv2d` fuses a 3x3 convolution with the FIR resampling.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def setup_kernel(k: Sequence[float]) -> np.ndarray:
    """Separable 1-D taps -> normalised 2-D kernel: K = k kᵀ / sum(k kᵀ)."""
    k = np.asarray(k, dtype=np.float32)
    if k.ndim == 1:
        k = np.outer(k, k)
    if k.ndim != 2 or k.shape[0] != k.shape[1]:
        raise ValueError(f"FIR kernel must be 1-D or square 2-D, got shape {k.shape}")
    return k / np.sum(k)


def upfirdn2d(x: Array, k: np.ndarray, up: int = 1, down: int = 1, pad: tuple[int, int] = (0, 0)) -> Array:
    """Upsample (zero insertion), pad, convolve with `k` (true convolution) and downsample.

    Pads may be negative-free only (as all uses here). Output size per axis:
    (n·up + pad0 + pad1 − kh) // down + 1.
    """
    c = x.shape[-1]
    kernel = jnp.asarray(np.flip(k, (0, 1)).copy(), dtype=x.dtype)  # convolution = correlation with flipped k
    kernel = jnp.tile(kernel[:, :, None, None], (1, 1, 1, c))
    pad0, pad1 = pad
    # lhs_dilation puts zeros *between* samples; upfirdn also appends `up - 1` trailing zeros.
    padding = ((pad0, pad1 + up - 1), (pad0, pad1 + up - 1))
    return jax.lax.conv_general_dilated(
        x, kernel, window_strides=(down, down), padding=padding, lhs_dilation=(up, up),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c,
        precision=jax.lax.Precision.HIGHEST)


def upsample_2d(x: Array, k: Sequence[float], factor: int = 2) -> Array:
    """FIR upsampling by `factor`; constant images stay constant (kernel gain factor²)."""
    kernel = setup_kernel(k) * factor ** 2
    p = kernel.shape[0] - factor
    return upfirdn2d(x, kernel, up=factor, pad=((p + 1) // 2 + factor - 1, p // 2))


def downsample_2d(x: Array, k: Sequence[float], factor: int = 2) -> Array:
    """FIR downsampling by `factor` (anti-aliasing filter, then stride)."""
    kernel = setup_kernel(k)
    p = kernel.shape[0] - factor
    return upfirdn2d(x, kernel, down=factor, pad=((p + 1) // 2, p // 2))


def naive_upsample_2d(x: Array, factor: int = 2) -> Array:
    """Nearest-neighbour upsampling: every pixel becomes a factor×factor block."""
    return jnp.repeat(jnp.repeat(x, factor, axis=1), factor, axis=2)


def naive_downsample_2d(x: Array, factor: int = 2) -> Array:
    """Average pooling over non-overlapping factor×factor blocks."""
    b, h, w, c = x.shape
    return x.reshape(b, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4))


class FIRConv2d(nn.Module):
    """Conv2d fused with FIR resampling (`up` xor `down`), with torch-compatible parameter shapes.

    up:   y = FIR(conv_transpose_stride2(x, W))    (upsample_conv_2d)
    down: y = conv_stride2(FIR(x), W)               (conv_downsample_2d)
    """
    features: int
    kernel_size: int = 3
    up: bool = False
    down: bool = False
    resample_kernel: tuple[int, ...] = (1, 3, 3, 1)
    use_bias: bool = True
    kernel_init: Callable[..., Any] = nn.initializers.lecun_normal()
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        if self.up and self.down:
            raise ValueError("FIRConv2d: up and down are mutually exclusive")
        ks = self.kernel_size
        w = self.param("kernel", self.kernel_init, (ks, ks, x.shape[-1], self.features))
        w = w.astype(self.dtype)
        x = x.astype(self.dtype)
        dn = ("NHWC", "HWIO", "NHWC")
        fir = setup_kernel(self.resample_kernel)
        if self.up:
            # Transposed stride-2 convolution = convolution of the zero-dilated input, padded by ks-1.
            x = jax.lax.conv_general_dilated(x, w, (1, 1), ((ks - 1, ks - 1),) * 2, lhs_dilation=(2, 2),
                                             dimension_numbers=dn)
            p = (fir.shape[0] - 2) - (ks - 1)
            x = upfirdn2d(x, fir * 4, pad=((p + 1) // 2 + 1, p // 2 + 1))
        elif self.down:
            p = (fir.shape[0] - 2) + (ks - 1)
            x = upfirdn2d(x, fir, pad=((p + 1) // 2, p // 2))
            x = jax.lax.conv_general_dilated(x, w, (2, 2), "VALID", dimension_numbers=dn)
        else:
            x = jax.lax.conv_general_dilated(x, w, (1, 1), ((ks // 2, ks // 2),) * 2, dimension_numbers=dn)
        if self.use_bias:
            x = x + self.param("bias", nn.initializers.zeros, (self.features,)).astype(self.dtype)
        return x
