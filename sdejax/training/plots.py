"""Pictures of samples: image grids (uint8, for PNG files and TensorBoard) and scatter plots of
low-dimensional samples beside the data."""
from __future__ import annotations

import math
import pathlib

import numpy as np


def image_grid(images: np.ndarray) -> np.ndarray:
    """Images (n, H, W, C) in [0, 1] -> one uint8 HWC grid of ceil(sqrt(n)) columns, 1-pixel borders."""
    n, h, w, c = images.shape
    cols = int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    grid = np.zeros((rows * (h + 1) + 1, cols * (w + 1) + 1, c), np.float32)
    for i in range(n):
        r, q = divmod(i, cols)
        grid[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + q * (w + 1):1 + q * (w + 1) + w] = images[i]
    return np.round(grid * 255).astype(np.uint8)


def save_image_grid(path: pathlib.Path, grid: np.ndarray) -> None:
    """A uint8 HWC grid as PNG (grey-scale for one channel)."""
    from PIL import Image

    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path)


def save_scatter(path: pathlib.Path, data: np.ndarray, samples: dict[str, np.ndarray]) -> None:
    """Scatter plots (first two coordinates) of the data beside each named sample set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = {"data (held-out)": data, **{f"{k} samples": v for k, v in samples.items()}}
    lo, hi = np.percentile(data[:, :2], 0.5, axis=0), np.percentile(data[:, :2], 99.5, axis=0)
    pad = 0.15 * (hi - lo)
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4), squeeze=False)
    for ax, (title, pts) in zip(axes[0], panels.items()):
        ax.scatter(pts[:, 0], pts[:, 1], s=1, alpha=0.4)
        ax.set(title=title, xlim=(lo[0] - pad[0], hi[0] + pad[0]), ylim=(lo[1] - pad[1], hi[1] + pad[1]),
               aspect="equal")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
