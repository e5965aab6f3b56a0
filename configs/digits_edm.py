"""A small DDPM++ on the 16x16 digits trained as the DSM teacher of consistency distillation, on the
EDM schedule (α = 1, σ = t ∈ [0.002, 80], σ_data = 0.5): EDM preconditioning, ln σ ~ N(−1.2, 1.2²),
x₀-prediction MSE (Karras et al. 2022). nf 32, one residual block per resolution (a CPU budget), no
dropout; sampled with EDM's deterministic Heun on the Karras grid, 18 steps = 35 NFE.

    sdejax --config=configs/digits_edm.py --workdir=runs/digits_edm   # then configs/digits_cd.py
"""
from configs import digits_ddpmpp


def edm_digits(objective: str):
    """The small digits DDPM++ with `training.objective = objective` on the EDM schedule."""
    config = digits_ddpmpp.get_config()
    t, m = config.training, config.model
    t.sde = "edmsde"
    t.objective = objective
    t.batch_size = 64
    t.snapshot_sampling = False
    t.digits_monitor = False
    t.snapshot_freq_for_preemption = 100
    t.n_jitted_steps = 1
    m.sigma_min, m.sigma_max, m.sigma_data = 0.002, 80.0, 0.5
    m.num_res_blocks = 1
    m.dropout = 0.0
    m.precond = "edm"  # the DSM teacher's preconditioning (consistency objectives use Precond.consistency)
    config.eval.enable_bpd = False
    config.optim.warmup = 200
    return config


def get_config():
    config = edm_digits("dsm")
    t, m = config.training, config.model
    m.prediction = "x0"
    t.time_sampling, t.p_mean, t.p_std = "lognormal", -1.2, 1.2
    config.sampling.method = "heun"
    config.sampling.num_steps = 18  # 35 NFE
    return config
