"""Cascaded super-resolution (Ho et al. 2022, "Cascaded Diffusion Models"): a diffusion model of the
high-resolution image x (B, H, W, C) conditioned on a low-resolution image z (B, H/f, W/f, C_z).

Conditioning. The network sees the channel concatenation

    [x_t, up_f(z_s), s·1]     (C + C_z + 1 channels),

up_f the nearest or bilinear upsampling by f, s the augmentation level as a constant channel, and
z_s the *augmented* low-resolution image (Gaussian conditioning augmentation): with an sdejax
schedule `aug_sde` (its forward process at time s, as CDM noises z with the diffusion's own q),

    z_s = α_s z + σ_s ε,   (α_s, σ_s) = aug_sde.marginal_coeffs(s),   ε ~ N(0, I),

so s = 0 is no augmentation for VP-type schedules (α_0 = 1, σ_0 = 0). Training draws s ~ U[0, s_max]
per example; sampling fixes s.

The network params are an `SRParams(net, low_res, aug_level)` pytree (as `ControlNetParams`), so
`sr_apply_fn(apply_fn)` is an ordinary sdejax `apply_fn(params, x, labels, *, train, rng, y, w)`:
`get_score_fn`, every sampler, CFG and the losses use it unchanged. The inner network takes the
concatenated input; sdejax's U-Nets output as many channels as they take (`num_channels` = C + C_z + 1),
so the first C output channels are the prediction (a network that outputs C channels is unaffected).

`downsample` is the area (average-pool) operator D, (Dx)_{ij} = f⁻² Σ_{a,b<f} x_{fi+a, fj+b}.
`cascade_sample` chains a base sampler and SR stages in one call of an rng key: z ← base;
for each stage z ← stage.sample(key, stage.score(z_s, s)) with z_s = augment(z, s, ε).
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from sdejax.score import get_score_fn
from sdejax.sde import SDE, batch_broadcast

Array = jax.Array
ApplyFn = Callable[..., Array]
ScoreFn = Callable[[Array, Array], Array]
LossFn = Callable[[Any, Array, dict], tuple[Array, dict]]
UPSAMPLINGS = ("nearest", "bilinear")


class SRParams(NamedTuple):
    """Params of a super-resolution network: the inner network's variables, the augmented
    low-resolution image z_s (B, h, w, C_z) and the augmentation level s (B,)."""

    net: Any
    low_res: Array
    aug_level: Array


def _check_nhwc(name: str, v: Array) -> None:
    if jnp.ndim(v) != 4 or v.shape[0] < 1:
        raise ValueError(f"{name} must be NHWC with a non-empty batch axis; got shape {jnp.shape(v)}")


def _check_factor(factor: int) -> int:
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ValueError(f"factor must be an integer >= 1; got {factor!r}")
    return factor


def downsample(x: Array, factor: int) -> Array:
    """Area downsampling D by `factor`: the mean of each factor × factor block of the NHWC image x."""
    _check_nhwc("x", x)
    f = _check_factor(factor)
    b, h, w, c = x.shape
    if h % f or w % f:
        raise ValueError(f"x's height and width {(h, w)} must be divisible by factor={f}")
    return jnp.mean(jnp.reshape(x, (b, h // f, f, w // f, f, c)), axis=(2, 4))


def upsample(z: Array, factor: int, method: str = "nearest") -> Array:
    """Upsample the NHWC image z by `factor`: "nearest" repeats each pixel into a factor × factor block;
    "bilinear" interpolates at the half-pixel source coordinates u = (i + ½)/f − ½, clamped to the edges."""
    _check_nhwc("z", z)
    f = _check_factor(factor)
    if method not in UPSAMPLINGS:
        raise ValueError(f"unknown upsampling method {method!r}; valid: {list(UPSAMPLINGS)}")
    if method == "nearest":
        return jnp.repeat(jnp.repeat(z, f, axis=1), f, axis=2)
    b, h, w, c = z.shape
    return jax.image.resize(z, (b, h * f, w * f, c), "bilinear").astype(z.dtype)


def augment(z: Array, level: Array, noise: Array, aug_sde: SDE) -> Array:
    """Gaussian conditioning augmentation z_s = α_s z + σ_s ε at per-example levels s = `level` (B,),
    (α_s, σ_s) = aug_sde.marginal_coeffs(s), with the caller's noise ε shaped like z."""
    _check_level(level, z.shape[0])
    if jnp.shape(noise) != jnp.shape(z):
        raise ValueError(f"noise must have the shape of z {jnp.shape(z)}; got {jnp.shape(noise)}")
    alpha, sigma = aug_sde.marginal_coeffs(jnp.asarray(level, z.dtype))
    return batch_broadcast(alpha, z) * z + batch_broadcast(sigma, z) * noise


