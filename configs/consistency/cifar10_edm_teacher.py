"""The DSM teacher of CIFAR-10 consistency distillation: NCSN++ trained with EDM's loss (Karras et
al. 2022): preconditioning with σ_data = 0.5, ln σ ~ N(−1.2, 1.2²), λ(σ) = (σ² + σ_d²)/(σ σ_d)²
(EDM's weighting = the x₀-prediction MSE), batch 512, lr 1e-3 with a 10M-image warm-up, dropout
0.13, 200M images ≈ 390k steps (EDM, Table 7, without its augmentation pipeline).
"""
from configs.consistency._cifar10 import edm_cifar10


def get_config():
    config = edm_cifar10('dsm')
    t, m, o = config.training, config.model, config.optim
    m.prediction = 'x0'
    t.time_sampling, t.p_mean, t.p_std = 'lognormal', -1.2, 1.2
    t.batch_size, t.n_iters = 512, 390625
    o.lr, o.warmup = 1e-3, 19531  # 10M images at batch 512
    m.dropout = 0.13
    m.ema_rate = 0.99929  # EMA half-life 0.5M images = 977 steps at batch 512: 0.5^(1/977)
    config.sampling.method = 'heun'
    config.sampling.num_steps = 18  # EDM's 35-NFE deterministic Heun sampler on the Karras grid
    return config
