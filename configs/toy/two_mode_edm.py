"""DSM teacher on the EDM schedule for the two-mode mixture: `edmsde` (α = 1, σ = t ∈ [0.002, 80]),
EDM preconditioning (x0 prediction, c_in/c_skip/c_out with σ_data), log-normal training levels
ln σ ~ N(p_mean, p_std²). The teacher of `configs/toy/two_mode_cd.py`; sampled at 35 NFE by Heun
(18 Karras grid points) in `experiments/toy_consistency.py`.
"""
from configs.default_toy import get_config as default_config


def get_config():
    config = default_config()
    t = config.training
    t.sde = "edmsde"
    t.time_sampling = "lognormal"
    t.p_mean = -1.2 + 2.3  # EDM's −1.2 shifted by ln 10: σ_data is ≈ 5 here, not 0.5
    t.p_std = 1.2
    t.n_iters = 16000
    t.snapshot_freq = 16000
    config.model.sigma_min = 0.002
    config.model.sigma_max = 80.0
    config.model.sigma_data = 5.0  # the data's std per coordinate (modes at ±5, unit spread)
    config.model.prediction = "x0"
    config.model.embedding_type = "positional"
    config.sampling.method = "heun"
    config.sampling.num_steps = 18  # 2·18 − 1 = 35 NFE
    config.sampling.grid = "karras"
    config.eval.enable_bpd = False
    return config
