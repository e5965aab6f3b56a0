"""Image-conditioned runs of the driver: cascaded super-resolution (`config.superres`) and ControlNet
(`config.controlnet`). Both train a DSM score model of x conditioned on an image c = C(x) derived from
the data, through a network whose params carry c (`sdejax.superres.SRParams`,
`sdejax.models.controlnet.ControlNetParams`), so the library losses, score functions and samplers run
on them unchanged.

| section | c = C(x) | trained | network params | frozen model (`Setup.teacher`) |
|---|---|---|---|---|
| superres | D_f(x): area downsampling by `factor` | the SR network on [x_t, up_f(z_s), s·1] | SRParams(θ, z_s, s): z_s = α_s c + σ_s ε (the run's SDE), s ~ U[0, `aug_max`] in training, s = `aug_level` at sampling | `base_workdir` (optional): a DSM run on D_f(x) (`data.downsample = factor`), sampled first and chained (`cascade_sample`) |
| controlnet | `control` "blur": G_σ ∗ x (σ = `blur_sigma` px); "low_res": up_f(D_f(x)) | the ControlNet (encoder copy, hint encoder, zero projections) | ControlNetParams(base, θ, c) | `base_workdir` (required): the DSM run it steers, with this run's data, SDE and network |

Sampling conditions on c = C(x) of the held-out images in turn (row i mod N), or for a cascade on the
base model's samples; `agreement` says how far the samples' C(x̂) lie from their c (RMS per pixel, in
[0, 1] units). Held-out bits/dim are the conditional −log p(x | c) (for super-resolution at the
augmentation level `aug_level`, with noise from the eval stream).

`data.downsample = f` makes any run model D_f(x) instead of x (`DownsampledSource`): the base of a
cascade. Averaging f² pixels of L levels leaves (L − 1)f² + 1 levels, so bits/dim stay exact.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
from typing import Any, Callable, Iterator, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sdejax import degradations, superres
from sdejax.models import controlnet as controlnet_lib, registry
from sdejax.models.controlnet import ControlNetParams
from sdejax.training import objective as objective_lib, sources

Array = jax.Array
SECTIONS = ("superres", "controlnet")
SUPERRES_REQUIRED = ("factor",)
SUPERRES_DEFAULTS = {"upsample": "nearest", "aug_max": 0.0, "aug_level": 0.0, "base_workdir": None}
CONTROLS = ("blur", "low_res")
CONTROLNET_REQUIRED = ("base_workdir",)
CONTROLNET_DEFAULTS = {"control": "blur", "blur_sigma": 1.5, "factor": 2, "hint_channels": (16, 32, 64),
                       "num_blocks": None, "scale": 1.0}
CONTROL_KEYS = {"blur_sigma": "blur", "factor": "low_res"}  # read by one control only
DATA_DEFAULTS = {"downsample": 1}


def kind(config: ml_collections.ConfigDict) -> Optional[str]:
    """"superres", "controlnet" or None (an unconditioned run)."""
    present = [k for k in SECTIONS if k in config]
    return present[0] if present else None


def settings(config: ml_collections.ConfigDict) -> dict:
    """The run's section with its defaults filled in (empty for an unconditioned run)."""
    name = kind(config)
    if name is None:
        return {}
    defaults = SUPERRES_DEFAULTS if name == "superres" else CONTROLNET_DEFAULTS
    section = config[name]
    out = {k: section.get(k, v) for k, v in defaults.items()}
    out.update({k: section[k] for k in (SUPERRES_REQUIRED if name == "superres" else CONTROLNET_REQUIRED)})
    return out


def check(config: ml_collections.ConfigDict) -> None:
    """The combinations an image-conditioned run cannot use (the values' ranges are `config.VALUE_RULES`;
    the augmentation levels' upper bound T of the SDE, `sdejax.superres`)."""
    present = [k for k in SECTIONS if k in config]
    if len(present) > 1:
        raise ValueError("config.superres and config.controlnet are two kinds of run; set one")
    f = config.data.get("downsample", 1)
    if f > 1 and config.data.get("image_size", 0) % f:
        raise ValueError(f"data.downsample = {f} must divide data.image_size = {config.data.image_size}")
    if not present:
        return
    name, s = present[0], settings(config)
    if config.training.get("objective", "dsm") != "dsm" or "latent" in config:
        raise ValueError(f"config.{name} conditions a pixel DSM score model: training.objective must be 'dsm' "
                         "and config.latent absent")
    if config.model.name not in registry.MODELS or registry.MODELS[config.model.name].tokens:
        raise ValueError(f"config.{name} needs an image network of sdejax.models.registry (valid: "
                         f"{sorted(k for k, v in registry.MODELS.items() if not v.tokens)}); got {config.model.name!r}")
    if name == "superres":
        size = config.data.image_size // f
        if size % s["factor"]:
            raise ValueError(f"superres.factor = {s['factor']} must divide the image size {size}")
        return
    for key, control in CONTROL_KEYS.items():
        if key in config.controlnet and s["control"] != control:
            raise ValueError(f"controlnet.{key} is read only with controlnet.control = {control!r}; "
                             f"got {s['control']!r}")
    if s["control"] == "low_res" and config.data.image_size % s["factor"]:
        raise ValueError(f"controlnet.factor = {s['factor']} must divide data.image_size = {config.data.image_size}")


