"""Fail-fast checks of an ml_collections config: every section and key must be known (a typo such
as `training.batchsize` raises with the list of valid keys; `config.model` keys are checked against
those the chosen network declares, `model_keys`), the keys the driver reads must exist, and every
size, count, frequency, rate and name the driver reads must be in its valid range (`VALUE_RULES`;
a message names the key, the range and the value), all before anything is built.

The key names are those of score_sde, plus a few sdejax additions (marked below).
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable
from typing import Any

import ml_collections

from sdejax import consistency, likelihood, masked, superres, udm
from sdejax import sde as sde_lib
from sdejax.data import registry as data_registry, toy
from sdejax.models import mlp, registry as model_registry
from sdejax.sampling import masked as masked_sampling, methods, pc
from sdejax.training import conditioning, image_condition, latent, parallel, state

_SCORE_SDE_KEYS: dict[str, set[str]] = {
    "training": {"batch_size", "n_iters", "snapshot_freq", "log_freq", "eval_freq",
                 "snapshot_freq_for_preemption", "snapshot_sampling", "likelihood_weighting",
                 "continuous", "reduce_mean", "sde", "n_jitted_steps"},
    "sampling": {"n_steps_each", "noise_removal", "probability_flow", "snr", "method", "predictor", "corrector"},
    # begin_ckpt/end_ckpt: --mode=eval evaluates every retained checkpoint whose (orbax) step is in
    # [begin_ckpt, end_ckpt] (end_ckpt = -1: no upper bound); both 0 (the default): the newest only.
    "eval": {"begin_ckpt", "end_ckpt", "batch_size", "enable_sampling", "num_samples", "enable_loss",
             "enable_bpd"},
    "data": {"dataset", "image_size", "random_flip", "uniform_dequantization", "centered", "num_channels",
             "category", "tfrecords_path"},
    "optim": {"weight_decay", "optimizer", "lr", "beta1", "eps", "warmup", "grad_clip", "amsgrad"},
}
_SDEJAX_KEYS: dict[str, set[str]] = {
    # importance_weighting: t ~ g²/σ² (likelihood weighting); keep_checkpoints: how many rolling
    # (preemption) checkpoints to keep besides the snapshots; parallelism: "jit" (Mesh) or "pmap";
    # grad_accum_steps: microbatches per optimizer step; snapshot_num_samples: samples drawn at snapshots;
    # digits_monitor: log the digits classifier's Fréchet distance of those samples (DIGITS data);
    # unroll_steps: unroll the n_jitted_steps and microbatch loops (default: on CPU; sdejax.training.step).
    # time_sampling/p_mean/p_std/eps: how the DSM loss draws t ("uniform" on [eps, T], "importance",
    # or EDM's "lognormal" ln σ̃ ~ N(p_mean, p_std²)); sdejax.losses.get_sde_loss_fn.
    # p_uncond: probability of dropping a label to the null class (CFG training; model.num_classes > 0).
    # objective: "dsm" (default) or a consistency objective "ct" / "ict" / "cd" (sdejax.consistency;
    # EDM SDE only); ct_total_steps: K of the CT/iCT schedules N(k), μ(k) (default: n_iters);
    # teacher_workdir/cd_solver/num_scales/target_ema: CD's teacher run, its PF-ODE step, the levels N
    # and the constant EMA rate of the target θ⁻ (`check_objective`); "pd" progressive distillation
    # (sdejax.progressive) of the teacher_workdir's DSM model: pd_teacher_steps N₀ (a power of two) and
    # pd_steps_per_stage K (the student of stage s has N₀/2^(s+1) DDIM steps).
    # consistency_distance: d of CT/iCT/CD ("l2", "l1", "pseudo_huber"); ct_s0/ct_s1: s₀, s₁ of the CT/iCT
    # N(k) schedules; cd_guidance (w_min, w_max) and cd_skip k: guided CD (latent consistency models) of a
    # class-conditional teacher trained with label dropout; lora_rank/lora_alpha/lora_targets: CD trains a
    # LoRA adapter (sdejax.models.lora) over the frozen teacher network (LCM-LoRA), rank r, scale α/r and
    # a regex of the adapted kernel paths (default: those with min(fan_in, out) >= r). "masked": masked
    # (absorbing-state) diffusion of quantised images as tokens (sdejax.masked; model.name
    # "token_denoiser"), masking_schedule α(t) "linear" or "cosine". "udm": the unified diffusion
    # framework's x0-prediction MSE (sdejax.udm) under the forward transform `degradation` ("gaussian"
    # of training.sde, cold "blur" of std blur_sigma_max·√t (blur_schedule "sqrt"/"linear"), cold pixel
    # "mask" with mask_fill and mask_seed).
    "training": {"importance_weighting", "keep_checkpoints", "parallelism", "grad_accum_steps",
                 "snapshot_num_samples", "digits_monitor", "unroll_steps", "time_sampling", "p_mean", "p_std",
                 "eps", "p_uncond", "objective", "ct_total_steps", "teacher_workdir", "cd_solver", "num_scales",
                 "target_ema", "pd_teacher_steps", "pd_steps_per_stage", "consistency_distance", "ct_s0", "ct_s1",
                 "cd_guidance", "cd_skip", "lora_rank", "lora_alpha", "lora_targets", "masking_schedule",
                 "degradation", "blur_sigma_max", "blur_schedule", "mask_fill", "mask_seed"},
    # sampling: every option of every method in sdejax.sampling.methods (CONFIG_KEYS), the class
    # labels and guidance of sdejax.training.conditioning, and a consistency model's σ list
    # (consistency_sigmas, descending; default (model.sigma_max,): one step).
    # masked_grid: the time grid of masked diffusion's ancestral sampler ("uniform" or "cosine");
    # udm_rule/udm_prior_noise: the UDM sampler's update rule and the std of the Gaussian perturbation
    # of its x_T = F_T(x, ε) (x: held-out data).
    "sampling": set(methods.ALL_CONFIG_KEYS) | set(conditioning.GUIDANCE_KEYS) | {"consistency_sigmas", "masked_grid",
                                                                                     "udm_rule", "udm_prior_noise"},
    # after_training: run the eval/sampling report when training ends (the quick start);
    # divergence/num_probes/rtol/atol: PF-ODE likelihood settings; num_bpd_batches: evaluate
    # bits/dim on the first n held-out batches only (0 or absent: all).
    # fid_split/fid_num_samples/kid_features/fid_stats_path/inception_weights: reference statistics
    # and sample-quality evaluation (sdejax.evaluation.workflow).
    "eval": {"after_training", "divergence", "num_probes", "rtol", "atol", "num_bpd_batches", "fid_split",
             "fid_num_samples", "kid_features", "fid_stats_path", "inception_weights"},
    # toy data: constructor kwargs, finite training-set size (0 = fresh samples), held-out size;
    # TFDS image data: where records live, input stack ("grain" or "tf"), download permission and
    # reader settings (see sdejax.data.datasets).
    # downsample: model D_f(x), the images area-downsampled by f (a cascade's base, sdejax.training.image_condition).
    "data": {"dataset_kwargs", "num_train", "num_heldout", "data_dir", "stack", "download", "num_threads",
             "prefetch", "num_workers", "downsample"},
    "optim": {"beta2"},  # Adam's β₂ (default 0.999)
}
VALID_KEYS = {k: _SCORE_SDE_KEYS[k] | _SDEJAX_KEYS[k] for k in _SCORE_SDE_KEYS}

REQUIRED_KEYS: dict[str, set[str]] = {
    "training": {"batch_size", "n_iters", "snapshot_freq", "log_freq", "eval_freq",
                 "snapshot_freq_for_preemption", "likelihood_weighting", "continuous", "reduce_mean", "sde"},
    "sampling": {"method", "predictor", "corrector", "snr", "n_steps_each", "probability_flow", "noise_removal"},
    "eval": {"batch_size", "num_samples", "enable_loss", "enable_bpd", "enable_sampling"},
    "data": {"dataset"},
    "model": {"name", "ema_rate"},
    "optim": {"optimizer", "lr", "beta1", "eps", "warmup", "grad_clip", "weight_decay"},
}

# The config.model keys every network shares: name, EMA, the SDE's parameters (sdejax.training.build
# SDE_PARAMS, num_scales), the parameterisation (prediction; precond/sigma_data/noise_labels: how the
# network sees (x, t), sdejax.training.build.build_precond) and a score_sde checkpoint to start from.
PRECONDS = ("default", "plain", "edm")
SHARED_MODEL_KEYS = frozenset({"name", "ema_rate", "ema_warmup", "sigma_min", "sigma_max", "num_scales", "beta_min",
                               "beta_max", "prediction", "precond", "sigma_data", "noise_labels", "flax_checkpoint"})
# Each network's own keys: the MLP's (built by the driver) and every U-Net's of sdejax.models.registry.
NETWORK_KEYS: dict[str, frozenset[str]] = {"mlp": mlp.CONFIG_KEYS,
                                           **{name: net.keys for name, net in model_registry.MODELS.items()}}
TOP_LEVEL = {"training", "sampling", "eval", "data", "model", "optim", "seed"}
OBJECTIVES = ("dsm", "ct", "ict", "cd", "pd", "masked", "udm")
CONSISTENCY_OBJECTIVES = ("ct", "ict", "cd")
CD_SOLVERS = ("heun", "euler")
# keys read only by some objectives (an unread setting fails fast)
OBJECTIVE_KEYS = {"training.ct_total_steps": ("ct", "ict"), "training.teacher_workdir": ("cd", "pd"),
                  "training.cd_solver": ("cd",), "training.num_scales": ("cd",), "training.target_ema": ("cd",),
                  "sampling.consistency_sigmas": CONSISTENCY_OBJECTIVES, "training.pd_teacher_steps": ("pd",),
                  "training.pd_steps_per_stage": ("pd",), "training.consistency_distance": CONSISTENCY_OBJECTIVES,
                  "training.ct_s0": ("ct", "ict"), "training.ct_s1": ("ct", "ict"), "training.cd_guidance": ("cd",),
                  "training.cd_skip": ("cd",), "training.lora_rank": ("cd",), "training.lora_alpha": ("cd",),
                  "training.lora_targets": ("cd",), "training.masking_schedule": ("masked",),
                  "sampling.masked_grid": ("masked",), "training.degradation": ("udm",),
                  "training.blur_sigma_max": ("udm",), "training.blur_schedule": ("udm",), "training.mask_fill": ("udm",),
                  "training.mask_seed": ("udm",), "sampling.udm_rule": ("udm",), "sampling.udm_prior_noise": ("udm",)}
LORA_KEYS = ("lora_alpha", "lora_targets")  # read only with training.lora_rank
OPTIONAL_TOP_LEVEL = {"classifier", "autoencoder", "latent", "superres", "controlnet"}  # the network of
# --mode=train_classifier (sdejax.models.classifier); latent diffusion's autoencoder (--mode=train_autoencoder)
# and, when present, the latent run's settings (sdejax.training.latent); an image-conditioned run's
# (super-resolution, ControlNet: sdejax.training.image_condition), with their (valid, required) keys:
OPTIONAL_SECTIONS = {"autoencoder": (set(latent.AUTOENCODER_KEYS), set(latent.AUTOENCODER_REQUIRED)),
                     "latent": (set(latent.LATENT_DEFAULTS), set()),
                     "superres": (set(image_condition.SUPERRES_DEFAULTS) | set(image_condition.SUPERRES_REQUIRED),
                                  set(image_condition.SUPERRES_REQUIRED)),
                     "controlnet": (set(image_condition.CONTROLNET_DEFAULTS) | set(image_condition.CONTROLNET_REQUIRED),
                                    set(image_condition.CONTROLNET_REQUIRED))}


@dataclasses.dataclass(frozen=True)
class Rule:
    """A valid range: `ok(value)` and how a message states it ("an integer >= 1"); for a name,
    the valid `names` (the message then reads "unknown <key> 'value'; valid: [...]")."""

    description: str
    ok: Callable[[Any], bool]
    names: tuple[str, ...] | None = None

    def error(self, key: str, value: Any) -> ValueError:
        if self.names is not None:
            return ValueError(f"unknown {key} {value!r}; valid: {list(self.names)}")
        return ValueError(f"{key} must be {self.description}; got {value!r}")


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def at_least(lo: int, meaning: str = "") -> Rule:
    """An integer >= lo (`meaning` says what a value means, e.g. "0: never")."""
    return Rule(f"an integer >= {lo}{f' ({meaning})' if meaning else ''}", lambda v: _is_int(v) and v >= lo)


def interval(lo: float, hi: float, closed: str = "[]") -> Rule:
    """A finite real in the interval from lo to hi, `closed` ("[)", "(]", ...) saying which ends belong."""
    def ok(v: Any) -> bool:
        above = v >= lo if closed[0] == "[" else v > lo
        below = v <= hi if closed[1] == "]" else v < hi
        return _is_real(v) and above and below
    return Rule(f"in {closed[0]}{lo:g}, {hi:g}{closed[1]}", ok)


def one_of(names: tuple[str, ...]) -> Rule:
    return Rule(f"one of {list(names)}", lambda v: v in names, names)


POSITIVE = interval(0.0, math.inf, "()")
NON_NEGATIVE = interval(0.0, math.inf, "[)")
FREQUENCY = at_least(0, "0: never")
BOOL = Rule("True or False", lambda v: isinstance(v, bool))

# key -> rule, checked where the key is present (an absent optional key takes the loop's valid default).
VALUE_RULES: dict[str, Rule] = {
    "training.batch_size": at_least(1),
    "training.n_iters": at_least(1, "the number of training steps"),
    "training.n_jitted_steps": at_least(1),
    "training.grad_accum_steps": at_least(1),
    "training.log_freq": FREQUENCY,
    "training.eval_freq": FREQUENCY,
    "training.snapshot_freq": FREQUENCY,
    "training.snapshot_freq_for_preemption": FREQUENCY,
    "training.keep_checkpoints": at_least(1),
    "training.snapshot_num_samples": at_least(1),
    "training.parallelism": one_of(parallel.PARALLELISM),
    "training.eps": interval(0.0, 1.0, "()"),
    "training.p_std": POSITIVE,
    "training.p_uncond": interval(0.0, 1.0, "[]"),
    "training.objective": one_of(OBJECTIVES),
    "training.ct_total_steps": at_least(1, "K of the CT/iCT schedules"),
    "training.teacher_workdir": Rule("a non-empty path", lambda v: isinstance(v, str) and bool(v)),
    "training.cd_solver": one_of(CD_SOLVERS),
    "training.num_scales": at_least(2, "levels incl. sigma_min and sigma_max"),
    "training.target_ema": interval(0.0, 1.0, "[)"),
    "training.pd_teacher_steps": Rule("a power of two >= 2 (the first teacher's DDIM steps N₀)",
                                      lambda v: _is_int(v) and v >= 2 and not v & (v - 1)),
    "training.pd_steps_per_stage": at_least(1, "optimizer steps per halving"),
    "training.consistency_distance": one_of(consistency.DISTANCES),
    "training.ct_s0": at_least(1, "s₀ of the CT/iCT N(k)"),
    "training.ct_s1": at_least(2, "s₁ of the CT/iCT N(k)"),
    "training.cd_guidance": Rule("a pair (w_min, w_max) of reals with w_min <= w_max",
                                 lambda v: isinstance(v, (tuple, list)) and len(v) == 2 and all(map(_is_real, v))
                                 and v[0] <= v[1]),
    "training.cd_skip": at_least(1, "Karras levels the teacher's step crosses"),
    "training.lora_rank": at_least(1),
    "training.masking_schedule": one_of(masked.SCHEDULE_NAMES),
    "sampling.masked_grid": one_of(masked_sampling.GRIDS),
    "training.degradation": one_of(("gaussian", "blur", "mask")),
    "training.blur_sigma_max": POSITIVE,
    "training.blur_schedule": one_of(("sqrt", "linear")),
    "training.mask_fill": interval(-math.inf, math.inf, "()"),
    "training.mask_seed": at_least(0),
    "sampling.udm_rule": one_of(tuple(udm.RULES)),
    "sampling.udm_prior_noise": NON_NEGATIVE,
    "training.lora_alpha": POSITIVE,
    "training.lora_targets": Rule("a non-empty regex of kernel paths", lambda v: isinstance(v, str) and bool(v)),
    "sampling.class_label": at_least(-1, "-1: sample i gets class i mod K"),
    "sampling.guidance_weight": interval(-math.inf, math.inf, "()"),
    "sampling.guidance_rescale": interval(0.0, 1.0, "[]"),
    "sampling.classifier_scale": NON_NEGATIVE,
    "sampling.predictor": one_of(pc.PREDICTORS),
    "sampling.corrector": one_of(pc.CORRECTORS),
    "sampling.snr": NON_NEGATIVE,
    "sampling.n_steps_each": at_least(1),
    "eval.batch_size": at_least(1),
    "eval.num_samples": at_least(1),
    "eval.num_probes": at_least(1),
    "eval.num_bpd_batches": at_least(0, "0: all"),
    "eval.rtol": NON_NEGATIVE,
    "eval.atol": NON_NEGATIVE,
    "eval.divergence": one_of(likelihood.DIVERGENCES),
    "eval.begin_ckpt": at_least(0, "the first checkpoint step to evaluate; 0 with end_ckpt = 0: the newest only"),
    "eval.end_ckpt": at_least(-1, "the last checkpoint step to evaluate; -1: no upper bound"),
    "data.dataset": one_of(tuple(sorted(toy.TOY_DISTRIBUTIONS)) + tuple(sorted(data_registry.DATASETS))),
    "data.num_heldout": at_least(1),
    "data.num_train": at_least(0, "0: fresh samples every step"),
    "model.name": one_of(tuple(NETWORK_KEYS)),
    "model.precond": one_of(PRECONDS),
    "model.ema_rate": interval(0.0, 1.0, "[)"),
    "model.ema_warmup": BOOL,
    "optim.optimizer": one_of(state.OPTIMIZERS),
    "optim.lr": POSITIVE,
    "optim.warmup": at_least(0, "0: no warm-up"),
    "optim.grad_clip": interval(-math.inf, math.inf, "()"),
    "optim.beta1": interval(0.0, 1.0, "[)"),
    "optim.beta2": interval(0.0, 1.0, "[)"),
    "optim.eps": POSITIVE,
    "optim.weight_decay": NON_NEGATIVE,
    "autoencoder.kind": one_of(tuple(sorted(latent.KINDS))),
    "autoencoder.f": Rule("2, 4 or 8 (the downsampling factor)", lambda v: _is_int(v) and v in (2, 4, 8)),
    "autoencoder.latent_channels": at_least(1),
    "autoencoder.features": Rule("a multiple of 4 >= 4 (GroupNorm groups of 4 channels)",
                                 lambda v: _is_int(v) and v >= 4 and v % 4 == 0),
    "autoencoder.channel_mult": Rule("None or a sequence of integers >= 1 (widths features·m per level)",
                                     lambda v: v is None or (isinstance(v, (tuple, list)) and len(v) > 0
                                                             and all(_is_int(m) and m >= 1 for m in v))),
    "autoencoder.num_res_blocks": at_least(0),
    "autoencoder.n_iters": at_least(1, "the autoencoder's training steps"),
    "autoencoder.batch_size": at_least(1),
    "autoencoder.lr": POSITIVE,
    "autoencoder.beta": NON_NEGATIVE,
    "autoencoder.num_codes": at_least(2, "codebook size K"),
    "autoencoder.commitment": NON_NEGATIVE,
    "autoencoder.scale_batches": at_least(1, "training batches the latent scale is estimated on"),
    "latent.use_mean": BOOL,
    "latent.autoencoder_workdir": Rule("None (<workdir>/autoencoder) or a non-empty path",
                                       lambda v: v is None or (isinstance(v, str) and bool(v))),
    "data.downsample": at_least(1, "1: the images themselves"),
    "superres.factor": at_least(2),
    "superres.upsample": one_of(superres.UPSAMPLINGS),
    "superres.aug_max": NON_NEGATIVE,
    "superres.aug_level": NON_NEGATIVE,
    "superres.base_workdir": Rule("None (sample on held-out low-resolution images) or a non-empty path",
                                  lambda v: v is None or (isinstance(v, str) and bool(v))),
    "controlnet.base_workdir": Rule("a non-empty path", lambda v: isinstance(v, str) and bool(v)),
    "controlnet.control": one_of(image_condition.CONTROLS),
    "controlnet.blur_sigma": POSITIVE,
    "controlnet.factor": at_least(2),
    "controlnet.hint_channels": Rule("a non-empty sequence of integers >= 1",
                                     lambda v: isinstance(v, (tuple, list)) and len(v) > 0
                                     and all(_is_int(m) and m >= 1 for m in v)),
    "controlnet.num_blocks": Rule("None (DiT: depth // 2) or an integer >= 1", lambda v: v is None or (_is_int(v) and v >= 1)),
    "controlnet.scale": interval(-math.inf, math.inf, "()"),
    "training.sde": Rule(f"one of {sorted(sde_lib.SDES)}", lambda v: isinstance(v, str) and v.lower() in sde_lib.SDES,
                         tuple(sorted(sde_lib.SDES))),
    "seed": Rule("an integer", _is_int),
}


def _lookup(config: ml_collections.ConfigDict, key: str) -> tuple[bool, Any]:
    """(present, value) of a dotted key."""
    *sections, name = key.split(".")
    node = config
    for section in sections:
        node = node.get(section, {})
    return name in node, node.get(name)


def check_values(config: ml_collections.ConfigDict) -> None:
    """Raise ValueError naming the first key of `VALUE_RULES` out of its range, or a batch that does
    not split into `training.grad_accum_steps` microbatches."""
    for key, rule in VALUE_RULES.items():
        present, value = _lookup(config, key)
        if present and not rule.ok(value):
            raise rule.error(key, value)
    t = config.training
    if t.batch_size % t.get("grad_accum_steps", 1):
        raise ValueError(f"training.batch_size={t.batch_size} must be a multiple of "
                         f"training.grad_accum_steps={t.grad_accum_steps} (equal microbatches)")
    begin, end = config.eval.get("begin_ckpt", 0), config.eval.get("end_ckpt", 0)
    if end >= 0 and begin > end:
        raise ValueError(f"eval.begin_ckpt={begin} > eval.end_ckpt={end}: no checkpoint step is in the range "
                         "(eval.end_ckpt = -1: no upper bound)")


def objective_name(config: ml_collections.ConfigDict) -> str:
    """`training.objective` ("dsm" when absent)."""
    return config.training.get("objective", "dsm")


def is_consistency(config: ml_collections.ConfigDict) -> bool:
    """Whether the run trains a consistency model (sampled by `consistency_sample`, no score)."""
    return objective_name(config) in CONSISTENCY_OBJECTIVES


def _check_sigmas(config: ml_collections.ConfigDict) -> None:
    present, sigmas = _lookup(config, "sampling.consistency_sigmas")
    if not present:
        return
    lo = float(config.model.get("sigma_min", 0.002))
    ok = isinstance(sigmas, (list, tuple)) and len(sigmas) >= 1 and all(_is_real(v) for v in sigmas)
    if not (ok and all(a > b for a, b in zip(sigmas, sigmas[1:])) and sigmas[-1] >= lo):
        raise ValueError(f"sampling.consistency_sigmas must be a non-empty strictly decreasing sequence of reals "
                         f">= model.sigma_min = {lo} (e.g. (80.0, 0.821)); got {sigmas!r}")


def check_objective(config: ml_collections.ConfigDict) -> None:
    """Raise ValueError for settings the chosen `training.objective` cannot use: a consistency
    objective needs the EDM schedule (α = 1, σ = t: `training.sde = "edmsde"`) and no bits/dim (no
    score, so no PF-ODE likelihood); CD needs `training.teacher_workdir`; a class-conditional
    consistency model is guided CD's student (`_check_guided`); a key another objective reads
    (`OBJECTIVE_KEYS`) may not be set."""
    name, t = objective_name(config), config.training
    for key, readers in OBJECTIVE_KEYS.items():
        if _lookup(config, key)[0] and name not in readers:
            raise ValueError(f"{key} is read by training.objective in {list(readers)} only; "
                             f"training.objective = {name!r}")
    for key in LORA_KEYS:
        if key in t and "lora_rank" not in t:
            raise ValueError(f"training.{key} is read only with training.lora_rank (a LoRA student)")
    if config.model.get("guidance_embedding", False) and "cd_guidance" not in t:
        raise ValueError("model.guidance_embedding = True: the network takes the guidance weight w, which only "
                         "guided consistency distillation provides (training.objective = 'cd', training.cd_guidance)")
    if name == "pd":
        _check_pd(config)
    tokens = model_registry.MODELS[config.model.name].tokens if config.model.name in model_registry.MODELS else False
    if tokens != (name == "masked"):
        raise ValueError(f"training.objective = 'masked' goes with a token network (model.name = 'token_denoiser') "
                         f"and a token network with it; got training.objective = {name!r}, "
                         f"model.name = {config.model.name!r}")
    if name == "masked" and config.data.get("uniform_dequantization", False):
        raise ValueError("training.objective = 'masked' models the intensity levels themselves as tokens: set "
                         "data.uniform_dequantization = False (x = k/(L − 1))")
    if name == "udm":
        _check_udm(config)
    if name not in CONSISTENCY_OBJECTIVES:
        return
    if t.sde.lower() != "edmsde":
        raise ValueError(f"training.objective = {name!r} (a consistency model) needs the EDM schedule "
                         f"(alpha = 1, sigma = t): set training.sde = 'edmsde'; got {t.sde!r}")
    if name == "cd" and not t.get("teacher_workdir", ""):
        raise ValueError("training.objective = 'cd' needs training.teacher_workdir: the workdir of a trained "
                         "sdejax score model (training.sde = 'edmsde') whose newest checkpoint's EMA is the teacher")
    if t.get("ct_s1", 2) <= t.get("ct_s0", 1):
        raise ValueError(f"training.ct_s1 = {t.ct_s1} must exceed training.ct_s0 = {t.get('ct_s0')}")
    if t.get("cd_skip", 1) > t.get("num_scales", 18) - 1:
        raise ValueError(f"training.cd_skip = {t.cd_skip} must be at most training.num_scales - 1 = "
                         f"{t.get('num_scales', 18) - 1}")
    if config.eval.enable_bpd:
        raise ValueError(f"eval.enable_bpd: a consistency model (training.objective = {name!r}) has no score "
                         "function, so no probability-flow ODE likelihood; set eval.enable_bpd = False")
    _check_guided(config)
    _check_sigmas(config)


def _check_guided(config: ml_collections.ConfigDict) -> None:
    """Guided CD (`training.cd_guidance`) and class-conditional consistency models go together; its
    student sees w through `model.guidance_embedding`, required unless w_min = w_max (a fixed-w student,
    LCM-LoRA); sampling's w (`sampling.guidance_weight`) is that input, and there is no score to guide."""
    guided, m, g = "cd_guidance" in config.training, config.model, conditioning.settings(config)
    if bool(m.get("num_classes", 0)) != guided:
        raise ValueError("a class-conditional consistency model (model.num_classes > 0) is trained by guided "
                         "distillation only: set both model.num_classes and training.cd_guidance (objective 'cd'), "
                         "or neither")
    if guided and config.training.cd_guidance[0] != config.training.cd_guidance[1] \
            and not m.get("guidance_embedding", False):
        raise ValueError(f"training.cd_guidance = {tuple(config.training.cd_guidance)} draws w per example: the "
                         "student must see it (model.guidance_embedding = True), or fix w_min = w_max")
    if g["guidance_weight"] != 0 and not m.get("guidance_embedding", False):
        raise ValueError("sampling.guidance_weight: a consistency model has no score to guide; only a w-conditioned "
                         "student (model.guidance_embedding = True) takes a guidance weight")
    if g["guidance_rescale"] > 0 or g["classifier_scale"] > 0:
        raise ValueError("sampling.guidance_rescale / classifier_scale: a consistency model has no score to guide")


