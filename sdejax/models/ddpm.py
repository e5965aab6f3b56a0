"""The DDPM U-Net (Ho et al. 2020): sinusoidal time embedding, GroupNorm(32) residual blocks,
self-attention at the `attn_resolutions`, nearest/strided-conv resampling.

Top-level submodules are named `all_modules_<i>` in the reference's module-list order.
"""
from __future__ import annotations

import itertools
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from sdejax.models import conditioning, layers

Array = jax.Array


class DDPM(nn.Module):
    """DDPM score network. Call: (x NHWC, labels (B,), y=None, train=False) -> NHWC.

    conditional=False drops the noise-level embedding (the network never sees `labels`).

    With scale_by_sigma the output is divided by σ[labels] (SMLD-style training, integer labels).

    ControlNet hooks (`sdejax.models.controlnet`), all no-ops by default: `control` holds one residual
    per skip connection hs[i] and a last one for the middle-block output, added before the decoder
    reads them; `hint` is added to the first conv's features; `features_only` returns (hs, h_mid).
    """
    nf: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    image_size: int = 32
    num_channels: int = 3
    centered: bool = True
    dropout: float = 0.1
    resamp_with_conv: bool = True
    conditional: bool = True
    scale_by_sigma: bool = False
    nonlinearity: str = "swish"
    sigma_min: float = 0.01
    sigma_max: float = 50.0
    num_scales: int = 1000
    num_classes: int = 0
    guidance_embedding: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, labels: Array, y: Optional[Array] = None, train: bool = False,
                 w: Optional[Array] = None, control: Optional[Sequence[Array]] = None,
                 hint: Optional[Array] = None, features_only: bool = False) -> Any:
        expected = (self.image_size, self.image_size, self.num_channels)
        if x.ndim != 4 or x.shape[1:] != expected:
            raise ValueError(f"x must be NHWC of shape (B, {expected[0]}, {expected[1]}, {expected[2]}), got {x.shape}")
        if labels.shape != (x.shape[0],):
            raise ValueError(f"labels must have shape ({x.shape[0]},), got {labels.shape}")
        names = (f"all_modules_{i}" for i in itertools.count())
        act = layers.get_act(self.nonlinearity)
        dt = self.dtype
        nf, n_res = self.nf, len(self.ch_mult)
        resolutions = [self.image_size // 2 ** i for i in range(n_res)]

        temb = None
        if self.conditional:
            temb = layers.timestep_embedding(labels, nf)
            temb = nn.Dense(nf * 4, kernel_init=layers.default_init(), dtype=dt, name=next(names))(temb)
            temb = nn.Dense(nf * 4, kernel_init=layers.default_init(), dtype=dt, name=next(names))(act(temb))
            temb = conditioning.add_class_embedding(temb, y, self.num_classes, dt)
            temb = conditioning.add_guidance_embedding(temb, w, self.guidance_embedding, nf, dtype=dt)
        elif self.num_classes > 0 or y is not None or w is not None or self.guidance_embedding:
            raise ValueError("class conditioning and the guidance weight need model.conditional = True")

        def resblock(h: Array, out_ch: Optional[int] = None) -> Array:
            return layers.ResnetBlockDDPM(act=act, out_ch=out_ch, dropout=self.dropout, groups=32,
                                          dtype=dt, name=next(names))(h, temb, train)

        def attn(h: Array) -> Array:
            return layers.AttnBlock(groups=32, dtype=dt, name=next(names))(h)

        h = x if self.centered else 2 * x - 1.0
        hs = [layers.conv(nf, dtype=dt, name=next(names))(h.astype(dt))]
        if hint is not None:
            hs[0] = hs[0] + hint.astype(dt)
        for i_level in range(n_res):
            for _ in range(self.num_res_blocks):
                h = resblock(hs[-1], nf * self.ch_mult[i_level])
                if resolutions[i_level] in self.attn_resolutions:
                    h = attn(h)
                hs.append(h)
            if i_level != n_res - 1:
                hs.append(layers.Downsample(with_conv=self.resamp_with_conv, dtype=dt, name=next(names))(hs[-1]))

        h = resblock(hs[-1])
        h = attn(h)
        h = resblock(h)
        if features_only:
            return hs, h
        if control is not None:
            hs, h = layers.add_control(hs, h, control)

        for i_level in reversed(range(n_res)):
            for _ in range(self.num_res_blocks + 1):
                h = resblock(jnp.concatenate([h, hs.pop()], axis=-1), nf * self.ch_mult[i_level])
            if resolutions[i_level] in self.attn_resolutions:
                h = attn(h)
            if i_level != 0:
                h = layers.Upsample(with_conv=self.resamp_with_conv, dtype=dt, name=next(names))(h)

        h = act(layers.group_norm(h.shape[-1], 32, dtype=dt, name=next(names))(h))
        h = layers.conv(self.num_channels, init_scale=0.0, dtype=dt, name=next(names))(h)
        h = h.astype(jnp.float32)
        if self.scale_by_sigma:
            h = h / conditioning.sigmas_at(labels, self.sigma_min, self.sigma_max, self.num_scales)[:, None, None, None]
        return h