def condition_fn(config: ml_collections.ConfigDict) -> Callable[[Array], Array]:
    """C(x): what a sample of this run is conditioned on, from the image x (B, H, W, C)."""
    s = settings(config)
    if kind(config) == "superres":
        return functools.partial(superres.downsample, factor=int(s["factor"]))
    if s["control"] == "low_res":
        f = int(s["factor"])
        return lambda x: superres.upsample(superres.downsample(x, f), f)
    blur = degradations.blur(sigma_max=float(s["blur_sigma"]), schedule="linear")  # σ(t = 1) = blur_sigma
    return lambda x: blur.apply(x, None, jnp.ones((x.shape[0],), x.dtype))


def base_workdir(config: ml_collections.ConfigDict) -> Optional[pathlib.Path]:
    """The workdir of the run's frozen model (module docstring), or None."""
    given = settings(config).get("base_workdir")
    return pathlib.Path(given) if given else None


def check_base(config: ml_collections.ConfigDict, base_config: ml_collections.ConfigDict,
               workdir: pathlib.Path) -> None:
    """A cascade's base is a DSM model of D_f(x) (this run's data with `data.downsample` = factor); a
    ControlNet's base is a DSM model with this run's data, SDE and network."""
    same = lambda a, b, key: a.get(key, DATA_DEFAULTS.get(key)) == b.get(key, DATA_DEFAULTS.get(key))  # noqa: E731
    if base_config.training.get("objective", "dsm") != "dsm" or any(k in base_config for k in SECTIONS):
        raise ValueError(f"config.{kind(config)}.base_workdir must hold an unconditioned DSM score model; {workdir} "
                         f"has training.objective {base_config.training.get('objective', 'dsm')!r}")
    d, bd = config.data, base_config.data
    if kind(config) == "superres":
        want = d.get("downsample", 1) * int(config.superres.factor)
        if bd.dataset != d.dataset or bd.image_size != d.image_size or bd.get("downsample", 1) != want:
            raise ValueError(f"superres.base_workdir must hold a model of this run's images downsampled by "
                             f"superres.factor (data.dataset {d.dataset!r}, image_size {d.image_size}, downsample "
                             f"{want}); {workdir} has {bd.dataset!r}, {bd.image_size}, {bd.get('downsample', 1)}")
        return
    saved = lambda c: json.loads(json.dumps(c.model.to_dict()))  # noqa: E731  (as a checkpoint saves it)
    mine, theirs = saved(config), saved(base_config)
    models = sorted(k for k in set(mine) | set(theirs) if k not in ("ema_rate", "ema_warmup") and mine.get(k) != theirs.get(k))
    data = [k for k in ("dataset", "image_size", "num_channels", "centered", "downsample") if not same(d, bd, k)]
    if data or models or base_config.training.sde != config.training.sde:
        raise ValueError(f"controlnet.base_workdir must hold a DSM model with this run's data, training.sde and "
                         f"config.model (EMA keys aside); {workdir} differs in data {data}, model {models}, sde "
                         f"{base_config.training.sde!r} vs {config.training.sde!r}")


