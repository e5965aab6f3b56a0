"""Per-example image transforms in NumPy, and the data scaler pair of score_sde.

Images arrive as integer levels k in {0, ..., L-1} (L = 256 for 8-bit images, 17 for the sklearn
digits). They are mapped to [0, 1] by

    x = k / (L - 1)               (no dequantisation: the grid points themselves), or
    x = (k + u) / L,  u ~ U[0,1)  (uniform dequantisation: bin k is [k/L, (k+1)/L)),

so a continuous density on [0, 1]^D evaluated on dequantised data bounds the discrete
log-likelihood of the levels, and bits/dim = -log p(x) / (D ln 2) + log2(L). For L = 256 this is
score_sde's (k + u) / 256; bits/dim of datasets with different L are not comparable.

Resizing happens on the integer levels (antialiased bilinear, rounded back to the grid), so
dequantisation stays on the data's own grid. (score_sde resized floats, which leaves the grid.)
"""
from __future__ import annotations

import numpy as np
from PIL import Image


def to_unit_interval(levels: np.ndarray, num_levels: int, noise: np.ndarray | None = None) -> np.ndarray:
    """Integer levels -> float32 in [0, 1]: k/(L-1), or (k + noise)/L with noise in [0, 1)."""
    k = levels.astype(np.float32)
    if noise is None:
        return k / np.float32(num_levels - 1)
    return (k + noise.astype(np.float32)) / np.float32(num_levels)


def crop_box(height: int, width: int, crop: int | None) -> tuple[int, int, int]:
    """(top, left, size) of the centred square crop; `crop=None` takes the largest square."""
    size = min(height, width) if crop is None else crop
    if size > min(height, width):
        raise ValueError(f"crop={crop} exceeds the image size {height}x{width}")
    return (height - size) // 2, (width - size) // 2, size


def crop_and_resize(image: np.ndarray, crop: int | None, image_size: int) -> np.ndarray:
    """Centre-crop a square (`crop` pixels, or the largest) from a uint8 HWC image, resize it to
    `image_size` x `image_size` (antialiased bilinear, PIL) and return uint8 HWC."""
    top, left, size = crop_box(image.shape[0], image.shape[1], crop)
    image = image[top:top + size, left:left + size]
    if size == image_size:
        return image
    channels = image.shape[-1]
    pil = Image.fromarray(image[..., 0] if channels == 1 else image)
    out = np.asarray(pil.resize((image_size, image_size), Image.BILINEAR))
    return out.reshape(image_size, image_size, channels)


def get_data_scaler(config):
    """Data in [0, 1] -> model inputs: x -> 2x - 1 when `config.data.centered`, else identity."""
    if config.data.centered:
        return lambda x: x * 2.0 - 1.0
    return lambda x: x


def get_data_inverse_scaler(config):
    """Inverse of `get_data_scaler`: x -> (x + 1)/2 when `config.data.centered`, else identity."""
    if config.data.centered:
        return lambda x: (x + 1.0) / 2.0
    return lambda x: x
