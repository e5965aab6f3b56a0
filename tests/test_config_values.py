"""Config values are checked before any work (`check_config`), with the key and its valid range in
the message; the EMA (fixed rate or diffusers' warm-up) equals its closed form on a known
parameter trajectory."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from configs_helper import ROOT, load_config, override, tiny_config

from sdejax.training import config as config_lib, objective
from sdejax.training import state as state_lib
from sdejax.training import step as step_lib

INT_1 = r"must be an integer >= 1"
FREQ = r"must be an integer >= 0 \(0: never\)"
BAD_VALUES = [
    ("training.batch_size", 0, rf"training.batch_size {INT_1}; got 0"),
    ("training.batch_size", -8, rf"training.batch_size {INT_1}; got -8"),
    ("training.batch_size", 32.0, rf"training.batch_size {INT_1}; got 32.0"),
    ("training.n_iters", -5, rf"training.n_iters {INT_1} \(the number of training steps\); got -5"),
    ("training.n_iters", 0, rf"training.n_iters {INT_1} \(the number of training steps\); got 0"),
    ("training.n_jitted_steps", 0, rf"training.n_jitted_steps {INT_1}; got 0"),
    ("training.grad_accum_steps", 0, rf"training.grad_accum_steps {INT_1}; got 0"),
    ("training.grad_accum_steps", 3, r"training.batch_size=32 must be a multiple of training.grad_accum_steps=3"),
    ("training.log_freq", -1, rf"training.log_freq {FREQ}; got -1"),
    ("training.eval_freq", -10, rf"training.eval_freq {FREQ}"),
    ("training.snapshot_freq", 2.5, rf"training.snapshot_freq {FREQ}"),
    ("training.snapshot_freq_for_preemption", -1, rf"training.snapshot_freq_for_preemption {FREQ}"),
    ("training.keep_checkpoints", 0, rf"training.keep_checkpoints {INT_1}; got 0"),
    ("training.snapshot_num_samples", 0, rf"training.snapshot_num_samples {INT_1}"),
    ("training.parallelism", "dp", r"unknown training.parallelism 'dp'; valid: \['jit', 'pmap'\]"),
    ("training.eps", 0.0, r"training.eps must be in \(0, 1\); got 0.0"),
    ("training.eps", 1.5, r"training.eps must be in \(0, 1\); got 1.5"),
    ("training.p_std", 0.0, r"training.p_std must be in \(0, inf\)"),
    ("training.p_uncond", 1.5, r"training.p_uncond must be in \[0, 1\]; got 1.5"),
    ("sampling.class_label", -2, r"sampling.class_label must be an integer >= -1 \(-1: sample i gets class i mod K\); got -2"),
    ("sampling.guidance_weight", float("nan"), r"sampling.guidance_weight must be in \(-inf, inf\); got nan"),
    ("sampling.guidance_rescale", 1.5, r"sampling.guidance_rescale must be in \[0, 1\]; got 1.5"),
    ("sampling.classifier_scale", -1.0, r"sampling.classifier_scale must be in \[0, inf\); got -1.0"),
    ("sampling.snr", -0.1, r"sampling.snr must be in \[0, inf\)"),
    ("sampling.n_steps_each", 0, rf"sampling.n_steps_each {INT_1}"),
    ("eval.batch_size", 0, rf"eval.batch_size {INT_1}; got 0"),
    ("eval.num_samples", 0, rf"eval.num_samples {INT_1}; got 0"),
    ("eval.num_probes", 0, rf"eval.num_probes {INT_1}"),
    ("eval.num_bpd_batches", -1, r"eval.num_bpd_batches must be an integer >= 0 \(0: all\)"),
    ("eval.rtol", -1e-5, r"eval.rtol must be in \[0, inf\)"),
    ("eval.atol", float("nan"), r"eval.atol must be in \[0, inf\); got nan"),
    ("eval.divergence", "hutchinson", r"unknown eval.divergence 'hutchinson'; valid: \['exact'"),
    ("data.num_heldout", 0, rf"data.num_heldout {INT_1}"),
    ("data.num_train", -1, r"data.num_train must be an integer >= 0"),
    ("model.ema_rate", 1.0, r"model.ema_rate must be in \[0, 1\); got 1.0"),
    ("model.ema_warmup", "yes", r"model.ema_warmup must be True or False; got 'yes'"),
    ("optim.optimizer", "SGD", r"unknown optim.optimizer 'SGD'; valid: \['Adam', 'AdamW', 'RAdam'\]"),
    ("optim.lr", 0.0, r"optim.lr must be in \(0, inf\); got 0.0"),
    ("optim.lr", -1e-3, r"optim.lr must be in \(0, inf\)"),
    ("optim.lr", float("inf"), r"optim.lr must be in \(0, inf\); got inf"),
    ("optim.warmup", -1, r"optim.warmup must be an integer >= 0 \(0: no warm-up\)"),
    ("optim.grad_clip", float("nan"), r"optim.grad_clip must be in \(-inf, inf\)"),
    ("optim.beta1", 1.0, r"optim.beta1 must be in \[0, 1\); got 1.0"),
    ("optim.eps", 0.0, r"optim.eps must be in \(0, inf\)"),
    ("optim.weight_decay", -0.1, r"optim.weight_decay must be in \[0, inf\)"),
    ("seed", "42", r"seed must be an integer; got '42'"),
    ("sampling.predictor", "reverse", r"unknown sampling.predictor 'reverse'; valid: \['euler_maruyama'"),
    ("sampling.corrector", "lang", r"unknown sampling.corrector 'lang'; valid: \['langevin'"),
    ("eval.begin_ckpt", -1, r"eval.begin_ckpt must be an integer >= 0"),
    ("eval.end_ckpt", -2, r"eval.end_ckpt must be an integer >= -1 \(.*-1: no upper bound\)"),
    ("data.dataset", "CIFAR-10", r"unknown data.dataset 'CIFAR-10'; valid: \[.*'two_mode'.*'CIFAR10'"),
    ("model.name", "resnet", r"unknown model.name 'resnet'; valid: \['mlp', 'ncsnpp'"),
    ("model.precond", "karras", r"unknown model.precond 'karras'; valid: \['default', 'plain', 'edm'\]"),
    ("training.sde", "edm", r"unknown training.sde 'edm'; valid: \['cosinevpsde'"),
    ("training.objective", "flow", r"unknown training.objective 'flow'; valid: \['dsm', 'ct', 'ict', 'cd', 'pd', 'masked', 'udm'\]"),
    ("training.pd_teacher_steps", 12, r"training.pd_teacher_steps must be a power of two >= 2"),
    ("training.pd_steps_per_stage", 0, r"training.pd_steps_per_stage must be an integer >= 1"),
    ("training.ct_total_steps", 0, r"training.ct_total_steps must be an integer >= 1 \(K of the CT/iCT"),
    ("training.teacher_workdir", "", r"training.teacher_workdir must be a non-empty path; got ''"),
    ("training.cd_solver", "rk4", r"unknown training.cd_solver 'rk4'; valid: \['heun', 'euler'\]"),
    ("training.num_scales", 1, r"training.num_scales must be an integer >= 2 \(levels incl"),
    ("training.target_ema", 1.0, r"training.target_ema must be in \[0, 1\); got 1.0"),
    ("training.consistency_distance", "lpips", r"unknown training.consistency_distance 'lpips'; valid: \["),
    ("training.ct_s0", 0, r"training.ct_s0 must be an integer >= 1 \(s₀ of the CT/iCT N\(k\)\); got 0"),
    ("training.ct_s1", 1, r"training.ct_s1 must be an integer >= 2 \(s₁ of the CT/iCT N\(k\)\); got 1"),
    ("training.cd_guidance", (4.0, 1.0), r"training.cd_guidance must be a pair \(w_min, w_max\) of reals with "
                                         r"w_min <= w_max; got \(4.0, 1.0\)"),
    ("training.cd_guidance", 2.0, r"training.cd_guidance must be a pair"),
    ("training.cd_skip", 0, r"training.cd_skip must be an integer >= 1 \(Karras levels the teacher's step"),
    ("training.lora_rank", 0, r"training.lora_rank must be an integer >= 1; got 0"),
    ("training.lora_alpha", 0.0, r"training.lora_alpha must be in \(0, inf\); got 0.0"),
    ("training.lora_targets", "", r"training.lora_targets must be a non-empty regex of kernel paths; got ''"),
    ("optim.beta2", 1.0, r"optim.beta2 must be in \[0, 1\); got 1.0"),
    ("training.masking_schedule", "cos", r"unknown training.masking_schedule 'cos'; valid: \['cosine', 'linear'\]"),
    ("sampling.masked_grid", "karras", r"unknown sampling.masked_grid 'karras'; valid: \['uniform', 'cosine'\]"),
    ("training.degradation", "noise", r"unknown training.degradation 'noise'; valid: \['gaussian', 'blur', 'mask'\]"),
    ("training.blur_sigma_max", 0.0, r"training.blur_sigma_max must be in \(0, inf\); got 0.0"),
    ("training.blur_schedule", "cubic", r"unknown training.blur_schedule 'cubic'; valid: \['sqrt', 'linear'\]"),
    ("training.mask_fill", float("nan"), r"training.mask_fill must be in \(-inf, inf\); got nan"),
    ("training.mask_seed", -1, r"training.mask_seed must be an integer >= 0; got -1"),
    ("sampling.udm_rule", "ddim", r"unknown sampling.udm_rule 'ddim'; valid: \['deterministic', 'fresh'"),
    ("sampling.udm_prior_noise", -0.1, r"sampling.udm_prior_noise must be in \[0, inf\); got -0.1"),
]


# keys of the optional sections of latent diffusion, checked on configs/digits_ldm.py
LATENT_BAD_VALUES = [
    ("autoencoder.f", 16, r"autoencoder.f must be 2, 4 or 8 \(the downsampling factor\); got 16"),
    ("autoencoder.latent_channels", 0, rf"autoencoder.latent_channels {INT_1}; got 0"),
    ("autoencoder.features", 6, r"autoencoder.features must be a multiple of 4 >= 4 \(GroupNorm groups of 4"),
    ("autoencoder.channel_mult", (1, 0), r"autoencoder.channel_mult must be None or a sequence of integers >= 1"),
    ("autoencoder.num_res_blocks", -1, r"autoencoder.num_res_blocks must be an integer >= 0; got -1"),
    ("autoencoder.n_iters", 0, r"autoencoder.n_iters must be an integer >= 1 \(the autoencoder's training steps\)"),
    ("autoencoder.batch_size", 0, rf"autoencoder.batch_size {INT_1}; got 0"),
    ("autoencoder.lr", 0.0, r"autoencoder.lr must be in \(0, inf\); got 0.0"),
    ("autoencoder.beta", -1e-6, r"autoencoder.beta must be in \[0, inf\); got -1e-06"),
    ("autoencoder.scale_batches", 0, r"autoencoder.scale_batches must be an integer >= 1 \(training batches"),
    ("latent.use_mean", 1, r"latent.use_mean must be True or False; got 1"),
    ("latent.autoencoder_workdir", "", r"latent.autoencoder_workdir must be None \(<workdir>/autoencoder\) or a "
                                       r"non-empty path; got ''"),
    ("autoencoder.kind", "ae", r"unknown autoencoder.kind 'ae'; valid: \['kl', 'vq'\]"),
    ("autoencoder.num_codes", 1, r"autoencoder.num_codes must be an integer >= 2 \(codebook size K\); got 1"),
    ("autoencoder.commitment", -0.1, r"autoencoder.commitment must be in \[0, inf\); got -0.1"),
]
# (config file, key, value, message) of image-conditioned runs (sdejax.training.image_condition)
IMAGE_BAD_VALUES = [
    ("digits_lowres.py", "data.downsample", 0, r"data.downsample must be an integer >= 1 \(1: the images themselves\)"),
    ("digits_sr.py", "superres.factor", 1, r"superres.factor must be an integer >= 2; got 1"),
    ("digits_sr.py", "superres.upsample", "area", r"unknown superres.upsample 'area'; valid: \['nearest', 'bilinear'\]"),
    ("digits_sr.py", "superres.aug_max", -0.1, r"superres.aug_max must be in \[0, inf\); got -0.1"),
    ("digits_sr.py", "superres.aug_level", -1.0, r"superres.aug_level must be in \[0, inf\); got -1.0"),
    ("digits_sr.py", "superres.base_workdir", "", r"superres.base_workdir must be None \(sample on held-out"),
    ("digits_controlnet.py", "controlnet.base_workdir", "", r"controlnet.base_workdir must be a non-empty path"),
    ("digits_controlnet.py", "controlnet.control", "canny", r"unknown controlnet.control 'canny'; valid: \['blur', "),
    ("digits_controlnet.py", "controlnet.blur_sigma", 0.0, r"controlnet.blur_sigma must be in \(0, inf\); got 0.0"),
    ("digits_controlnet.py", "controlnet.factor", 1, r"controlnet.factor must be an integer >= 2; got 1"),
    ("digits_controlnet.py", "controlnet.hint_channels", (16, 0), r"controlnet.hint_channels must be a non-empty "),
    ("digits_controlnet.py", "controlnet.num_blocks", 0, r"controlnet.num_blocks must be None \(DiT: depth // 2\) or"),
    ("digits_controlnet.py", "controlnet.scale", float("nan"), r"controlnet.scale must be in \(-inf, inf\); got nan"),
]


@pytest.mark.parametrize("key,value,message", BAD_VALUES, ids=[f"{k}={v!r}" for k, v, _ in BAD_VALUES])
def test_bad_value_names_key_and_range(key, value, message):
    with pytest.raises(ValueError, match=message):
        config_lib.check_config(override(tiny_config(), {key: value}, any_type=True))


@pytest.mark.parametrize("key,value,message", LATENT_BAD_VALUES, ids=[f"{k}={v!r}" for k, v, _ in LATENT_BAD_VALUES])
def test_bad_latent_value_names_key_and_range(key, value, message):
    with pytest.raises(ValueError, match=message):
        config_lib.check_config(override(load_config("digits_ldm.py"), {key: value}, any_type=True))


@pytest.mark.parametrize("path,key,value,message", IMAGE_BAD_VALUES, ids=[f"{k}={v!r}" for _, k, v, _ in IMAGE_BAD_VALUES])
def test_bad_image_condition_value_names_key_and_range(path, key, value, message):
    with pytest.raises(ValueError, match=message):
        config_lib.check_config(override(load_config(path), {key: value}, any_type=True))


def test_every_rule_has_a_bad_value_test():
    image = {key for _, key, _, _ in IMAGE_BAD_VALUES}
    assert set(config_lib.VALUE_RULES) == {key for key, _, _ in BAD_VALUES + LATENT_BAD_VALUES} | image


@pytest.mark.parametrize("key,value", [("training.grad_accum_steps", 4), ("training.snapshot_freq", 0),
                                       ("optim.grad_clip", -1.0), ("optim.warmup", 0), ("model.ema_rate", 0.0),
                                       ("training.parallelism", "pmap"), ("seed", -3)])
def test_edge_values_are_accepted(key, value):
    config_lib.check_config(tiny_config(**{key: value}))


def _shipped_configs() -> list[str]:
    return sorted(str(p.relative_to(ROOT / "configs")) for p in (ROOT / "configs").rglob("*.py")
                  if not p.name.startswith("_") and "get_config" in p.read_text())


@pytest.mark.parametrize("path", _shipped_configs())
def test_shipped_configs_pass(path):
    """Every config under configs/ passes; sdejax's own (toy, digits) warm the EMA up, score_sde's
    keep its fixed rate."""
    config = load_config(path)
    config_lib.check_config(config)
    own = path.startswith(("toy/", "default_toy", "digits"))
    assert config.model.get("ema_warmup", False) == own


def test_nothing_to_train_says_so():
    assert config_lib.nothing_to_train(10, 20) is None
    assert config_lib.nothing_to_train(20, 20) == ("nothing to train: the checkpoint is at step 20 and "
                                                   "training.n_iters = 20; raise training.n_iters to continue training")


def _closed_form_ema(trajectory: np.ndarray, decays: np.ndarray) -> np.ndarray:
    """ema_K = (∏_j d_j) p_0 + Σ_k (1 − d_{k−1}) ∏_{j ≥ k} d_j p_k, float64 (p_k after k updates)."""
    k_steps = len(decays)
    weights = [np.prod(decays)] + [(1 - decays[k - 1]) * np.prod(decays[k:]) for k in range(1, k_steps + 1)]
    return np.tensordot(np.asarray(weights), trajectory, axes=1)


@pytest.mark.parametrize("warmup", [False, True])
def test_ema_equals_closed_form_product_of_decays(warmup):
    """SGD(lr=1) on loss = Σ c·w moves w by −c each step (p_k = p_0 − k c exactly in float32 for
    these integers); the scanned steps' EMA equals the closed form with decays d_j = rate
    (fixed) or min(rate, (1 + j)/(10 + j)) (warm-up), j = the step stored in the state."""
    rate, k_steps = 0.9, 100  # the warm-up reaches the rate at j = 80
    p0, c = np.array([3.0, -1.0], np.float32), np.array([1.0, -2.0], np.float32)

    def loss_fn(params, rng, batch):
        return jnp.sum(params["params"]["w"] * c), {}

    tx = optax.sgd(1.0)
    params = {"params": {"w": jnp.asarray(p0)}}
    state = state_lib.create_train_state(params, tx, jax.random.PRNGKey(0))
    train_step = step_lib.make_train_step(objective.from_loss(loss_fn), tx, rate, ema_warmup=warmup)
    batches = {"x": jnp.zeros((k_steps, 2, 1))}
    state, _ = jax.jit(step_lib.make_multi_step(train_step))(state, batches)
    j = np.arange(k_steps, dtype=np.float64)
    decays = np.minimum(rate, (1 + j) / (10 + j)) if warmup else np.full(k_steps, rate)
    trajectory = p0[None] - np.arange(k_steps + 1)[:, None] * c[None]
    np.testing.assert_array_equal(np.asarray(state.params["params"]["w"]), trajectory[-1])
    np.testing.assert_allclose(np.asarray(state.ema_params["params"]["w"]), _closed_form_ema(trajectory, decays),
                               rtol=1e-5)


def test_warmup_forgets_the_initial_network():
    """The initial network's weight in the EMA after 300 steps at rate 0.999: 0.999³⁰⁰ ≈ 74 %
    without warm-up; with it ∏ (1 + j)/(10 + j) = 9!·300!/309! < 1e-16; early decays as diffusers'."""
    fixed = math.prod(float(state_lib.ema_decay(j, 0.999, False)) for j in range(300))
    warm = math.prod(float(state_lib.ema_decay(j, 0.999, True)) for j in range(300))
    assert abs(fixed - 0.741) < 1e-3
    assert warm == pytest.approx(math.factorial(9) * math.factorial(300) / math.factorial(309), rel=1e-4)
    assert warm < 1e-16
    assert float(state_lib.ema_decay(0, 0.999, True)) == pytest.approx(0.1)
    assert float(state_lib.ema_decay(10**6, 0.999, True)) == pytest.approx(0.999)