def udm_rule(config: ml_collections.ConfigDict) -> str:
    """`sampling.udm_rule`, default "cold_improved" for the cold degradations, "deterministic" (DDIM) for
    "gaussian"."""
    gaussian = config.training.get("degradation", "blur") == "gaussian"
    return config.sampling.get("udm_rule", "deterministic" if gaussian else "cold_improved")


def _check_udm(config: ml_collections.ConfigDict) -> None:
    """The cold degradations have no noise to recover: the inverting rules need "gaussian"; the blur
    keys go with "blur", the mask keys with "mask"."""
    degradation, rule = config.training.get("degradation", "blur"), udm_rule(config)
    if rule in udm.INVERTING_RULES and degradation != "gaussian":
        raise ValueError(f"sampling.udm_rule = {rule!r} recovers ε from x_t, which the {degradation!r} degradation "
                         f"has not; use one of {[r for r in udm.RULES if r not in udm.INVERTING_RULES]}")
    if config.eval.enable_bpd:
        raise ValueError("eval.enable_bpd: the UDM objective (training.objective = 'udm') trains an x0 restorer "
                         "with no likelihood; set eval.enable_bpd = False")
    for prefix in ("blur", "mask"):
        keys = [k for k in config.training.keys() if k.startswith(prefix + "_")]
        if keys and degradation != prefix:
            raise ValueError(f"training.{keys[0]} is read only with training.degradation = {prefix!r}; "
                             f"got {degradation!r}")


