"""Model families of the driver: how a trained `training.objective` is sampled, which samplers the
report draws, which parameters it samples with, and how its held-out bits/dim are computed, so
that `sdejax.training.modes` never asks what kind of model it holds.

| family | objectives | sampler | params | bits/dim |
|---|---|---|---|---|
| score | dsm | any `sampling.methods` name (PC, ODE, DPM-Solver++, …) | EMA | PF-ODE likelihood |
| consistency | ct, ict, cd | multistep consistency sampling on `sampling.consistency_sigmas` | EMA | — |
| progressive | pd | DDIM on the distilled step count | θ⁻ (last completed stage) | — |
| masked | masked | ancestral unmasking (`sdejax.sampling.masked`) | EMA | NELBO (an upper bound) |
| udm | udm | `sdejax.udm.udm_sample` by `sampling.udm_rule` from the data pushed to t = T | EMA | — |
| conditioned | dsm with `config.superres` / `config.controlnet` | a score sampler on the network params completed with the condition c (`sdejax.training.image_condition`): held-out C(x), or a cascade's base samples (`cascade_sample`) | EMA (and the frozen model's) | PF-ODE −log p(x given C(x)) |

A sampler is `sample(params, classifier_params, rng) -> (x, nfe)` in the model's data range.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sdejax import superres, udm
from sdejax.data import transforms
from sdejax.sampling import masked as masked_sampling
from sdejax.sampling import methods
from sdejax.training import build, conditioning, config as config_lib, image_condition
from sdejax.training.objective import Context

Array = jax.Array
SampleFn = Callable[[Any, Any, Array], tuple[Array, Array]]
NllFn = Callable[[Any, Array, Array, Optional[Array]], tuple[Array, Array]]  # (params, rng, x, y) -> (bits, nfe)

REPORT_METHODS = ("pc", "ode", "dpm_solver")
CONSISTENCY = "consistency"  # the sampler of every consistency objective (whatever sampling.method says)
ANCESTRAL = "ancestral"  # masked diffusion's sampler
AUGMENT_STREAM = 1 << 20  # fold_in of the likelihood's key: a super-resolution condition's augmentation noise


@dataclasses.dataclass(frozen=True)
class Family:
    """`sampler(s, method, n, shape)`, the report's sampler names, the sampled parameters of a state,
    the name a sampler is compiled and reported under, and `nll_bits(s)` (None: no likelihood)."""

    sampler: Callable[[Any, str, int, tuple[int, ...]], SampleFn]
    report_methods: Callable[[ml_collections.ConfigDict], tuple[str, ...]]
    sampled_params: Callable[[Any], Any] = lambda state: state.ema_params
    method_name: Callable[[Any, str], str] = lambda s, method: method
    nll_bits: Optional[Callable[[Any], NllFn]] = None


def _guided_score(config: ml_collections.ConfigDict, sde, apply_fn, n: int,
                  classifier: Optional[tuple[Callable, Any]] = None) -> Callable[[Any, Any], Callable[[Array, Array], Array]]:
    """`(network params, classifier params) -> score_fn(x, t)` of n samples of the network `apply_fn` of
    `config`, with its guidance and `classifier` (`classifier_for`)."""
    y = conditioning.sample_labels(config, n)

    def score_of(params, classifier_params):
        log_prob = None if classifier is None else classifier[0](classifier_params)
        return conditioning.guided_score_fn(
            config, sde, lambda labels: build.build_score_fn(config, sde, apply_fn, params, labels), y, log_prob)

    return score_of


def _draw(s, method: str) -> Callable:
    """`draw(rng, sde, score_fn, shape)` of the score-based `method` with the config's options."""
    return methods.from_config({**build.sampler_options(s.config, int(s.state.step)), "method": method})