def _check_level(level: Array, batch: int) -> None:
    if jnp.shape(level) != (batch,):
        raise ValueError(f"aug_level must have shape ({batch},) (one level per example); got {jnp.shape(level)}")


def sr_input(x: Array, low_res: Array, aug_level: Array, method: str = "nearest") -> Array:
    """The network input [x, up_f(low_res), s·1] (channel concatenation), f = H / h inferred from the shapes."""
    _check_nhwc("x", x)
    _check_nhwc("low_res", low_res)
    (b, h, w, _), (bl, hl, wl, _) = x.shape, low_res.shape
    if bl != b or h % hl or w % wl or h // hl != w // wl:
        raise ValueError(f"low_res {low_res.shape} must have x's batch and size (H, W) / f for one integer "
                         f"factor f (x: {x.shape})")
    _check_level(aug_level, b)
    up = upsample(low_res.astype(x.dtype), h // hl, method)
    level = jnp.broadcast_to(jnp.asarray(aug_level, x.dtype)[:, None, None, None], (b, h, w, 1))
    return jnp.concatenate([x, up, level], axis=-1)


def sr_apply_fn(apply_fn: ApplyFn, method: str = "nearest") -> ApplyFn:
    """`apply(SRParams(net, low_res, aug_level), x, labels, *, train=False, rng=None, y=None, w=None)`:
    `apply_fn(net, sr_input(x, low_res, aug_level), labels, ...)`, its first C = x.shape[-1] channels.
    `y` and `w` reach `apply_fn` only when given (networks without classes never see them)."""
    if method not in UPSAMPLINGS:
        raise ValueError(f"unknown upsampling method {method!r}; valid: {list(UPSAMPLINGS)}")

    def apply(params: SRParams, x: Array, labels: Array, *, train: bool = False, rng: Array | None = None,
              y: Array | None = None, w: Array | None = None) -> Array:
        cond = {k: v for k, v in (("y", y), ("w", w)) if v is not None}
        h = sr_input(x, params.low_res, params.aug_level, method)
        out = apply_fn(params.net, h, labels, train=train, rng=rng, **cond)
        if out.shape[:-1] != x.shape[:-1] or out.shape[-1] < x.shape[-1]:
            raise ValueError(f"the inner network must output (B, H, W, >= {x.shape[-1]}) for x {x.shape}; "
                             f"got {out.shape}")
        return out[..., : x.shape[-1]]

    return apply


def _low_res(batch: dict, low_res_fn: Callable[[Array], Array] | None) -> Array:
    if "x" not in batch:
        raise ValueError(f"batch must be a dict with key 'x'; got keys {sorted(batch)}")
    if low_res_fn is None:
        if "low_res" not in batch:
            raise ValueError(f"without low_res_fn the batch must carry 'low_res'; got keys {sorted(batch)}")
        return batch["low_res"]
    if "low_res" in batch:
        raise ValueError("batch['low_res'] and low_res_fn both give the low-resolution image; pass one")
    return low_res_fn(batch["x"])


def sr_loss_fn(loss_fn: LossFn, aug_sde: SDE, s_max: float,
               low_res_fn: Callable[[Array], Array] | None = None) -> LossFn:
    """`loss(net, rng, batch) = loss_fn(SRParams(net, z_s, s), rng', batch)` with z = batch["low_res"]
    (or low_res_fn(batch["x"]), e.g. `functools.partial(downsample, factor=f)`), s ~ U[0, s_max] and
    ε per example from fold_in(key, batch["index"]) (as `sdejax.losses`: independent of the device
    count), z_s = augment(z, s, ε). `loss_fn` is any sdejax loss of `sr_apply_fn(...)`; its aux gains
    "aug_level". The low-resolution input is data: no gradient flows into it."""
    if not 0.0 <= s_max <= aug_sde.T:
        raise ValueError(f"s_max must lie in [0, aug_sde.T = {aug_sde.T}]; got {s_max}")

    def loss(net: Any, rng: Array, batch: dict) -> tuple[Array, dict]:
        z = jax.lax.stop_gradient(jnp.asarray(_low_res(batch, low_res_fn)))
        _check_nhwc("the low-resolution image", z)
        n = batch["x"].shape[0]
        index = batch.get("index")
        index = jnp.arange(n) if index is None else index
        aug_rng, rng = jax.random.split(rng)
        keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(aug_rng, index)
        s = s_max * jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, 0), (), z.dtype))(keys)
        noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 1), z.shape[1:], z.dtype))(keys)
        value, aux = loss_fn(SRParams(net, augment(z, s, noise, aug_sde), s), rng, batch)
        return value, {**aux, "aug_level": s}

    return loss


