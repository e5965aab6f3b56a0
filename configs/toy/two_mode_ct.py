"""Consistency training (CT; Song et al. 2023) of the MLP on the two-mode mixture, on the EDM
schedule (α = 1, σ = t ∈ [0.002, 80]): no teacher, N(k) levels growing from 2 to 151 over the run,
the target θ⁻ an EMA at CT's rate μ(k) (`sdejax.consistency.ct_ema_rate`). The network sees
c_in(σ) x and ¼ ln σ (sinusoidally embedded); samples are drawn in one or a few network evaluations
(`sampling.consistency_sigmas`), so there are no bits/dim.

Status (2026-12-02, 8000 steps, ~50 s on 2 shared CPU cores): the driver runs it, but the samples are
not yet the mixture: f at σ ≥ 10 is still near the origin (2-step samples: modes at ≈ ±1, weight 0.64;
with model.sigma_data = 4.0, the data's scale: ≈ ±2.5, weight 0.70). CT bootstraps the high-σ levels
from the low ones and needs far more steps (the paper: 800k); CD from a DSM teacher on the same
network does reach the mixture in 4000 steps (README, "Training consistency models with the driver").
"""
from configs.default_toy import get_config as default_config


def get_config():
    config = default_config()
    t = config.training
    t.sde = "edmsde"
    t.objective = "ct"
    config.model.sigma_min = 0.002
    config.model.sigma_max = 80.0
    config.model.sigma_data = 5.0  # the data's std (modes at ±5); CIFAR's 0.5 made f collapse toward 0
    t.n_iters = 24000
    t.snapshot_freq = 24000
    config.model.prediction = "x0"  # EDM preconditioning (read by a DSM run of this config only)
    config.model.embedding_type = "positional"  # the labels ¼ ln σ are already a log (fourier takes log(labels))
    config.sampling.consistency_sigmas = (80.0, 0.821)  # two steps; (80.0,) is one
    config.eval.enable_bpd = False  # a consistency model has no score, so no PF-ODE likelihood
    return config
