"""ControlNet (Zhang et al. 2023) for sdejax's DDPM U-Net, NCSN++/DDPM++ and DiT: a trainable copy
of part of the frozen base, fed the control image c, steers the base through zero-initialised
projections,

    y_c = F_θ(x; + Σ_i Z_i(F_θc(x, Z_h(E(c)))_i)),

F_θ the frozen base, F_θc the trainable copy (θc starts equal to θ, copied by key), E a small conv
"hint" encoder of c whose last conv Z_h is zero-initialised (its output is added to the copy's input
features), and Z_i one zero-initialised Dense over the channel axis (a 1×1 conv) per copied feature
map, whose output (times `scale`) is added to the base's matching feature before the base reads it:

    U-Nets (DDPM, NCSN++): the copy is the encoder (embeddings, down path, middle block); one Z per
        skip hs[i] and one for the middle block; the hint lives at the first conv's width nf.
    DiT: the copy is the embeddings and the first N transformer blocks (N = `num_blocks`, default
        depth // 2); Z_i(copy block i's tokens) is added to base block i's output; the hint encoder
        ends in a p×p stride-p zero conv (patchify + zero Dense) to the hidden width, added to the
        copy's input tokens.

With every Z zero the sum is the base's output bit for bit, for any c. Each base exposes the hooks
`control`, `hint` and `features_only`; `BASES` says, per base class, which module is copied and at
what width and stride the hint enters (`ControlSpec`).

The network params are a `ControlNetParams(base, control, image)` pytree, so the control image
travels with the parameters: `controlnet_apply_fn(controlnet)` is an ordinary sdejax
`apply_fn(params, x, labels, *, train, rng, y, w)`, and `sdejax.score.get_score_fn`, every sampler,
CFG and the losses use it unchanged. Train only `control` (the base is a stop_gradient constant):
`loss(control, rng, batch) = loss_fn(ControlNetParams(base, control, batch["control"]), rng, batch)`.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from sdejax.models import layers
from sdejax.models.ddpm import DDPM
from sdejax.models.dit import DiT
from sdejax.models.ncsnpp import NCSNpp

Array = jax.Array


class ControlNetParams(NamedTuple):
    """The params of a ControlNet-augmented network: frozen base variables, the trainable ControlNet
    variables (`init_controlnet`) and the control image (B, H, W, C_c) in [0, 1]."""

    base: Any
    control: Any
    image: Array


class ControlSpec(NamedTuple):
    """What ControlNet needs from a base: the module whose `features_only` path is the trainable copy
    (its params are a subset of the base's, by key), the hint's channel width and its stride (the hint
    map is the image's size / stride)."""

    copy: nn.Module
    hint_features: int
    hint_stride: int


def _unet_spec(base: nn.Module, num_blocks: Optional[int]) -> ControlSpec:
    """The whole encoder is copied; the hint enters after the first conv (width nf, full size)."""
    if num_blocks is not None:
        raise ValueError(f"num_blocks = {num_blocks} is for DiT bases; a U-Net ControlNet copies the "
                         f"whole encoder (leave num_blocks = None)")
    return ControlSpec(base, base.nf, 1)


def _dit_spec(base: DiT, num_blocks: Optional[int]) -> ControlSpec:
    """The embeddings and the first num_blocks blocks (default depth // 2); the hint enters as tokens."""
    depth, hidden, heads = base.dims
    n = depth // 2 if num_blocks is None else num_blocks
    if not 1 <= n <= depth:
        raise ValueError(f"num_blocks must be in [1, {depth}] (the base's depth); got {num_blocks}")
    return ControlSpec(base.clone(shape=(n, hidden, heads)), hidden, base.patch_size)


BASES: dict[type, Callable[[Any, Optional[int]], ControlSpec]] = {
    DDPM: _unet_spec, NCSNpp: _unet_spec, DiT: _dit_spec}


def control_spec(base: nn.Module, num_blocks: Optional[int] = None) -> ControlSpec:
    """The `ControlSpec` of `base` (looked up by its class, or a parent class, in `BASES`)."""
    spec = next((BASES[cls] for cls in type(base).__mro__ if cls in BASES), None)
    if spec is None:
        raise ValueError(f"ControlNet has no base {type(base).__name__}; valid: "
                         f"{sorted(cls.__name__ for cls in BASES)}")
    return spec(base, num_blocks)


def zero_conv(features: int, kernel: int, dtype: Any, name: str, stride: int = 1) -> nn.Conv:
    """A conv with zero kernel and zero bias (ControlNet's "zero convolution")."""
    zeros = nn.initializers.zeros
    return nn.Conv(features, (kernel, kernel), strides=stride, padding="SAME", kernel_init=zeros,
                   bias_init=zeros, dtype=dtype, name=name)


def zero_dense(features: int, dtype: Any, name: str) -> nn.Dense:
    """Z_i: a Dense over the channel axis (a 1×1 conv on images) with zero kernel and zero bias."""
    zeros = nn.initializers.zeros
    return nn.Dense(features, kernel_init=zeros, bias_init=zeros, dtype=dtype, name=name)


class HintEncoder(nn.Module):
    """E(c): 3×3 convs of widths `channels` with SiLU, then the zero conv Z_h to `features`: 3×3 at
    stride 1, or p×p at stride p = `stride` (patchify + Dense onto a DiT's token grid)."""

    channels: tuple[int, ...]
    features: int
    stride: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, c: Array) -> Array:
        h = c.astype(self.dtype)
        for i, ch in enumerate(self.channels):
            h = nn.silu(layers.conv(ch, dtype=self.dtype, name=f"conv_{i}")(h))
        kernel = 3 if self.stride == 1 else self.stride
        return zero_conv(self.features, kernel, self.dtype, "zero_conv", self.stride)(h)


class ControlNet(nn.Module):
    """The trainable side of ControlNet for a base network `base` (a DDPM, NCSNpp or DiT module; see
    `BASES`). Call: (x, labels, image, y=None, train=False, w=None) -> residuals [Z_i(f_i)]_i, the
    copy's features f_i (U-Nets: skips, then the middle block; DiT: the copied blocks' tokens) through
    zero projections: the `control` argument of the base's `__call__`.

    Variables: {"params": {"copy": <the base's copied part>, "hint": E, "zero_<i>": Z_i}}; the copy's
    non-trainable collections (NCSN++'s Fourier "constants") are the base's, read at apply time.
    `num_blocks`: the number of copied DiT blocks (default depth // 2); None for U-Nets.
    """

    base: nn.Module
    hint_channels: tuple[int, ...] = (16, 32, 64)
    num_blocks: Optional[int] = None

    @nn.compact
    def __call__(self, x: Array, labels: Array, image: Array, y: Optional[Array] = None, train: bool = False,
                 w: Optional[Array] = None) -> list[Array]:
        if image.ndim != 4 or image.shape[:3] != x.shape[:3]:
            raise ValueError(f"the control image must be NHWC with batch and size of x {x.shape[:3]}; "
                             f"got {image.shape}")
        spec, dt = control_spec(self.base, self.num_blocks), self.base.dtype
        hint = HintEncoder(self.hint_channels, spec.hint_features, spec.hint_stride, dt, name="hint")(image)
        copy = spec.copy.clone(parent=self, name="copy")
        extra = {} if w is None else {"w": w}
        features = copy(x, labels, y=y, train=train, hint=hint, features_only=True, **extra)
        return [zero_dense(f.shape[-1], dt, f"zero_{i}")(f) for i, f in enumerate(jax.tree_util.tree_leaves(features))]


def init_controlnet(rng: Array, controlnet: ControlNet, base_variables: Any, x: Array, labels: Array,
                    image: Array, **kwargs: Any) -> dict:
    """ControlNet variables: the copy = the base's params by key (copy[k] = base["params"][k]), zero
    projections, and a fresh hint encoder (seeded by `rng`, its last conv zero). `kwargs`: y, w as
    for the base. Only the hint encoder is initialised at random (the copy is never drawn)."""
    shapes = jax.eval_shape(lambda: controlnet.init({"params": rng}, x, labels, image, **kwargs))["params"]
    base = base_variables["params"]
    missing = sorted(set(shapes["copy"]) - set(base))
    if missing:
        raise ValueError(f"the base params lack the copied modules {missing}; build the ControlNet from "
                         f"the base's own module")
    copy = {k: base[k] for k in shapes["copy"]}
    shape_of = lambda t: jax.tree_util.tree_map(lambda v: (tuple(v.shape), v.dtype), t)  # noqa: E731
    if shape_of(copy) != shape_of(shapes["copy"]):
        raise ValueError("the base's params do not match controlnet.base's shapes; build the ControlNet "
                         "from the base's own module")
    spec = control_spec(controlnet.base, controlnet.num_blocks)
    hint = HintEncoder(controlnet.hint_channels, spec.hint_features, spec.hint_stride, controlnet.base.dtype)
    params = {k: jax.tree_util.tree_map(lambda v: jnp.zeros(v.shape, v.dtype), v) for k, v in shapes.items()
              if k.startswith("zero_")}
    return {"params": {"copy": copy, "hint": jax.jit(hint.init)(rng, image)["params"], **params}}


def _forward(params: ControlNetParams, x: Array, labels: Array, *, controlnet: ControlNet, scale: float,
             train: bool = False, rng: Optional[Array] = None, y: Optional[Array] = None,
             w: Optional[Array] = None) -> Array:
    rngs = {"dropout": rng} if rng is not None else {}
    extra = {} if w is None else {"w": w}
    base = jax.lax.stop_gradient(params.base)
    frozen = {col: {"copy": tree} for col, tree in base.items() if col != "params"}
    residuals = controlnet.apply({**frozen, **params.control}, x, labels, params.image, y=y, train=train,
                                 rngs=rngs, **extra)
    control = [scale * r for r in residuals]
    return controlnet.base.apply(base, x, labels, y=y, train=train, rngs=rngs, control=control, **extra)


def controlnet_apply_fn(controlnet: ControlNet, scale: float = 1.0):
    """`apply_fn(ControlNetParams(base, control, image), x, labels, *, train=False, rng=None, y=None, w=None)`:
    the base network (a stop_gradient constant) with `scale` × the ControlNet residuals added to the
    features the copy mirrors. All three parts of the params are pytree leaves for `get_score_fn` and jit."""
    return functools.partial(_forward, controlnet=controlnet, scale=float(scale))
