"""Consistency training on CIFAR-10 (Song et al. 2023; openai's jcm `cifar10_ve_ct_adaptive`): the
adaptive schedules N(k) (s₀ = 2 → s₁ = 150, i.e. 2 → 151 levels) and μ(k) = exp(s₀ ln μ₀ / N(k)),
μ₀ = 0.9, over K = 800k steps, batch 512, RAdam with lr 2e-4 and no gradient clipping, EMA 0.9999 for
evaluation. The paper's metric is
LPIPS (not available offline, see `_cifar10.py`): here squared L2.
"""
from configs.consistency._cifar10 import consistency_sampling, edm_cifar10


def get_config():
    config = consistency_sampling(edm_cifar10('ct'))
    t, m = config.training, config.model
    t.batch_size, t.n_iters = 512, 800000
    t.ct_total_steps, t.ct_s0, t.ct_s1 = 800000, 2, 150
    t.consistency_distance = 'l2'
    o = config.optim
    o.optimizer, o.lr, o.beta2 = 'RAdam', 2e-4, 0.999
    o.grad_clip = -1.0
    m.ema_rate, m.dropout = 0.9999, 0.0
    return config
