"""Objects built from a config: random streams, the SDE, the network, its preconditioning, the
training objective, the score function and the optimizer; `setup` builds them all (with the data
source, the device placement and the checkpointer) and restores the newest intact checkpoint.

Randomness: every stream is `fold_in(PRNGKey(config.seed), stream)` (`stream_key`). Toy batches
of step s are drawn from `fold_in(data_key, s)`; image batches come from the TFDS pipeline, whose
iterator state is checkpointed; the loss noise comes from the state's rng, folded per example with
its global index (`step.py`). A resumed run therefore continues exactly as an uninterrupted one,
and the trajectory does not depend on the number of devices or processes.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections

from absl import logging

from sdejax import consistency, degradations, losses, masked, progressive, score, udm
from sdejax import precond as precond_lib
from sdejax import sde as sde_lib
from sdejax.data import transforms
from sdejax.models import convert_flax, lora, mlp, registry
from sdejax.sampling import methods
from sdejax.training import checkpoint, config as config_lib, objective as objective_lib, parallel
from sdejax.training import conditioning, image_condition, latent, sources, state as state_lib

Array = jax.Array

STREAMS = {"init": 0, "state": 1, "split": 2, "batches": 3, "eval": 4, "sample": 5, "entropy": 6, "monitor": 7,
           "latent": 8, "autoencoder": 9}
SDE_PARAMS = {"vesde": ("sigma_min", "sigma_max"), "vpsde": ("beta_min", "beta_max"),
              "subvpsde": ("beta_min", "beta_max"), "cosinevpsde": (), "edmsde": ("sigma_min", "sigma_max")}
DISCRETE_LOSSES = {"vesde": losses.get_smld_loss_fn, "vpsde": losses.get_ddpm_loss_fn}


def stream_key(config: ml_collections.ConfigDict, stream: str) -> Array:
    """The key of one named random stream (`STREAMS`) of the run."""
    return jax.random.fold_in(jax.random.PRNGKey(config.seed), STREAMS[stream])


def build_sde(config: ml_collections.ConfigDict) -> sde_lib.SDE:
    """`config.training.sde` with its parameters from `config.model` (score_sde's key names)."""
    name = config.training.sde.lower()
    if name not in SDE_PARAMS:
        raise ValueError(f"unknown training.sde {config.training.sde!r}; valid: {sorted(SDE_PARAMS)}")
    kwargs = {k: float(config.model[k]) for k in SDE_PARAMS[name]}
    return sde_lib.get_sde(name, N=int(config.model.num_scales), **kwargs)


def build_model(config: ml_collections.ConfigDict, rng: Array, x: Array) -> tuple[Callable[..., Array], Any]:
    """(apply_fn, variables) for `config.model.name`: "mlp" (`sdejax.models.mlp`, initialised on
    the example `x[:1]`), every other name from the U-Net registry `sdejax.models.registry`, on the data's
    shape (a latent run's: `latent.network_config`; a downsampled run's: `image_condition.network_config`)."""
    config, name = image_condition.network_config(latent.network_config(config)), config.model.name
    if name == "mlp":
        model = mlp.from_config(config)
        return mlp.make_apply_fn(model), model.init({"params": rng}, x[:1], jnp.ones((1,), x.dtype),
                                                    **registry.guidance_inputs(config))
    if name not in registry.MODELS:
        raise ValueError(f"unknown model.name {name!r}; valid: {sorted(['mlp', *registry.MODELS])}")
    model, variables = registry.init_model(config, rng)
    return registry.make_apply_fn(model), variables


def build_precond(config: ml_collections.ConfigDict, sde: sde_lib.SDE) -> precond_lib.Precond:
    """`model.precond`: "default" (the schedule's own, `sde.default_precond`, with `model.prediction`),
    "plain" (`model.prediction` from labels `model.noise_labels`) or "edm" (`model.sigma_data`)."""
    m = config.model
    name = m.get("precond", "default")
    if name not in config_lib.PRECONDS:
        raise ValueError(f"unknown model.precond {name!r}; valid: {list(config_lib.PRECONDS)}")
    if name == "edm":
        return precond_lib.Precond.edm(float(m.get("sigma_data", 0.5)))
    if name == "plain":
        return precond_lib.Precond.plain(m.get("prediction") or "eps", m.get("noise_labels", "time"))
    return score.resolve_precond(sde, None, m.get("prediction"), config.training.continuous)


def build_loss_fn(config: ml_collections.ConfigDict, sde: sde_lib.SDE, apply_fn, train: bool) -> losses.LossFn:
    """The library loss `loss_fn(params, rng, batch) -> (loss, aux)`: continuous DSM (EDM's loss with
    model.precond = "edm" and training.time_sampling = "lognormal"), or for `training.continuous =
    False` SMLD (VE) / DDPM (VP), as the original. With `model.num_classes` > 0 the network is
    class-conditional on `batch["y"]`, labels dropped to the null class with probability
    `training.p_uncond` (classifier-free guidance training)."""
    t = config.training
    classes = dict(num_classes=config.model.get("num_classes", 0), p_uncond=t.get("p_uncond", 0.0))
    if t.continuous:
        return losses.get_sde_loss_fn(sde, apply_fn, train, reduce_mean=t.reduce_mean, continuous=True,
                                      likelihood_weighting=t.likelihood_weighting,
                                      importance_weighting=t.get("importance_weighting", False),
                                      precond=build_precond(config, sde), eps=t.get("eps", max(1e-5, sde.t_min)),
                                      time_sampling=t.get("time_sampling", "uniform"),
                                      p_mean=t.get("p_mean", -1.2), p_std=t.get("p_std", 1.2), **classes)
    name = t.sde.lower()
    if name not in DISCRETE_LOSSES:
        raise ValueError(f"discrete training (training.continuous=False) supports {sorted(DISCRETE_LOSSES)}; "
                         f"got {t.sde!r}")
    return DISCRETE_LOSSES[name](sde, apply_fn, train, reduce_mean=t.reduce_mean, **classes)


@dataclasses.dataclass(frozen=True)
class Teacher:
    """A frozen score model (consistency distillation's teacher, a ControlNet's base, a cascade's
    low-resolution model): its own saved config, schedule and network, and the EMA parameters of its
    newest checkpoint, loaded once (`load_frozen`)."""

    config: ml_collections.ConfigDict
    sde: sde_lib.SDE
    apply_fn: Callable[..., Array]
    params: Any
    step: int

    def score_fn(self, params: Any) -> Callable[..., Array]:
        """`score_fn(x, σ, y=None)` of the teacher network with `params` (EDM schedule: t = σ; classes y
        of a class-conditional teacher, None its null class)."""
        return functools.partial(_score_with_labels, self.config, self.sde, self.apply_fn, params)


def _score_with_labels(config, sde, apply_fn, params, x: Array, t: Array, y: Array | None = None) -> Array:
    return build_score_fn(config, sde, apply_fn, params, y)(x, t)


def load_frozen(workdir: pathlib.Path, key: str, check: Callable[[ml_collections.ConfigDict, pathlib.Path], None],
                example_x: Array, sharding: jax.sharding.Sharding | None = None) -> Teacher:
    """The frozen model of the workdir `key` names: the newest intact checkpoint's EMA parameters, built
    with the config saved beside them (not this run's), which `check(saved config, workdir)` accepts."""
    ckpt = checkpoint.Checkpointer(workdir / "checkpoints", keep=None)
    step = ckpt.latest_step()
    if step is None:
        raise FileNotFoundError(f"{key}: no checkpoint in {workdir / 'checkpoints'}")
    teacher_config = ml_collections.ConfigDict(ckpt.saved_config(step))
    if not teacher_config:
        raise ValueError(f"{key}: checkpoint step {step} in {workdir} carries no config")
    check(teacher_config, workdir)
    apply_fn, variables = build_model(teacher_config, stream_key(teacher_config, "init"), example_x)
    target = state_lib.create_train_state(variables, state_lib.get_optimizer(teacher_config.optim),
                                          stream_key(teacher_config, "state"))
    restored, _ = ckpt.restore(target, step=step, sharding=sharding)
    ckpt.close()
    logging.info("%s: EMA parameters of step %d in %s", key, step, workdir)
    return Teacher(teacher_config, build_sde(teacher_config), apply_fn, restored.ema_params, step)


def load_teacher(config: ml_collections.ConfigDict, example_x: Array,
                 sharding: jax.sharding.Sharding | None = None) -> Teacher:
    """The teacher of `training.teacher_workdir` (`load_frozen`), which must train a score model ("dsm")
    on the EDM schedule (CD), or (progressive distillation, "pd") on this run's schedule and network."""
    check = _check_pd_teacher if config_lib.objective_name(config) == "pd" else _check_cd_teacher
    return load_frozen(pathlib.Path(config.training.teacher_workdir), "training.teacher_workdir",
                       functools.partial(check, config), example_x, sharding)


_EMA_KEYS = ("ema_rate", "ema_warmup")


def _network_keys(c: ml_collections.ConfigDict) -> dict:
    """The `config.model` entries that shape the network (its name and own keys, `config.NETWORK_KEYS`)."""
    own = config_lib.NETWORK_KEYS.get(c.model.get("name"), frozenset())
    return _as_saved({k: v for k, v in c.model.to_dict().items() if k == "name" or k in own})


def _as_saved(d: dict) -> dict:
    """`d` as a checkpoint's saved (JSON) config holds it: tuples as lists."""
    return json.loads(json.dumps(d))


def _check_cd_teacher(config: ml_collections.ConfigDict, teacher_config: ml_collections.ConfigDict,
                      workdir: pathlib.Path) -> None:
    """CD's teacher is a DSM score model on the EDM schedule. Guided CD needs a teacher with this run's classes, trained with label dropout (its null class is
    the unconditional score); a LoRA student adapts the teacher's own network (same network keys)."""
    if config_lib.objective_name(teacher_config) != "dsm" or teacher_config.training.sde.lower() != "edmsde":
        raise ValueError(f"training.teacher_workdir must hold a score model trained with training.objective = "
                         f"'dsm' and training.sde = 'edmsde' (sigma = t); {workdir} has objective "
                         f"{config_lib.objective_name(teacher_config)!r}, sde {teacher_config.training.sde!r}")
    k, tm = config.model.get("num_classes", 0), teacher_config.model
    if "cd_guidance" in config.training and (tm.get("num_classes", 0) != k
                                             or not teacher_config.training.get("p_uncond", 0.0) > 0):
        raise ValueError(f"training.cd_guidance: training.teacher_workdir must hold a class-conditional model with "
                         f"model.num_classes = {k} trained with label dropout (training.p_uncond > 0); {workdir} has "
                         f"num_classes {tm.get('num_classes', 0)}, p_uncond {teacher_config.training.get('p_uncond', 0.0)}")
    if "lora_rank" in config.training and _network_keys(teacher_config) != _network_keys(config):
        raise ValueError(f"training.lora_rank: a LoRA student adapts the teacher's network, so config.model must "
                         f"build the same one; {workdir} has {_network_keys(teacher_config)}, this run "
                         f"{_network_keys(config)}")


def _check_pd_teacher(config: ml_collections.ConfigDict, teacher_config: ml_collections.ConfigDict,
                      workdir: pathlib.Path) -> None:
    """PD's student is the teacher's network read the same way: a DSM teacher with this run's
    `training.sde` and `config.model` (EMA settings aside)."""
    model = lambda c: _as_saved({k: v for k, v in c.model.to_dict().items() if k not in _EMA_KEYS})  # noqa: E731
    if config_lib.objective_name(teacher_config) != "dsm" or teacher_config.training.sde != config.training.sde \
            or model(teacher_config) != model(config):
        raise ValueError(f"training.objective = 'pd': training.teacher_workdir must hold a DSM model with this run's "
                         f"training.sde and config.model (EMA keys aside); {workdir} has objective "
                         f"{config_lib.objective_name(teacher_config)!r}, sde {teacher_config.training.sde!r}, "
                         f"model {model(teacher_config)} vs {model(config)}")


def pd_schedule(config: ml_collections.ConfigDict) -> dict:
    """(steps_per_stage K, teacher_steps N₀) of progressive distillation."""
    t = config.training
    return dict(steps_per_stage=int(t.pd_steps_per_stage), teacher_steps=int(t.pd_teacher_steps))


def pd_sampling_steps(config: ml_collections.ConfigDict, step: int) -> int:
    """DDIM steps of θ⁻ after `step` optimizer steps: N₀/2^min(⌊step/K⌋, log₂ N₀) (the student of the
    last completed stage; N₀ before the first ends, when θ⁻ is the DSM teacher)."""
    k = pd_schedule(config)
    return k["teacher_steps"] >> min(step // k["steps_per_stage"], progressive.num_stages(k["teacher_steps"]))


def consistency_levels(config: ml_collections.ConfigDict) -> dict:
    """σ_min, σ_max (of the EDM schedule, `config.model`) and σ_data of a consistency model."""
    m = config.model
    return dict(sigma_min=float(m.get("sigma_min", 0.002)), sigma_max=float(m.get("sigma_max", 80.0)),
                sigma_data=float(m.get("sigma_data", 0.5)))


def ct_total_steps(config: ml_collections.ConfigDict) -> int:
    """K of the CT/iCT schedules: `training.ct_total_steps`, default `training.n_iters`."""
    return int(config.training.get("ct_total_steps", config.training.n_iters))


def build_objective(config: ml_collections.ConfigDict, sde: sde_lib.SDE, apply_fn, train: bool,
                    teacher: Teacher | None = None) -> objective_lib.Objective:
    """What the train step (and the eval loss) call: `objective(params, rng, batch, context)`: for
    `training.objective` = "dsm" (default) the library loss of `build_loss_fn`, which needs no context
    (`objective.from_loss`); "ct", "ict", "cd" the consistency objectives of `sdejax.consistency` on
    the EDM levels of `config.model` (CT/iCT schedules over `ct_total_steps`; CD with `teacher`,
    `training.cd_solver` and `training.num_scales`); "pd" progressive distillation (`sdejax.progressive`,
    the teacher θ⁻ = `context.target_params`, N(step) of `pd_schedule`, last time `sampling.eps`); an
    image-conditioned run's DSM loss on its network params (`image_condition.objective`)."""
    name = config_lib.objective_name(config)
    if name == "dsm" and image_condition.kind(config):
        return image_condition.objective(config, sde, build_loss_fn(config, sde, apply_fn, train))
    if name == "dsm":
        return objective_lib.from_loss(build_loss_fn(config, sde, apply_fn, train))
    t = config.training
    levels = dict(consistency_levels(config), train=train, distance_kind=t.get("consistency_distance", "l2"))
    schedule = {k: int(t[f"ct_{k}"]) for k in ("s0", "s1") if f"ct_{k}" in t}
    if name == "ct":
        return consistency.ct_objective(apply_fn, ct_total_steps(config), **schedule, **levels)
    if name == "ict":
        levels["distance_kind"] = t.get("consistency_distance", "pseudo_huber")
        return consistency.ict_objective(apply_fn, ct_total_steps(config), **schedule, **levels)
    if name == "cd":
        if teacher is None:
            raise ValueError("training.objective = 'cd' needs the teacher (`load_teacher`)")
        if "cd_guidance" in t:
            levels.update(guidance=tuple(float(w) for w in t.cd_guidance),
                          student_sees_w=config.model.get("guidance_embedding", False))
        lora_scale = student_lora_scale(config)
        student = apply_fn if lora_scale is None else lora.joined_apply_fn(apply_fn, lora_scale)
        objective = consistency.cd_objective(student, teacher.score_fn, num_scales=t.get("num_scales", 18),
                                             solver=t.get("cd_solver", "heun"), skip=t.get("cd_skip", 1), **levels)
        return objective if lora_scale is None else objective_lib.with_frozen_base(objective)
    if name == "pd":
        n_fn = lambda step, k=pd_schedule(config): progressive.pd_num_steps(step, **k)  # noqa: E731
        return progressive.pd_objective(apply_fn, sde, build_precond(config, sde), n_fn,
                                        eps=config.sampling.get("eps", None), train=train)
    if name == "masked":
        return masked_objective(config, apply_fn, train)
    if name == "udm":
        loss = udm.udm_loss(udm_network(apply_fn), build_degradation(config, sde), "mse", train=train)
        return objective_lib.from_loss(loss)
    raise config_lib.VALUE_RULES["training.objective"].error("training.objective", name)


def build_degradation(config: ml_collections.ConfigDict, sde: sde_lib.SDE) -> degradations.Degradation:
    """`training.degradation` of the UDM objective: "gaussian" (F_t = α_t x0 + σ_t ε of this run's SDE),
    "blur" (Gaussian blur of std `blur_sigma_max`·√t, or ·t with `blur_schedule = "linear"`) or "mask"
    (round(t·P) pixels set to `mask_fill` in the fixed order of seed `mask_seed`)."""
    t = config.training
    kwargs = {"gaussian": lambda: {"sde": sde},
              "blur": lambda: {"sigma_max": float(t.get("blur_sigma_max", 8.0)),
                               "schedule": t.get("blur_schedule", "sqrt")},
              "mask": lambda: {"fill": float(t.get("mask_fill", 0.0)), "seed": int(t.get("mask_seed", 0))}}
    name = t.get("degradation", "blur")
    return degradations.get_degradation(name, **kwargs[name]())


def udm_network(apply_fn):
    """The UDM restorer x̂0 = G(x_t, t): the network's output itself, with labels 999·t (score_sde's VP time
    labels, the scale the U-Nets' sinusoidal embedding expects)."""
    return lambda params, x, t, **kwargs: apply_fn(params, x, 999.0 * t, **kwargs)


def masked_objective(config: ml_collections.ConfigDict, apply_fn, train: bool) -> objective_lib.Objective:
    """Masked (absorbing-state) diffusion's NELBO (`sdejax.masked.masked_diffusion_loss`, schedule
    `training.masking_schedule`) on the images of the batch read as tokens: x in the model's range
    -> [0, 1] (`get_data_inverse_scaler`) -> round((L − 1)·x), L = `model.num_tokens` levels."""
    levels, to_unit = int(config.model.num_tokens), transforms.get_data_inverse_scaler(config)
    loss = masked.masked_diffusion_loss(apply_fn, levels, config.training.get("masking_schedule", "linear"),
                                        train=train)
    return objective_lib.from_loss(lambda params, rng, batch: loss(
        params, rng, {**batch, "x": masked.levels_to_tokens(to_unit(batch["x"]), levels)}))


def student_lora_scale(config: ml_collections.ConfigDict) -> float | None:
    """s = α/r of a LoRA student (`training.lora_rank`, `lora_alpha`; LCM-LoRA), None for a full one."""
    t = config.training
    return None if "lora_rank" not in t else lora.lora_scale(int(t.lora_rank), t.get("lora_alpha", None))


def target_rate(config: ml_collections.ConfigDict) -> Callable[[Array], Array] | None:
    """μ(step) of the target θ⁻ ← μ θ⁻ + (1 − μ) θ: CT's `ct_ema_rate(step, K)`, CD's constant
    `training.target_ema` (default 0.95), PD's `pd_target_rate` (θ⁻ ← θ after each stage's last step,
    else frozen); None for objectives without a target (dsm; iCT: θ⁻ = sg(θ))."""
    name = config_lib.objective_name(config)
    if name == "ct":
        return lambda step, k=ct_total_steps(config): consistency.ct_ema_rate(step, k)
    if name == "cd":
        return lambda step, mu=float(config.training.get("target_ema", 0.95)): jnp.asarray(mu, jnp.float32)
    if name == "pd":
        return lambda step, k=pd_schedule(config)["steps_per_stage"]: progressive.pd_target_rate(step, k)
    return None


def build_score_fn(config: ml_collections.ConfigDict, sde: sde_lib.SDE, apply_fn, params,
                   y: Array | None = None) -> Callable[[Array, Array], Array]:
    """`score_fn(x, t)` of the network with `params` (and classes `y` of a class-conditional network;
    None: its null class), read through the configured preconditioner."""
    return score.get_score_fn(sde, apply_fn, params, precond=build_precond(config, sde), y=y)


FAMILY_SAMPLING_KEYS = ("consistency_sigmas", "masked_grid", "udm_rule", "udm_prior_noise")  # read by the non-score samplers


def sampler_options(config: ml_collections.ConfigDict, step: int = 0) -> dict:
    """`config.sampling` as `sdejax.sampling.methods.from_config` reads it: without the guidance keys
    and the other families' sampler keys (`FAMILY_SAMPLING_KEYS`); a PD run's sampler is DDIM on the
    `pd_sampling_steps(config, step)` + 1 grid points."""
    options = {k: v for k, v in conditioning.method_options(config.sampling).items() if k not in FAMILY_SAMPLING_KEYS}
    if config_lib.objective_name(config) == "pd":
        options.update(method="ddim", num_steps=pd_sampling_steps(config, step) + 1)
    return options


@dataclasses.dataclass
class Setup:
    """Everything the modes share, built from a config. `state` is un-replicated (what is saved)."""

    config: ml_collections.ConfigDict
    sde: sde_lib.SDE
    data: sources.DataSource
    apply_fn: Callable[..., Array]
    tx: Any
    state: state_lib.TrainState
    checkpointer: checkpoint.Checkpointer
    placement: parallel.Placement
    objective_fn: Callable[[bool], objective_lib.Objective] | None = None  # None: `build_objective` of the config
    workdir: pathlib.Path | None = None
    compiled: dict = dataclasses.field(default_factory=dict)  # programs compiled for this setup, by name
    teacher: Teacher | None = None  # the frozen model of CD, ControlNet, a cascade (`load_frozen`; not in the state)

    @property
    def teacher_params(self) -> Any:
        """The teacher's parameters (an argument of the jitted step, `Context.teacher_params`), or None."""
        return None if self.teacher is None else self.teacher.params

    def network_params(self, params: Any) -> Any:
        """The variables `apply_fn` runs with for the trained `params`: themselves, or for a LoRA student
        the teacher's variables with the adapter merged in (W + s·AB, `lora.merge`); for an image-conditioned
        run the pair (frozen model's params or None, params), which its sampler completes with the condition."""
        if image_condition.kind(self.config):
            return (self.teacher_params, params)
        scale = student_lora_scale(self.config)
        return params if scale is None else lora.merge(self.teacher.params, params, scale)

    def objective(self, train: bool) -> objective_lib.Objective:
        """The objective the train step (train=True) and the eval loss (train=False) call."""
        if self.objective_fn is not None:
            return self.objective_fn(train)
        return build_objective(self.config, self.sde, self.apply_fn, train, self.teacher)


def check_classes(config: ml_collections.ConfigDict, data: sources.DataSource) -> None:
    """A class-conditional network (`model.num_classes` > 0) needs a source with as many classes."""
    n = config.model.get("num_classes", 0)
    if n and n != data.num_classes:
        raise ValueError(f"model.num_classes={n} but data.dataset={config.data.dataset!r} has "
                         f"{data.num_classes or 'no'} class labels; set model.num_classes to "
                         f"{data.num_classes} (0: unconditional)")


def check_tokens(config: ml_collections.ConfigDict, data: sources.DataSource) -> None:
    """Masked diffusion reads the source's quantised levels as its `model.num_tokens` tokens."""
    if config_lib.objective_name(config) != "masked":
        return
    if data.num_levels is None or data.data_range is None:
        raise ValueError(f"training.objective = 'masked' needs quantised image data (tokens = intensity levels); "
                         f"data.dataset = {config.data.dataset!r} is continuous")
    if config.model.num_tokens != data.num_levels:
        raise ValueError(f"model.num_tokens = {config.model.num_tokens} but data.dataset = {config.data.dataset!r} "
                         f"has {data.num_levels} intensity levels; set model.num_tokens = {data.num_levels}")


def _same_shapes(a: Any, b: Any) -> bool:
    shapes = lambda tree: jax.tree_util.tree_map(jnp.shape, tree)  # noqa: E731
    return jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b) and shapes(a) == shapes(b)


def _graft(teacher: Any, fresh: Any) -> Any | None:
    """`fresh` with the teacher's leaf at every path the two share, when every teacher leaf has a twin
    of its shape in `fresh` (the student may add leaves, e.g. guided CD's zero-initialised w-embedding,
    so that it starts as the teacher network); None when they do not fit."""
    mine, treedef = jax.tree_util.tree_flatten_with_path(fresh)
    theirs, shapes = dict(jax.tree_util.tree_flatten_with_path(teacher)[0]), dict((k, jnp.shape(v)) for k, v in mine)
    if any(shapes.get(k) != jnp.shape(v) for k, v in theirs.items()):
        return None
    return jax.tree_util.tree_unflatten(treedef, [theirs.get(k, v) for k, v in mine])


def _initial_state(config: ml_collections.ConfigDict, variables: Any, tx,
                   teacher: Teacher | None = None) -> state_lib.TrainState:
    """Step 0 from fresh `variables`, or from a score_sde Flax checkpoint (`model.flax_checkpoint`):
    its training params, and its EMA. Objectives with a target θ⁻ (`target_rate`) start it at θ; CD
    starts θ (= θ⁻ = EMA) from the teacher's parameters when the networks have the same shapes (the
    consistency models paper's initialisation; `_graft`); PD's student and θ⁻ always do (same network); a LoRA
    student starts as its zero-B adapter (so as the teacher network) on the kernels of
    `training.lora_targets`, by default every kernel with min(fan_in, out) >= r."""
    path, with_target = config.model.get("flax_checkpoint", ""), target_rate(config) is not None
    if student_lora_scale(config) is not None:  # LCM-LoRA: the trained params are the adapter (B = 0)
        rank = int(config.training.lora_rank)
        wide_enough = lambda path, shape: min(math.prod(shape[:-1]), shape[-1]) >= rank  # noqa: E731
        adapter = lora.init_lora(stream_key(config, "init"), jax.device_get(teacher.params), rank,
                                 config.training.get("lora_targets", wide_enough))
        return state_lib.create_train_state(adapter, tx, stream_key(config, "state"), with_target)
    if not path:
        if config_lib.objective_name(config) == "pd" and not _same_shapes(teacher.params, variables):
            raise ValueError("training.objective = 'pd': the teacher's parameters do not fit this run's network")
        grafted = None if teacher is None else _graft(jax.device_get(teacher.params), variables)
        if grafted is not None:  # host copies: the step donates the state, not the teacher
            logging.info("consistency distillation: the student starts from the teacher's parameters")
            variables = grafted
        return state_lib.create_train_state(variables, tx, stream_key(config, "state"), with_target)
    original = convert_flax.read_flax_checkpoint(path)
    state = state_lib.create_train_state(convert_flax.from_flax_params(original["optimizer"]["target"], config),
                                         tx, stream_key(config, "state"), with_target)
    return state.replace(ema_params=convert_flax.from_flax_params(original["params_ema"], config))


def setup(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, allow_config_change: tuple[str, ...] = (),
          step: int | None = None) -> Setup:
    """Check the config, build SDE/data (a latent run's encoded by its autoencoder, `latent.source`)/
    model/optimizer/placement, and restore the newest intact
    checkpoint (or the one at `step`), state and data-iterator position, if any; its config must
    match this one outside `checkpoint.MAY_CHANGE` and the keys named in `allow_config_change`."""
    config_lib.check_config(config)
    placement = parallel.get_placement(config.training.get("parallelism", "jit"))
    sde = build_sde(config)
    pixels = image_condition.source(config, sources.get_source(config, stream_key(config, "split"),
                                                               stream_key(config, "batches")))
    data = latent.source(config, workdir, pixels, stream_key(config, "latent"), allow_config_change)
    check_classes(config, data)
    check_tokens(config, data)
    x, teacher, name = jnp.asarray(data.heldout["x"]), None, config_lib.objective_name(config)
    if name in ("cd", "pd"):  # PD's teacher starts θ and θ⁻ (its later teachers live in the state)
        teacher = load_teacher(config, x, placement.state_sharding())
    if (frozen := image_condition.base_workdir(config)) is not None:  # a ControlNet's base, a cascade's first stage
        teacher = load_frozen(frozen, f"{image_condition.kind(config)}.base_workdir",
                              functools.partial(image_condition.check_base, config), x, placement.state_sharding())
    if image_condition.kind(config):
        apply_fn, variables = image_condition.build_model(config, stream_key(config, "init"), x, teacher)
    else:
        apply_fn, variables = build_model(config, stream_key(config, "init"), x)
    build_objective(config, sde, apply_fn, True, teacher)  # the objective's and the sampler's settings fail
    methods.from_config(sampler_options(config))  # here, before any work
    conditioning.check(config)
    tx = state_lib.get_optimizer(config.optim)
    state = _initial_state(config, variables, tx, teacher)
    t = config.training
    ckpt = checkpoint.Checkpointer(pathlib.Path(workdir) / "checkpoints", keep=t.get("keep_checkpoints", 1),
                                   keep_period=t.snapshot_freq if t.snapshot_freq > 0 else None,
                                   config=config.to_dict(), allow_config_change=allow_config_change)
    restored = ckpt.restore(state, step=step, sharding=placement.state_sharding())
    if restored is not None:
        state, data_state = restored
        data.set_state(data_state)
    return Setup(config, sde, data, apply_fn, tx, state, ckpt, placement, workdir=pathlib.Path(workdir),
                 teacher=None if name == "pd" else teacher)