def _score_sampler(s, method: str, n: int, shape: tuple[int, ...]) -> SampleFn:
    """A score-based `method` with the config's options, guidance and classifier."""
    draw, score_of = _draw(s, method), _guided_score(s.config, s.sde, s.apply_fn, n, classifier_for(s))

    def sample(params, classifier_params, rng):
        return draw(rng, s.sde, score_of(params, classifier_params), shape)

    return sample


def _base_sampler(base: build.Teacher, n: int) -> Callable[[Any, Array], tuple[Array, Array]]:
    """`(params, rng) -> (x, nfe)`: n samples of a cascade's base model by its own config's
    `sampling.method`, labels and guidance (its data shape from its config)."""
    c = base.config
    draw, score_of = methods.from_config(build.sampler_options(c)), _guided_score(c, base.sde, base.apply_fn, n)
    data = image_condition.network_config(c).data
    shape = (n, data.image_size, data.image_size, data.num_channels)

    def sample(params, rng):
        return draw(rng, base.sde, score_of(params, None), shape)

    return sample


def _conditioned_sampler(s, method: str, n: int, shape: tuple[int, ...]) -> SampleFn:
    """Samples of an image-conditioned run, its params the pair (frozen params, θ) (`Setup.network_params`).
    Super-resolution: `cascade_sample` of one stage after the base, the cascade's base model
    (`superres.base_workdir`) or the held-out D_f(x); ControlNet: the score sampler of
    ControlNetParams(base, θ, C(x)), x the held-out rows."""
    draw, score_of = _draw(s, method), _guided_score(s.config, s.sde, s.apply_fn, n, classifier_for(s))
    held = image_condition.heldout_conditions(s.config, s.data.heldout["x"], n)
    if image_condition.kind(s.config) == "controlnet":
        def sample(params, classifier_params, rng):
            base, net = params
            return draw(rng, s.sde, score_of(image_condition.ControlNetParams(base, net, held), classifier_params), shape)

        return sample
    first = None if s.teacher is None else _base_sampler(s.teacher, n)

    def cascade(params, classifier_params, rng):
        base, net = params
        stage = superres.SRStage(lambda z_s, level: score_of(superres.SRParams(net, z_s, level), classifier_params),
                                 lambda key, score_fn: draw(key, s.sde, score_fn, shape), s.sde,
                                 float(image_condition.settings(s.config)["aug_level"]))
        start = (lambda key: (held, jnp.int32(0))) if first is None else functools.partial(first, base)
        samples, nfes = superres.cascade_sample(rng, start, [stage])
        return samples[-1], nfes[0] + nfes[1]

    return cascade


def _pf_ode_bits(s, network: Callable[[Any, Array, Array], Any] = lambda params, rng, x: params) -> NllFn:
    """Bits/dim by the PF-ODE likelihood at t = eps (`sdejax.likelihood`): continuous data −log p(x)/(D ln 2);
    data of L levels in [lo, hi]: −(log p(y) + D log(hi − lo))/(D ln 2) + log2 L (dequantised); the
    score of the network params `network(params, rng, x)` (an image-conditioned run's: given C(x))."""
    from sdejax.likelihood import bits_per_dim, log_likelihood

    e = s.config.eval
    kwargs = dict(divergence=e.get("divergence", "hutchinson_rademacher"), num_probes=e.get("num_probes", 1),
                  rtol=e.get("rtol", 1e-5), atol=e.get("atol", 1e-5))
    n_bits = None if s.data.num_levels is None else math.log2(s.data.num_levels)
    data_range = s.data.data_range or (0.0, 1.0)  # unbounded data: no rescaling

    def nll_bits(params, rng, xb, yb):  # a class-conditional model: log p(x | y) at the held-out labels
        network_params = network(params, jax.random.fold_in(rng, AUGMENT_STREAM), xb)
        score_fn = build.build_score_fn(s.config, s.sde, s.apply_fn, network_params, yb)
        logp, _, nfe = log_likelihood(rng, s.sde, score_fn, xb, **kwargs)
        return bits_per_dim(logp, xb.shape, data_range=data_range, n_bits=n_bits), nfe

    return nll_bits


