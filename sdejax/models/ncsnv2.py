"""NCSN (v1, Song & Ermon 2019) and NCSNv2 (Song & Ermon 2020): RefineNet score networks.

    encoder: begin_conv → residual stages (strided or dilated) → RefineNet decoder → norm → act → end_conv
    NCSNv2:  output / σ[labels]  (unconditional network, noise level enters only through the scaling)
    NCSN v1: InstanceNorm++ conditioned on the noise index `labels`; no output scaling.

NCSNv2 comes in the two flavours of the original code, which differ in three places:

    flavor     InstanceNorm++ var over channels   MSF upsampling            64px: 3rd RefineBlock width
    "pytorch"  unbiased (score_sde_pytorch)       bilinear, align_corners   nf
    "flax"     biased (score_sde, JAX/Flax)       bilinear, half-pixel      2·nf

"flax" is what score_sde's Flax checkpoints need (`sdejax.models.convert_flax`). NCSN v1 follows
the PyTorch code. Labels are integer indices into the descending σ table.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from sdejax.models import conditioning, layers
from sdejax.models.normalization import InstanceNormPlus
from sdejax.models.refinenet import RefineBlock, ResidualBlock, ncsn_conv

Array = jax.Array

# Per image-size variant: encoder stages (name, channel multiplier, resample, dilation) and the
# names of the refine blocks, deepest stage first.
ARCHS: dict[int, tuple[tuple[tuple[str, int, Optional[str], int], ...], tuple[str, ...]]] = {
    64: ((("res1", 1, None, 1), ("res2", 2, "down", 1), ("res3", 2, "down", 2), ("res4", 2, "down", 4)),
         ("refine1", "refine2", "refine3", "refine4")),
    128: ((("res1", 1, None, 1), ("res2", 2, "down", 1), ("res3", 2, "down", 1), ("res4", 4, "down", 2),
           ("res5", 4, "down", 4)),
          ("refine1", "refine2", "refine3", "refine4", "refine5")),
    256: ((("res1", 1, None, 1), ("res2", 2, "down", 1), ("res3", 2, "down", 1), ("res31", 2, "down", 1),
           ("res4", 4, "down", 2), ("res5", 4, "down", 4)),
          ("refine1", "refine2", "refine31", "refine3", "refine4", "refine5")),
}


@dataclasses.dataclass(frozen=True)
class Flavor:
    """Where the PyTorch and Flax originals of NCSNv2 differ (see the module docstring)."""
    channel_ddof: int
    align_corners: bool
    wide_third_refine_64: bool


FLAVORS = {"pytorch": Flavor(channel_ddof=1, align_corners=True, wide_third_refine_64=False),
           "flax": Flavor(channel_ddof=0, align_corners=False, wide_third_refine_64=True)}


def _refinenet(x: Array, labels: Array, *, nf: int, variant: int, image_size: int, centered: bool,
               nonlinearity: str, noise_classes: int, dtype: Any, flavor: Flavor = FLAVORS["pytorch"]) -> Array:
    """The shared RefineNet body (call inside a compact method; submodules join the caller).

    `noise_classes > 0` conditions every InstanceNorm++ on the noise index (NCSN v1).
    """
    stages, refine_names = ARCHS[variant]
    act = layers.get_act(nonlinearity)
    h = x if centered else 2 * x - 1.0
    h = ncsn_conv(nf, dtype=dtype, name="begin_conv")(h.astype(dtype))

    feats = []
    for s, (name, mult, resample, dilation) in enumerate(stages):
        adjust = s == len(stages) - 1 and variant == 64 and image_size == 28
        h = ResidualBlock(mult * nf, act, resample, dilation, adjust, noise_classes, dtype, flavor.channel_ddof,
                          name=f"{name}_0")(h, labels)
        h = ResidualBlock(mult * nf, act, None, dilation, False, noise_classes, dtype, flavor.channel_ddof,
                          name=f"{name}_1")(h, labels)
        feats.append(h)

    out_chs = [mult * nf for _, mult, _, _ in stages]
    ref = None
    for k, name in enumerate(refine_names):
        s = len(stages) - 1 - k
        inputs = [feats[s]] if ref is None else [feats[s], ref]
        features = out_chs[s - 1] if s > 0 else nf
        if flavor.wide_third_refine_64 and variant == 64 and s == 1:
            features = out_chs[s]
        ref = RefineBlock(features, act, start=ref is None, end=s == 0, num_classes=noise_classes, dtype=dtype,
                          align_corners=flavor.align_corners, name=name)(inputs, feats[s].shape[1:3], labels)

    h = act(InstanceNormPlus(num_classes=noise_classes, dtype=dtype, channel_ddof=flavor.channel_ddof,
                             name="normalizer")(ref, labels))
    return ncsn_conv(x.shape[-1], dtype=dtype, name="end_conv")(h).astype(jnp.float32)


def _check_common(x: Array, labels: Array, image_size: int, num_channels: int, normalization: str,
                  num_classes: int, y: Optional[Array]) -> None:
    if normalization != "InstanceNorm++":
        raise ValueError(f"model.normalization = {normalization!r} is not supported; valid: ['InstanceNorm++']")
    if num_classes > 0 or y is not None:
        raise ValueError("class conditioning is not supported by NCSN/NCSNv2; use ncsnpp or ddpm")
    expected = (image_size, image_size, num_channels)
    if x.ndim != 4 or x.shape[1:] != expected:
        raise ValueError(f"x must be NHWC of shape (B, {expected[0]}, {expected[1]}, {expected[2]}), got {x.shape}")
    if labels.shape != (x.shape[0],) or not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"labels must be integer noise indices of shape ({x.shape[0]},), got {labels.dtype}{labels.shape}")


class NCSNv2(nn.Module):
    """NCSNv2 for 32/64px (variant 64), 96-128px (128) or 129-256px (256): RefineNet output / σ[labels].

    flavor: "pytorch" (score_sde_pytorch's network) or "flax" (score_sde's; see the module docstring).
    """
    nf: int = 128
    variant: int = 64
    normalization: str = "InstanceNorm++"
    image_size: int = 32
    num_channels: int = 3
    centered: bool = False
    nonlinearity: str = "elu"
    sigma_min: float = 0.01
    sigma_max: float = 50.0
    num_scales: int = 232
    num_classes: int = 0
    dtype: Any = jnp.float32
    flavor: str = "pytorch"

    @nn.compact
    def __call__(self, x: Array, labels: Array, y: Optional[Array] = None, train: bool = False) -> Array:
        _check_common(x, labels, self.image_size, self.num_channels, self.normalization, self.num_classes, y)
        if self.variant not in ARCHS:
            raise ValueError(f"NCSNv2 variant {self.variant} unknown; valid: {sorted(ARCHS)}")
        if self.flavor not in FLAVORS:
            raise ValueError(f"model.flavor = {self.flavor!r} is not valid; choose from {sorted(FLAVORS)}")
        h = _refinenet(x, labels, nf=self.nf, variant=self.variant, image_size=self.image_size,
                       centered=self.centered, nonlinearity=self.nonlinearity, noise_classes=0, dtype=self.dtype,
                       flavor=FLAVORS[self.flavor])
        return h / conditioning.sigmas_at(labels, self.sigma_min, self.sigma_max, self.num_scales)[:, None, None, None]


class NCSN(nn.Module):
    """NCSN v1: RefineNet with InstanceNorm++ conditioned on the noise index (num_scales embeddings)."""
    nf: int = 128
    normalization: str = "InstanceNorm++"
    image_size: int = 32
    num_channels: int = 3
    centered: bool = False
    nonlinearity: str = "elu"
    sigma_min: float = 0.01
    sigma_max: float = 50.0
    num_scales: int = 10
    num_classes: int = 0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, labels: Array, y: Optional[Array] = None, train: bool = False) -> Array:
        _check_common(x, labels, self.image_size, self.num_channels, self.normalization, self.num_classes, y)
        return _refinenet(x, labels, nf=self.nf, variant=64, image_size=self.image_size, centered=self.centered,
                          nonlinearity=self.nonlinearity, noise_classes=self.num_scales, dtype=self.dtype)