def network_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config a network is built from: itself, or with `data.downsample` = f a copy whose
    `data.image_size` is the downsampled size."""
    f = int(config.data.get("downsample", 1))
    if f == 1:
        return config
    c = ml_collections.ConfigDict(config.to_dict())
    c.data.image_size = config.data.image_size // f
    return c


def build_model(config: ml_collections.ConfigDict, rng: Array, x: Array, base: Any) -> tuple[Callable, Any]:
    """(apply_fn, trained variables): super-resolution's `sr_apply_fn` over a registry network taking
    [x, up_f(z), s] (C + C + 1 channels); ControlNet's `controlnet_apply_fn` with its copy of `base`
    (the frozen `Teacher`)."""
    s = settings(config)
    if kind(config) == "superres":
        net_config = ml_collections.ConfigDict(network_config(config).to_dict())
        net_config.data.num_channels = 2 * config.data.num_channels + 1
        model, variables = registry.init_model(net_config, rng)
        return superres.sr_apply_fn(registry.make_apply_fn(model), s["upsample"]), variables
    num_blocks = None if s["num_blocks"] is None else int(s["num_blocks"])
    net = controlnet_lib.ControlNet(registry.get_model(network_config(config)), tuple(s["hint_channels"]), num_blocks)
    x1 = jnp.asarray(x[:1])
    variables = controlnet_lib.init_controlnet(rng, net, base.params, x1, jnp.zeros((1,), x1.dtype),
                                               condition_fn(config)(x1), **registry.guidance_inputs(config))
    # host copies (placed apart as params, EMA, ...): the step donates the state, not the base
    return controlnet_lib.controlnet_apply_fn(net, float(s["scale"])), jax.device_get(variables)


def objective(config: ml_collections.ConfigDict, sde, loss_fn) -> objective_lib.Objective:
    """The DSM `loss_fn(network params, rng, batch)` of the run's network, on the trained params θ:
    super-resolution's `sr_loss_fn` (c = D_f(x), s ~ U[0, aug_max]); ControlNet's
    loss(ControlNetParams(base, θ, C(x))), the base from `context.teacher_params`."""
    cond = condition_fn(config)
    if kind(config) == "superres":
        return objective_lib.from_loss(superres.sr_loss_fn(loss_fn, sde, float(settings(config)["aug_max"]), cond))

    def controlled(params: Any, rng: Array, batch: dict, context: objective_lib.Context) -> tuple[Array, dict]:
        network = ControlNetParams(context.teacher_params, params, cond(batch["x"]))
        return loss_fn(network, rng, batch)

    return controlled


def on_heldout(config: ml_collections.ConfigDict) -> bool:
    """Whether the run's samples are conditioned on held-out images (not on a cascade's base samples)."""
    return kind(config) == "controlnet" or (kind(config) == "superres" and base_workdir(config) is None)


def heldout_conditions(config: ml_collections.ConfigDict, heldout_x: np.ndarray, n: int) -> Array:
    """C(x_i) of the held-out rows i mod N, i < n: what n samples are conditioned on."""
    x = np.asarray(heldout_x)
    return condition_fn(config)(jnp.asarray(x[np.arange(n) % x.shape[0]]))


def augmented_params(config: ml_collections.ConfigDict, sde, params: Any, c: Array, rng: Array) -> superres.SRParams:
    """SRParams(θ, z_s, s) at s = `aug_level`, z_s = augment(c, s, ε), ε ~ N(0, I) from `rng`."""
    level = jnp.full((c.shape[0],), float(settings(config)["aug_level"]), c.dtype)
    return superres.SRParams(params, superres.augment(c, level, jax.random.normal(rng, c.shape, c.dtype), sde), level)


def agreement(config: ml_collections.ConfigDict, samples: np.ndarray, heldout_x: np.ndarray, to_unit) -> dict:
    """{"condition_rms"}: RMS over pixels of C(x̂_i) − C(x_i) in [0, 1] units, x_i the held-out row
    i mod N each sample was conditioned on."""
    n = samples.shape[0]
    got = condition_fn(config)(jnp.asarray(samples))
    want = heldout_conditions(config, heldout_x, n)
    diff = np.asarray(to_unit(got), np.float64) - np.asarray(to_unit(want), np.float64)
    return {"condition_rms": float(np.sqrt(np.mean(diff ** 2)))}


@dataclasses.dataclass
class DownsampledSource(sources.WrappedSource):
    """The `DataSource` of D_f(x) over an image source `inner` (`data.downsample = f`): the base of a
    cascade. Quantised to (L − 1)f² + 1 levels; no FID (its statistics are of the full-size images)."""

    inner: sources.DataSource
    factor: int
    supports_fid = False

    def __post_init__(self):
        self.num_classes, self.data_range = self.inner.num_classes, self.inner.data_range
        levels = self.inner.num_levels
        self.num_levels = None if levels is None else (levels - 1) * self.factor ** 2 + 1
        self.heldout = self._down(self.inner.heldout)

    def _down(self, batch: dict) -> dict:
        x = np.asarray(batch["x"])
        flat = x.reshape((-1,) + x.shape[-3:])
        small = np.asarray(superres.downsample(jnp.asarray(flat), self.factor))
        return {**batch, "x": small.reshape(x.shape[:-3] + small.shape[1:])}

    def chunk(self, step: int, k: int) -> dict:
        return self._down(self.inner.chunk(step, k))

    def eval_batches(self, batch_size: int) -> Iterator[dict]:
        for batch in self.inner.eval_batches(batch_size):
            yield self._down(batch)

    def decode(self, x: Array) -> Array:
        return x

    def describe_bits(self, bits: dict) -> dict:
        return bits


def source(config: ml_collections.ConfigDict, data: sources.DataSource) -> sources.DataSource:
    """`data`, or with `data.downsample` = f > 1 the `DownsampledSource` of D_f(x) over it."""
    f = int(config.data.get("downsample", 1))
    if f == 1:
        return data
    if data.data_range is None:
        raise ValueError(f"data.downsample averages image pixels; data.dataset = {config.data.dataset!r} is not "
                         "an image dataset")
    return DownsampledSource(data, f)