def consistency_sigmas(config: ml_collections.ConfigDict) -> tuple[float, ...]:
    """`sampling.consistency_sigmas` (descending), default (σ_max,): one step."""
    default = (build.consistency_levels(config)["sigma_max"],)
    return tuple(float(v) for v in config.sampling.get("consistency_sigmas", default))


def _consistency_sampler(s, method: str, n: int, shape: tuple[int, ...]) -> SampleFn:
    """Multistep consistency sampling of f_θ (`get_consistency_fn`) on `consistency_sigmas` (NFE = their
    number); no score is involved. A guided-CD student is conditioned on the sampling labels
    (`conditioning.sample_labels`) and, when w-conditioned, on w = `sampling.guidance_weight`."""
    from sdejax.consistency import get_consistency_fn
    from sdejax.sampling.consistency import consistency_sample

    config = s.config
    levels, sigmas = build.consistency_levels(config), consistency_sigmas(config)
    y = conditioning.sample_labels(config, n)
    cond = {} if y is None else {"y": y}
    if config.model.get("guidance_embedding", False):
        cond["w"] = jnp.full((n,), conditioning.settings(config)["guidance_weight"], jnp.float32)

    def sample(params, classifier_params, rng):
        del classifier_params
        f = get_consistency_fn(s.apply_fn, params, levels["sigma_min"], levels["sigma_data"], **cond)
        return consistency_sample(f, rng, shape, sigmas, levels["sigma_min"])

    return sample


def _masked_sampler(s, method: str, n: int, shape: tuple[int, ...]) -> SampleFn:
    """Ancestral unmasking from all-MASK on `sampling.num_steps` steps of the `sampling.masked_grid`
    grid (NFE = steps); tokens k map to the model range as the images k/(L − 1) (`get_data_scaler`)."""
    c, levels = s.config, int(s.config.model.num_tokens)
    steps, scaler = int(c.sampling.num_steps), transforms.get_data_scaler(c)
    options = dict(num_tokens=levels, schedule=c.training.get("masking_schedule", "linear"), num_steps=steps,
                   grid=c.sampling.get("masked_grid", "uniform"))

    def sample(params, classifier_params, rng):
        del classifier_params
        z = masked_sampling.ancestral_sample(rng, lambda z, t: s.apply_fn(params, z, t), shape, **options)
        return scaler(z.astype(jnp.float32) / (levels - 1)), jnp.int32(steps)

    return sample


def _masked_bits(s) -> NllFn:
    """The NELBO in bits/dim (`sdejax.masked`: a bound on the discrete NLL over the L levels), averaged
    over `eval.num_probes` draws of (t, mask) per example."""
    objective, probes = s.objective(train=False), int(s.config.eval.get("num_probes", 1))

    def nll_bits(params, rng, xb, yb):
        del yb
        context = Context(step=jnp.int32(0), ema_params=params)
        bits = [objective(params, jax.random.fold_in(rng, k), {"x": xb}, context)[1]["bpd"] for k in range(probes)]
        return jnp.mean(jnp.stack(bits), axis=0), jnp.int32(probes)

    return nll_bits


