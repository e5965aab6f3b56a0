"""ControlNet (Zhang et al. 2023) for sdejax's DDPM U-Net: a trainable copy of the frozen base's
encoder, fed the control image c, steers the base through zero-initialised convolutions,

    y_c = F_θ(x) + Z_θz2(F_θc(x, Z_θz1(E(c)))),

F_θ the frozen base, F_θc the copy of its encoder (the time/class embeddings, the down path and the
middle block; θc starts equal to θ), E a small conv "hint" encoder of c to the U-Net's first feature
width whose last conv Z_θz1 is zero-initialised (its output is added to the copy's first conv
features), and Z_θz2 one zero-initialised 1×1 conv per skip connection and one for the middle block,
whose outputs (times `scale`) are added to the base's skips hs[i] and middle-block output. With
every Z zero the sum is the base's output bit for bit, for any c.

The network params are a `ControlNetParams(base, control, image)` pytree, so the control image
travels with the parameters: `controlnet_apply_fn(controlnet)` is an ordinary sdejax
`apply_fn(params, x, labels, *, train, rng, y, w)`, and `sdejax.score.get_score_fn`, every sampler,
CFG and the losses use it unchanged. Train only `control` (the base is a stop_gradient constant):
`loss(control, rng, batch) = loss_fn(ControlNetParams(base, control, batch["control"]), rng, batch)`.
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from sdejax.models import layers
from sdejax.models.ddpm import DDPM

Array = jax.Array


class ControlNetParams(NamedTuple):
    """The params of a ControlNet-augmented network: frozen base variables, the trainable ControlNet
    variables (`init_controlnet`) and the control image (B, H, W, C_c) in [0, 1]."""

    base: Any
    control: Any
    image: Array


def zero_conv(features: int, kernel: int, dtype: Any, name: str) -> nn.Conv:
    """A conv with zero kernel and zero bias (ControlNet's "zero convolution")."""
    zeros = nn.initializers.zeros
    return nn.Conv(features, (kernel, kernel), padding="SAME", kernel_init=zeros, bias_init=zeros,
                   dtype=dtype, name=name)


class HintEncoder(nn.Module):
    """E(c): 3×3 convs of widths `channels` with SiLU, then a zero-initialised 3×3 conv to `features`."""

    channels: tuple[int, ...]
    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, c: Array) -> Array:
        h = c.astype(self.dtype)
        for i, ch in enumerate(self.channels):
            h = nn.silu(layers.conv(ch, dtype=self.dtype, name=f"conv_{i}")(h))
        return zero_conv(self.features, 3, self.dtype, "zero_conv")(h)


class ControlNet(nn.Module):
    """The trainable side of ControlNet for a DDPM U-Net `unet`. Call: (x, labels, image, y=None,
    train=False, w=None) -> residuals [Z_i(hs_c[i])]_i + [Z_mid(h_c)], the copy's skips and middle
    features through zero 1×1 convs (the `control` argument of `DDPM.__call__`).

    Variables: {"params": {"copy": <the unet's encoder>, "hint": E, "zero_<i>": Z_i}}.
    """

    unet: DDPM
    hint_channels: tuple[int, ...] = (16, 32, 64)

    @nn.compact
    def __call__(self, x: Array, labels: Array, image: Array, y: Optional[Array] = None, train: bool = False,
                 w: Optional[Array] = None) -> list[Array]:
        if image.ndim != 4 or image.shape[:3] != x.shape[:3]:
            raise ValueError(f"the control image must be NHWC with batch and size of x {x.shape[:3]}; "
                             f"got {image.shape}")
        dt = self.unet.dtype
        hint = HintEncoder(self.hint_channels, self.unet.nf, dt, name="hint")(image)
        copy = self.unet.clone(parent=self, name="copy")
        extra = {} if w is None else {"w": w}
        hs, h = copy(x, labels, y=y, train=train, hint=hint, features_only=True, **extra)
        return [zero_conv(f.shape[-1], 1, dt, f"zero_{i}")(f) for i, f in enumerate([*hs, h])]


def init_controlnet(rng: Array, controlnet: ControlNet, base_variables: Any, x: Array, labels: Array,
                    image: Array, **kwargs: Any) -> dict:
    """ControlNet variables: the copy = the base's encoder params (by key: copy[k] = base["params"][k]),
    zero 1×1 convs, and a fresh hint encoder (seeded by `rng`, its last conv zero). `kwargs`: y, w as
    for the base. Only the hint encoder is initialised at random (the copy is never drawn)."""
    shapes = jax.eval_shape(lambda: controlnet.init({"params": rng}, x, labels, image, **kwargs))["params"]
    base = base_variables["params"]
    missing = sorted(set(shapes["copy"]) - set(base))
    if missing:
        raise ValueError(f"the base params lack the encoder modules {missing}; build the ControlNet from "
                         f"the base's own module")
    copy = {k: base[k] for k in shapes["copy"]}
    shape_of = lambda t: jax.tree_util.tree_map(lambda v: (tuple(v.shape), v.dtype), t)  # noqa: E731
    if shape_of(copy) != shape_of(shapes["copy"]):
        raise ValueError("the base's encoder params do not match controlnet.unet's shapes; build the "
                         "ControlNet from the base's own module")
    hint = HintEncoder(controlnet.hint_channels, controlnet.unet.nf, controlnet.unet.dtype)
    params = {k: jax.tree_util.tree_map(lambda v: jnp.zeros(v.shape, v.dtype), v) for k, v in shapes.items()
              if k.startswith("zero_")}
    return {"params": {"copy": copy, "hint": jax.jit(hint.init)(rng, image)["params"], **params}}


def _forward(params: ControlNetParams, x: Array, labels: Array, *, controlnet: ControlNet, scale: float,
             train: bool = False, rng: Optional[Array] = None, y: Optional[Array] = None,
             w: Optional[Array] = None) -> Array:
    rngs = {"dropout": rng} if rng is not None else {}
    extra = {} if w is None else {"w": w}
    residuals = controlnet.apply(params.control, x, labels, params.image, y=y, train=train, rngs=rngs, **extra)
    control = [scale * r for r in residuals]
    return controlnet.unet.apply(jax.lax.stop_gradient(params.base), x, labels, y=y, train=train, rngs=rngs,
                                 control=control, **extra)


def controlnet_apply_fn(controlnet: ControlNet, scale: float = 1.0):
    """`apply_fn(ControlNetParams(base, control, image), x, labels, *, train=False, rng=None, y=None, w=None)`:
    the base U-Net (a stop_gradient constant) with `scale` × the ControlNet residuals on its skips and
    middle block. All three parts of the params are pytree leaves for `get_score_fn` and jit."""
    return functools.partial(_forward, controlnet=controlnet, scale=float(scale))
