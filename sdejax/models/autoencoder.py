"""Autoencoder networks (Flax linen) for `sdejax.autoencoders`: MLP and linear Gaussian VAEs, and the
convolutional KL / VQ autoencoders of latent diffusion (NHWC).

    VAE:           q(z|x) = N(μ(x), diag e^{logvar(x)}),   p(x|z) = N(d(z), s² I), s² learned or fixed
    LinearVAE:     μ = x W_e + b_e, logvar a learned (q,) vector, d(z) = z W_d + b_d, s² a learned scalar
    KLAutoencoder: log2 f stride-2 stages, image (H, W, C) -> (mean, logvar) each (H/f, W/f, latent_channels)
    VQAutoencoder: the same encoder to z_e (H/f, W/f, code_dim) and a (num_codes, code_dim) codebook

Each exposes `encode` / `decode` for `model.apply(params, x, method="encode")`; `__call__` runs both (on the
posterior mean) so `init` creates every parameter.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from sdejax.models.layers import conv, group_norm

Array = jax.Array


class VAE(nn.Module):
    """MLP Gaussian VAE on vectors (B, data_dim); decoder_logvar None -> a learned scalar log s²."""

    data_dim: int
    latent_dim: int
    hidden: Sequence[int] = (64, 64)
    decoder_logvar: Optional[float] = None

    def setup(self):
        self.enc = [nn.Dense(h) for h in self.hidden]
        self.enc_out = nn.Dense(2 * self.latent_dim)
        self.dec = [nn.Dense(h) for h in reversed(self.hidden)]
        self.dec_out = nn.Dense(self.data_dim)
        if self.decoder_logvar is None:
            self.logvar = self.param("decoder_logvar", nn.initializers.zeros, ())

    def encode(self, x: Array) -> tuple[Array, Array]:
        h = x
        for layer in self.enc:
            h = nn.swish(layer(h))
        mean, logvar = jnp.split(self.enc_out(h), 2, axis=-1)
        return mean, logvar

    def decode(self, z: Array) -> tuple[Array, Array]:
        h = z
        for layer in self.dec:
            h = nn.swish(layer(h))
        logvar = self.logvar if self.decoder_logvar is None else jnp.asarray(self.decoder_logvar, h.dtype)
        return self.dec_out(h), logvar

    def __call__(self, x: Array) -> tuple[Array, Array]:
        return self.decode(self.encode(x)[0])


class LinearVAE(nn.Module):
    """Linear Gaussian VAE (the PPCA model): z-mean x W_e + b_e, x-independent log τ² (q,), x̂ = z W_d + b_d,
    learned log s² (or fixed decoder_logvar)."""

    data_dim: int
    latent_dim: int
    decoder_logvar: Optional[float] = None

    def setup(self):
        dense = nn.initializers.lecun_normal()
        self.enc_kernel = self.param("enc_kernel", dense, (self.data_dim, self.latent_dim))
        self.enc_bias = self.param("enc_bias", nn.initializers.zeros, (self.latent_dim,))
        self.enc_logvar = self.param("enc_logvar", nn.initializers.zeros, (self.latent_dim,))
        self.dec_kernel = self.param("dec_kernel", dense, (self.latent_dim, self.data_dim))
        self.dec_bias = self.param("dec_bias", nn.initializers.zeros, (self.data_dim,))
        if self.decoder_logvar is None:
            self.logvar = self.param("dec_logvar", nn.initializers.zeros, ())

    def _dec_logvar(self) -> Array:
        return self.logvar if self.decoder_logvar is None else jnp.asarray(self.decoder_logvar)

    def encode(self, x: Array) -> tuple[Array, Array]:
        mean = x @ self.enc_kernel + self.enc_bias
        return mean, jnp.broadcast_to(self.enc_logvar, mean.shape)

    def decode(self, z: Array) -> tuple[Array, Array]:
        return z @ self.dec_kernel + self.dec_bias, self._dec_logvar()

    def affine(self, x: Array) -> tuple[Array, Array, Array, Array, Array]:
        """(z_mean, z_logvar, W_d (q, d), b_d, log s²) for `sdejax.autoencoders.linear_vae_loss`."""
        mean, logvar = self.encode(x)
        return mean, logvar, self.dec_kernel, self.dec_bias, self._dec_logvar()

    def __call__(self, x: Array) -> tuple[Array, Array]:
        return self.decode(self.encode(x)[0])


class ResBlock(nn.Module):
    """x ↦ skip(x) + conv(swish(GN(conv(swish(GN(x)))))); skip is a 1×1 conv when the width changes."""

    features: int

    @nn.compact
    def __call__(self, x: Array) -> Array:
        h = conv(self.features)(nn.swish(group_norm(x.shape[-1])(x)))
        h = conv(self.features, init_scale=0.0)(nn.swish(group_norm(self.features)(h)))
        skip = x if x.shape[-1] == self.features else conv(self.features, 1)(x)
        return skip + h


def _widths(f: int, features: int, channel_mult: Optional[Sequence[int]]) -> tuple[int, ...]:
    levels = int(round(math.log2(f)))
    if f < 2 or 2 ** levels != f:
        raise ValueError(f"downsampling factor f must be a power of 2 >= 2; got {f}")
    mult = tuple(channel_mult) if channel_mult is not None else tuple(min(2 ** i, 4) for i in range(levels + 1))
    if len(mult) != levels + 1:
        raise ValueError(f"channel_mult needs log2(f) + 1 = {levels + 1} entries; got {mult}")
    return tuple(features * m for m in mult)


class ConvEncoder(nn.Module):
    """conv_in, then per level (ResBlock, stride-2 conv) × log2 f, mid ResBlock, GN-swish-conv to out_channels."""

    widths: Sequence[int]
    out_channels: int
    num_res_blocks: int = 1

    @nn.compact
    def __call__(self, x: Array) -> Array:
        h = conv(self.widths[0])(x)
        for width_in, width_out in zip(self.widths[:-1], self.widths[1:]):
            for _ in range(self.num_res_blocks):
                h = ResBlock(width_in)(h)
            h = conv(width_out, stride=2)(h)
        h = ResBlock(self.widths[-1])(h)
        return conv(self.out_channels)(nn.swish(group_norm(h.shape[-1])(h)))


class ConvDecoder(nn.Module):
    """Mirror of `ConvEncoder`: conv_in, mid ResBlock, per level (ResBlock, nearest ×2 + conv), GN-swish-conv."""

    widths: Sequence[int]
    out_channels: int
    num_res_blocks: int = 1

    @nn.compact
    def __call__(self, z: Array) -> Array:
        h = ResBlock(self.widths[-1])(conv(self.widths[-1])(z))
        for width_in, width_out in zip(self.widths[:0:-1], self.widths[-2::-1]):
            for _ in range(self.num_res_blocks):
                h = ResBlock(width_in)(h)
            b, hh, ww, c = h.shape
            h = conv(width_out)(jax.image.resize(h, (b, 2 * hh, 2 * ww, c), "nearest"))
        return conv(self.out_channels)(nn.swish(group_norm(h.shape[-1])(h)))


class KLAutoencoder(nn.Module):
    """Latent-diffusion KL autoencoder: encode(x (B, H, W, C)) -> (mean, logvar) (B, H/f, W/f, latent_channels),
    logvar clipped to [−30, 20]; decode(z) -> x̂ (B, H, W, out_channels). Widths features × channel_mult
    (default min(2^i, 4), i = 0..log2 f: LDM's (1, 2, 4, 4) at f = 8)."""

    f: int = 8
    latent_channels: int = 4
    features: int = 32
    channel_mult: Optional[Sequence[int]] = None
    out_channels: int = 3
    num_res_blocks: int = 1

    def setup(self):
        widths = _widths(self.f, self.features, self.channel_mult)
        self.encoder = ConvEncoder(widths, 2 * self.latent_channels, self.num_res_blocks)
        self.decoder = ConvDecoder(widths, self.out_channels, self.num_res_blocks)

    def encode(self, x: Array) -> tuple[Array, Array]:
        mean, logvar = jnp.split(self.encoder(x), 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, z: Array) -> Array:
        return self.decoder(z)

    def __call__(self, x: Array) -> Array:
        return self.decode(self.encode(x)[0])


class VQAutoencoder(nn.Module):
    """VQ autoencoder: encode(x) -> z_e (B, H/f, W/f, code_dim), codebook() -> (num_codes, code_dim) (uniform
    ±1/K init as VQ-VAE), decode(z_q) -> x̂. Quantisation is `sdejax.autoencoders.quantize` (outside the module,
    so the codebook may be a parameter or EMA state)."""

    f: int = 4
    num_codes: int = 512
    code_dim: int = 4
    features: int = 32
    channel_mult: Optional[Sequence[int]] = None
    out_channels: int = 3
    num_res_blocks: int = 1

    def setup(self):
        widths = _widths(self.f, self.features, self.channel_mult)
        self.encoder = ConvEncoder(widths, self.code_dim, self.num_res_blocks)
        self.decoder = ConvDecoder(widths, self.out_channels, self.num_res_blocks)
        bound = 1.0 / self.num_codes
        self.embedding = self.param("codebook", lambda k, s: jax.random.uniform(k, s, minval=-bound, maxval=bound),
                                    (self.num_codes, self.code_dim))

    def encode(self, x: Array) -> Array:
        return self.encoder(x)

    def decode(self, z: Array) -> Array:
        return self.decoder(z)

    def codebook(self) -> Array:
        return self.embedding

    def __call__(self, x: Array) -> Array:
        return self.decode(self.encode(x))
