"""NCSN++ and DDPM++ (Song et al. 2021): one U-Net with configurable embedding, resampling,
residual blocks and input/output pyramids.

    NCSN++: Fourier embedding of log σ, FIR resampling, BigGAN blocks, pyramids, output / σ.
    DDPM++: sinusoidal embedding of the time label, BigGAN blocks without FIR, no pyramids.

Top-level submodules are named `all_modules_<i>` in the order of the reference's module list,
parameter-free ones included, so torch checkpoints convert one to one.
"""
from __future__ import annotations

import itertools
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sdejax.models import conditioning, layers

Array = jax.Array

PROGRESSIVE = ("none", "output_skip", "residual")
PROGRESSIVE_INPUT = ("none", "input_skip", "residual")
EMBEDDINGS = ("fourier", "positional")
RESBLOCKS = ("ddpm", "biggan")
COMBINE = ("sum", "cat")


def _check(name: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"model.{name} = {value!r} is not valid; choose from {list(valid)}")


class NCSNpp(nn.Module):
    """NCSN++ / DDPM++ score network. Call: (x NHWC, labels (B,), y=None, train=False) -> NHWC.

    ControlNet hooks (`sdejax.models.controlnet`), all no-ops by default: `control` holds one residual
    per skip connection hs[i] and a last one for the middle-block output, added before the decoder
    reads them; `hint` is added to the first conv's features; `features_only` returns (hs, h_mid).
    """
    nf: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 4
    attn_resolutions: tuple[int, ...] = (16,)
    image_size: int = 32
    num_channels: int = 3
    centered: bool = False
    dropout: float = 0.1
    resamp_with_conv: bool = True
    conditional: bool = True
    fir: bool = True
    fir_kernel: tuple[int, ...] = (1, 3, 3, 1)
    skip_rescale: bool = True
    resblock_type: str = "biggan"
    progressive: str = "none"
    progressive_input: str = "residual"
    progressive_combine: str = "sum"
    embedding_type: str = "fourier"
    fourier_scale: float = 16.0
    init_scale: float = 0.0
    scale_by_sigma: bool = True
    nonlinearity: str = "swish"
    sigma_min: float = 0.01
    sigma_max: float = 50.0
    num_scales: int = 1000
    num_classes: int = 0
    guidance_embedding: bool = False
    dtype: Any = jnp.float32

    def _validate(self, x: Array, labels: Array) -> None:
        _check("progressive", self.progressive, PROGRESSIVE)
        _check("progressive_input", self.progressive_input, PROGRESSIVE_INPUT)
        _check("embedding_type", self.embedding_type, EMBEDDINGS)
        _check("resblock_type", self.resblock_type, RESBLOCKS)
        _check("progressive_combine", self.progressive_combine, COMBINE)
        expected = (self.image_size, self.image_size, self.num_channels)
        if x.ndim != 4 or x.shape[1:] != expected:
            raise ValueError(f"x must be NHWC of shape (B, {expected[0]}, {expected[1]}, {expected[2]}), got {x.shape}")
        if labels.shape != (x.shape[0],):
            raise ValueError(f"labels must have shape ({x.shape[0]},), got {labels.shape}")
        if self.num_classes > 0 and not self.conditional:
            raise ValueError("class conditioning (num_classes > 0) needs model.conditional = True")

    @nn.compact
    def __call__(self, x: Array, labels: Array, y: Optional[Array] = None, train: bool = False,
                 w: Optional[Array] = None, control: Optional[Sequence[Array]] = None,
                 hint: Optional[Array] = None, features_only: bool = False) -> Any:
        self._validate(x, labels)
        names = (f"all_modules_{i}" for i in itertools.count())
        act = layers.get_act(self.nonlinearity)
        dt = self.dtype
        nf, n_res = self.nf, len(self.ch_mult)
        resolutions = [self.image_size // 2 ** i for i in range(n_res)]

        # Noise-level embedding (fp32 features, then a two-layer MLP).
        if self.embedding_type == "fourier":
            used_sigmas = labels.astype(jnp.float32)
            emb = layers.GaussianFourierProjection(nf, self.fourier_scale, name=next(names))(jnp.log(used_sigmas))
        else:
            used_sigmas = conditioning.sigmas_at(labels, self.sigma_min, self.sigma_max, self.num_scales)
            emb = layers.timestep_embedding(labels, nf)
        temb = None
        if self.conditional:
            temb = nn.Dense(nf * 4, kernel_init=layers.default_init(), dtype=dt, name=next(names))(emb)
            temb = nn.Dense(nf * 4, kernel_init=layers.default_init(), dtype=dt, name=next(names))(act(temb))
            temb = conditioning.add_class_embedding(temb, y, self.num_classes, dt)
            temb = conditioning.add_guidance_embedding(temb, w, self.guidance_embedding, nf, dtype=dt)
        elif y is not None or w is not None or self.guidance_embedding:
            raise ValueError("class labels y and the guidance weight w need model.conditional = True")

        def resblock(h: Array, out_ch: Optional[int] = None, up: bool = False, down: bool = False) -> Array:
            common = dict(act=act, out_ch=out_ch, dropout=self.dropout, init_scale=self.init_scale,
                          skip_rescale=self.skip_rescale, dtype=dt, name=next(names))
            if self.resblock_type == "ddpm":
                return layers.ResnetBlockDDPM(**common)(h, temb, train)
            return layers.ResnetBlockBigGAN(up=up, down=down, fir=self.fir, fir_kernel=self.fir_kernel,
                                            **common)(h, temb, train)

        def attn(h: Array) -> Array:
            return layers.AttnBlock(skip_rescale=self.skip_rescale, init_scale=self.init_scale,
                                    dtype=dt, name=next(names))(h)

        def resample(cls: type, h: Array, with_conv: bool, out_ch: Optional[int] = None,
                     pyramid: bool = False) -> Array:
            # The reference keeps parameter-free pyramid resamplers out of its module list.
            name = None if pyramid and not with_conv else next(names)
            return cls(out_ch=out_ch, with_conv=with_conv, fir=self.fir, fir_kernel=self.fir_kernel,
                       dtype=dt, name=name)(h)

        def norm_act_conv(h: Array, out_ch: int, init_scale: float = 1.0) -> Array:
            h = act(layers.group_norm(h.shape[-1], dtype=dt, name=next(names))(h))
            return layers.conv(out_ch, init_scale=init_scale, dtype=dt, name=next(names))(h)

        if not self.centered:
            x = 2 * x - 1.0  # data in [0, 1] -> [-1, 1]
        x = x.astype(dt)

        # Downsampling path.
        input_pyramid = x if self.progressive_input != "none" else None
        hs = [layers.conv(nf, dtype=dt, name=next(names))(x)]
        if hint is not None:
            hs[0] = hs[0] + hint.astype(dt)
        for i_level in range(n_res):
            for _ in range(self.num_res_blocks):
                h = resblock(hs[-1], nf * self.ch_mult[i_level])
                if resolutions[i_level] in self.attn_resolutions:
                    h = attn(h)
                hs.append(h)
            if i_level == n_res - 1:
                continue
            if self.resblock_type == "ddpm":
                h = resample(layers.Downsample, hs[-1], self.resamp_with_conv)
            else:
                h = resblock(hs[-1], down=True)
            if self.progressive_input == "input_skip":
                input_pyramid = resample(layers.Downsample, input_pyramid, False, pyramid=True)
                h = layers.Combine(self.progressive_combine, dtype=dt, name=next(names))(input_pyramid, h)
            elif self.progressive_input == "residual":
                input_pyramid = resample(layers.Downsample, input_pyramid, True, h.shape[-1], pyramid=True)
                input_pyramid = input_pyramid + h
                if self.skip_rescale:
                    input_pyramid = input_pyramid / np.sqrt(2.0)
                h = input_pyramid
            hs.append(h)

        h = resblock(hs[-1])
        h = attn(h)
        h = resblock(h)
        if features_only:
            return hs, h
        if control is not None:
            hs, h = layers.add_control(hs, h, control)

        # Upsampling path.
        pyramid = None
        for i_level in reversed(range(n_res)):
            for _ in range(self.num_res_blocks + 1):
                h = resblock(jnp.concatenate([h, hs.pop()], axis=-1), nf * self.ch_mult[i_level])
            if resolutions[i_level] in self.attn_resolutions:
                h = attn(h)
            if self.progressive == "output_skip":
                if pyramid is not None:
                    pyramid = resample(layers.Upsample, pyramid, False, pyramid=True)
                pyramid_h = norm_act_conv(h, self.num_channels, self.init_scale)
                pyramid = pyramid_h if pyramid is None else pyramid + pyramid_h
            elif self.progressive == "residual":
                if pyramid is None:
                    pyramid = norm_act_conv(h, h.shape[-1])
                else:
                    pyramid = resample(layers.Upsample, pyramid, True, h.shape[-1], pyramid=True)
                    pyramid = pyramid + h
                    if self.skip_rescale:
                        pyramid = pyramid / np.sqrt(2.0)
                    h = pyramid
            if i_level != 0:
                if self.resblock_type == "ddpm":
                    h = resample(layers.Upsample, h, self.resamp_with_conv)
                else:
                    h = resblock(h, up=True)
        if hs:
            raise AssertionError("skip connections left unused")

        h = pyramid if self.progressive == "output_skip" else norm_act_conv(h, self.num_channels, self.init_scale)
        h = h.astype(jnp.float32)
        if self.scale_by_sigma:
            h = h / used_sigmas[:, None, None, None]
        return h