def _udm_sampler(s, method: str, n: int, shape: tuple[int, ...]) -> SampleFn:
    """UDM sampling (`sdejax.udm.udm_sample`) by `sampling.udm_rule` on `sampling.num_steps` points
    t = linspace(T, t_end) from x_T = F_T(x, ε) + `sampling.udm_prior_noise`·z, x the held-out images in
    turn: the push-forward of the data through the forward transform. The cold rules end at t = 0 with
    the state itself; the others at `sampling.eps` (default the SDE's) with the final x̂0."""
    c = s.config
    deg, rule = build.build_degradation(c, s.sde), config_lib.udm_rule(c)
    cold = rule.startswith("cold")
    t_end = deg.t_min if cold else max(deg.t_min, float(c.sampling.get("eps", s.sde.sampling_eps)))
    ts = np.linspace(deg.T, t_end, int(c.sampling.num_steps))
    eta = float(c.sampling.get("eta", 0.0)) if rule == "interp" else 0.0
    held = np.asarray(s.data.heldout["x"])
    x = jnp.asarray(held[np.arange(n) % held.shape[0]])
    noise_std, net = float(c.sampling.get("udm_prior_noise", 0.0)), build.udm_network(s.apply_fn)

    def sample(params, classifier_params, rng):
        del classifier_params
        k_eps, k_z, k_run = jax.random.split(rng, 3)
        x_T = deg.apply(x, deg.noise(k_eps, shape, x.dtype), jnp.full((n,), deg.T, x.dtype))
        x_T = x_T + noise_std * jax.random.normal(k_z, shape, x.dtype)
        out, nfe = udm.udm_sample(k_run, deg, jax.tree_util.Partial(net, params), x_T, ts, rule=rule,
                                  eta=eta, denoise=not cold)
        return out, jnp.int32(nfe)

    return sample


def _conditioned_network(s, params, rng: Array, x: Array) -> Any:
    """The network params given C(x) of the pair (frozen params, θ): ControlNetParams(base, θ, C(x)), or
    SRParams(θ, z_s, s) at s = `superres.aug_level` (ε from `rng`)."""
    base, net = params
    c = image_condition.condition_fn(s.config)(x)
    if image_condition.kind(s.config) == "controlnet":
        return image_condition.ControlNetParams(base, net, c)
    return image_condition.augmented_params(s.config, s.sde, net, c, rng)


def classifier_for(s) -> Optional[tuple[Callable, Any]]:
    """With `sampling.classifier_scale` > 0: (params -> log_prob_fn, EMA params) of the classifier of
    `--mode=train_classifier` in this setup's workdir, restored once per setup; else None."""
    if conditioning.settings(s.config)["classifier_scale"] <= 0:
        return None
    if "classifier" not in s.compiled:
        from sdejax.training import classifier_mode

        s.compiled["classifier"] = classifier_mode.restore_classifier(s.config, s.workdir)
    return s.compiled["classifier"]


SCORE = Family(_score_sampler, lambda config: REPORT_METHODS, nll_bits=_pf_ode_bits)
CONSISTENCY_FAMILY = Family(_consistency_sampler, lambda config: (CONSISTENCY,),
                            method_name=lambda s, method: CONSISTENCY)
PROGRESSIVE = Family(lambda s, method, n, shape: _score_sampler(s, "ddim", n, shape), lambda config: ("ddim",),
                     sampled_params=lambda state: state.target_params,
                     method_name=lambda s, method: f"ddim{build.pd_sampling_steps(s.config, int(s.state.step))}")
UDM = Family(_udm_sampler, lambda config: ("udm",), method_name=lambda s, method: "udm")
MASKED = Family(_masked_sampler, lambda config: (ANCESTRAL,), method_name=lambda s, method: ANCESTRAL,
                nll_bits=_masked_bits)
CONDITIONED = Family(_conditioned_sampler, lambda config: REPORT_METHODS, nll_bits=lambda s: _pf_ode_bits(
    s, functools.partial(_conditioned_network, s)))
FAMILIES = {"dsm": SCORE, "ct": CONSISTENCY_FAMILY, "ict": CONSISTENCY_FAMILY, "cd": CONSISTENCY_FAMILY,
            "pd": PROGRESSIVE, "masked": MASKED, "udm": UDM}


def family(config: ml_collections.ConfigDict) -> Family:
    """The family of `training.objective` (an image-conditioned run's: `CONDITIONED`)."""
    return CONDITIONED if image_condition.kind(config) else FAMILIES[config_lib.objective_name(config)]
