"""Improved consistency training on CIFAR-10 (Song & Dhariwal 2023): θ⁻ = sg(θ) (no EMA target),
pseudo-Huber distance with c = 0.00054·sqrt(3072) ≈ 0.030, log-normal levels (P_mean = −1.1,
P_std = 2.0), weight 1/(σ_{n+1} − σ_n), N doubling 11 → 1281 over K = 400k steps (s₀ = 10,
s₁ = 1280), batch 1024, dropout 0.3, EMA 0.99993 for evaluation, Adam with lr 1e-4, β₂ = 0.995 and
no gradient clipping. The β₂ is what we recall of the paper's appendix; it could not be
checked offline (iCT has no official code).
"""
from configs.consistency._cifar10 import consistency_sampling, edm_cifar10


def get_config():
    config = consistency_sampling(edm_cifar10('ict'))
    t, m = config.training, config.model
    t.batch_size, t.n_iters = 1024, 400000
    t.ct_total_steps, t.ct_s0, t.ct_s1 = 400000, 10, 1280
    t.consistency_distance = 'pseudo_huber'
    o = config.optim
    o.optimizer, o.lr, o.beta2 = 'Adam', 1e-4, 0.995
    o.grad_clip = -1.0
    m.ema_rate, m.dropout = 0.99993, 0.3
    return config