def sr_score_builder(sde: SDE, apply_fn: ApplyFn, net: Any, **kwargs: Any) -> Callable[[Array, Array], ScoreFn]:
    """`(low_res, aug_level) -> get_score_fn(sde, apply_fn, SRParams(net, low_res, aug_level), **kwargs)`,
    `apply_fn` an `sr_apply_fn(...)`: the score builder of an `SRStage`."""
    return lambda low_res, aug_level: get_score_fn(sde, apply_fn, SRParams(net, low_res, aug_level), **kwargs)


class SRStage(NamedTuple):
    """One super-resolution stage of a cascade.

    score:     (z_s, s) -> score_fn(x, t), e.g. `sr_score_builder(...)`, or one wrapped in CFG.
    sample:    (rng, score_fn) -> a sampler's output tuple (samples first, nfe last), the caller's
               sampler with its schedule, shape, grid and (optionally) x_T bound, e.g.
               `lambda rng, s: ddim_sample(rng, sde, s, shape, ts=grid)`.
    aug_sde:   the augmentation schedule; aug_level: the fixed s of the sampled conditioning.
    """

    score: Callable[[Array, Array], ScoreFn]
    sample: Callable[[Array, ScoreFn], tuple]
    aug_sde: SDE
    aug_level: float = 0.0


def cascade_sample(rng: Array, base: Callable[[Array], tuple], stages: Sequence[SRStage]
                   ) -> tuple[list[Array], list[Any]]:
    """Sample a cascade in one call: x⁰ = base(k_0)[0] (a sampler's output tuple, e.g.
    `lambda rng: ddim_sample(rng, sde, score, shape, ts=grid)`), then for stage i
    x^i = stage.sample(k_i', stage.score(z_s, s))[0] with z_s = augment(x^{i−1}, s, ε_i), s = stage.aug_level,
    ε_i ~ N(0, I) from k_i. Returns ([x⁰, x¹, …], [nfe⁰, nfe¹, …]); jit-able as a function of `rng`."""
    stages = tuple(stages)
    for i, stage in enumerate(stages):
        if not 0.0 <= stage.aug_level <= stage.aug_sde.T:
            raise ValueError(f"stages[{i}].aug_level must lie in [0, aug_sde.T = {stage.aug_sde.T}]; "
                             f"got {stage.aug_level}")
    keys = jax.random.split(rng, len(stages) + 1)
    out = base(keys[0])
    samples, nfes = [out[0]], [out[-1]]
    for stage, key in zip(stages, keys[1:]):
        noise_key, sample_key = jax.random.split(key)
        z = samples[-1]
        level = jnp.full((z.shape[0],), stage.aug_level, z.dtype)
        z_s = augment(z, level, jax.random.normal(noise_key, z.shape, z.dtype), stage.aug_sde)
        out = stage.sample(sample_key, stage.score(z_s, level))
        samples.append(out[0])
        nfes.append(out[-1])
    return samples, nfes
