"""Improved consistency training (Song & Dhariwal 2023) of the small digits DDPM++ from scratch, on
the EDM schedule: θ⁻ = sg(θ), pseudo-Huber distance, log-normal levels, weight 1/(σ_{n+1} − σ_n),
N doubling 10 → 1280 over the run (`training.ct_total_steps`, default `n_iters`). No teacher.

    sdejax --config=configs/digits_ict.py --workdir=runs/digits_ict
"""
from configs.digits_edm import edm_digits


def get_config():
    config = edm_digits("ict")
    config.optim.lr = 5e-4
    config.sampling.consistency_sigmas = (80.0, 0.821)  # two steps; (80.0,) is one
    return config
