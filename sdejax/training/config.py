"""Fail-fast checks of an ml_collections config: every section and key must be known (a typo such
as `training.batchsize` raises with the list of valid keys) and the keys the loop reads must exist.

The key names are those of score_sde, plus a few sdejax additions (marked below).
"""
from __future__ import annotations

import ml_collections

from sdejax.sampling import methods

_SCORE_SDE_KEYS: dict[str, set[str]] = {
    "training": {"batch_size", "n_iters", "snapshot_freq", "log_freq", "eval_freq",
                 "snapshot_freq_for_preemption", "snapshot_sampling", "likelihood_weighting",
                 "continuous", "reduce_mean", "sde", "n_jitted_steps"},
    "sampling": {"n_steps_each", "noise_removal", "probability_flow", "snr", "method", "predictor", "corrector"},
    "eval": {"begin_ckpt", "end_ckpt", "batch_size", "enable_sampling", "num_samples", "enable_loss",
             "enable_bpd", "bpd_dataset"},
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
    "training": {"importance_weighting", "keep_checkpoints", "parallelism", "grad_accum_steps",
                 "snapshot_num_samples", "digits_monitor", "unroll_steps", "time_sampling", "p_mean", "p_std",
                 "eps"},
    # sampling: every option of every method in sdejax.sampling.methods (CONFIG_KEYS).
    "sampling": set(methods.ALL_CONFIG_KEYS),
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
    "data": {"dataset_kwargs", "num_train", "num_heldout", "data_dir", "stack", "download", "num_threads",
             "prefetch", "num_workers"},
    "optim": set(),
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

# precond/sigma_data/noise_labels: how the network sees (x, t) (sdejax.training.loop.get_precond).
PRECOND_KEYS = {"precond", "sigma_data", "noise_labels"}
MLP_MODEL_KEYS = {"name", "ema_rate", "prediction", "features", "depth", "embedding_type", "embedding_size",
                  "fourier_scale", "nonlinearity", "sigma_min", "sigma_max", "num_scales", "beta_min", "beta_max",
                  *PRECOND_KEYS}
TOP_LEVEL = {"training", "sampling", "eval", "data", "model", "optim", "seed"}


def _check_keys(where: str, present: set[str], valid: set[str] | None, required: set[str]) -> None:
    if valid is not None and (unknown := present - valid):
        raise ValueError(f"unknown config key(s) {sorted(f'{where}.{k}' for k in unknown)}; "
                         f"valid keys of {where}: {sorted(valid)}")
    if missing := required - present:
        raise ValueError(f"missing config key(s) {sorted(f'{where}.{k}' for k in missing)}")


def check_config(config: ml_collections.ConfigDict) -> None:
    """Raise ValueError naming any unknown or missing key. Model keys are checked exactly for the
    MLP; other model names are checked by their builder in `sdejax.models`."""
    _check_keys("config", set(config.keys()), TOP_LEVEL, TOP_LEVEL)
    for section, required in REQUIRED_KEYS.items():
        valid = VALID_KEYS.get(section)
        if section == "model":
            valid = MLP_MODEL_KEYS if config.model.get("name") == "mlp" else None
        _check_keys(section, set(config[section].keys()), valid, required)
    if not 0.0 <= config.model.ema_rate < 1.0:
        raise ValueError(f"model.ema_rate must be in [0, 1) (ema <- rate*ema + (1-rate)*params); "
                         f"got {config.model.ema_rate}")