def _check_pd(config: ml_collections.ConfigDict) -> None:
    """Progressive distillation needs the teacher, N₀ and K; at most log₂ N₀ stages of K steps, each
    ending on a retained snapshot (`training.snapshot_freq` divides K)."""
    t = config.training
    for key in ("teacher_workdir", "pd_teacher_steps", "pd_steps_per_stage"):
        if key not in t:
            raise ValueError(f"training.objective = 'pd' needs training.{key} (teacher_workdir: the workdir of a "
                             "trained sdejax DSM model; pd_teacher_steps N₀; pd_steps_per_stage K)")
    stages = t.pd_teacher_steps.bit_length() - 1
    if t.n_iters > stages * t.pd_steps_per_stage:
        raise ValueError(f"training.n_iters = {t.n_iters} exceeds log2(pd_teacher_steps) * pd_steps_per_stage = "
                         f"{stages} * {t.pd_steps_per_stage}: the last stage distils to one step")
    if t.snapshot_freq <= 0 or t.pd_steps_per_stage % t.snapshot_freq:
        raise ValueError(f"training.snapshot_freq = {t.snapshot_freq} must divide training.pd_steps_per_stage = "
                         f"{t.pd_steps_per_stage} so that every stage ends on a retained checkpoint")


def nothing_to_train(step: int, n_iters: int) -> str | None:
    """The warning for a run whose state is already at (or past) `training.n_iters`, else None."""
    if step < n_iters:
        return None
    return (f"nothing to train: the checkpoint is at step {step} and training.n_iters = {n_iters}; "
            f"raise training.n_iters to continue training")


def _check_keys(where: str, present: set[str], valid: set[str] | None, required: set[str],
                owner: str = "") -> None:
    if valid is not None and (unknown := present - valid):
        raise ValueError(f"unknown config key(s) {sorted(f'{where}.{k}' for k in unknown)}; "
                         f"valid keys of {where}{owner}: {sorted(valid)}")
    if missing := required - present:
        raise ValueError(f"missing config key(s) {sorted(f'{where}.{k}' for k in missing)}")


def model_keys(name: str) -> frozenset[str]:
    """The `config.model` keys valid for the network `name`: its declared ones and the shared ones."""
    if name not in NETWORK_KEYS:
        raise VALUE_RULES["model.name"].error("model.name", name)
    return NETWORK_KEYS[name] | SHARED_MODEL_KEYS


def check_latent(config: ml_collections.ConfigDict) -> None:
    """An autoencoder encodes images whose size f divides, with log2 f + 1 channel multipliers, and has only
    its kind's keys (`latent.check_kind`); a latent run (`config.latent`) needs one, and no classifier
    guidance (the classifier of --mode=train_classifier sees pixels)."""
    if "latent" in config and "autoencoder" not in config:
        raise ValueError("config.latent (latent diffusion) needs config.autoencoder, the autoencoder of "
                         "--mode=train_autoencoder whose latents the model learns")
    if "autoencoder" not in config:
        return
    a = config.autoencoder
    if config.data.dataset not in data_registry.DATASETS:
        raise ValueError(f"config.autoencoder encodes images; data.dataset = {config.data.dataset!r} is not an "
                         f"image dataset (valid: {sorted(data_registry.DATASETS)})")
    if config.data.image_size % a.f:
        raise ValueError(f"autoencoder.f = {a.f} must divide data.image_size = {config.data.image_size}")
    if a.get("channel_mult", None) is not None and len(a.channel_mult) != a.f.bit_length():
        raise ValueError(f"autoencoder.channel_mult needs log2(f) + 1 = {a.f.bit_length()} entries for f = {a.f}; "
                         f"got {tuple(a.channel_mult)}")
    latent.check_kind(config)
    if "latent" in config and conditioning.settings(config)["classifier_scale"] > 0:
        raise ValueError("sampling.classifier_scale > 0: classifier guidance of a latent model would need a "
                         "classifier of the latents; the classifier of --mode=train_classifier sees pixels")


def check_config(config: ml_collections.ConfigDict) -> None:
    """Raise ValueError naming any unknown or missing key (`config.model`'s against `model_keys` of
    `model.name`; the optional sections' against `OPTIONAL_SECTIONS`), any value out of its range
    (`check_values`) or a setting the objective (`check_objective`), latent diffusion (`check_latent`) or an
    image-conditioned run (`image_condition.check`) cannot use."""
    _check_keys("config", set(config.keys()), TOP_LEVEL | OPTIONAL_TOP_LEVEL, TOP_LEVEL)
    for section, required in REQUIRED_KEYS.items():
        valid, owner = VALID_KEYS.get(section), ""
        if section == "model" and "name" in config.model:
            valid, owner = model_keys(config.model.name), f" for model.name={config.model.name!r}"
        _check_keys(section, set(config[section].keys()), valid, required, owner)
    for section, (valid, required) in OPTIONAL_SECTIONS.items():
        if section in config:
            _check_keys(section, set(config[section].keys()), valid, required)
    check_values(config)
    check_objective(config)
    check_latent(config)
    image_condition.check(config)
