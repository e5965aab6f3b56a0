"""Consistency distillation on CIFAR-10 (Song et al. 2023, Table 3; openai's jcm
`cifar10_ve_cd`): N = 18 Karras levels, one Heun step of the teacher's PF-ODE, target θ⁻ = sg(θ)
(μ = 0), RAdam with lr 4e-4 after a 10M-image warm-up and no gradient clipping, batch 512, 800k
steps, EMA 0.9999 for evaluation, student initialised from the teacher (same network). `training.teacher_workdir` is a run of `cifar10_edm_teacher.py` (override with --config.training.teacher_workdir).
The paper's metric is LPIPS (not available offline, see `_cifar10.py`): here squared L2.
"""
from configs.consistency._cifar10 import consistency_sampling, edm_cifar10


def get_config():
    config = consistency_sampling(edm_cifar10('cd'))
    t, m = config.training, config.model
    t.teacher_workdir = 'workdir/cifar10_edm_teacher'  # where the README trains cifar10_edm_teacher.py
    t.num_scales, t.cd_solver, t.target_ema = 18, 'heun', 0.0
    t.consistency_distance = 'l2'
    t.batch_size, t.n_iters = 512, 800000
    o = config.optim
    o.optimizer, o.lr, o.beta2 = 'RAdam', 4e-4, 0.999
    o.warmup, o.grad_clip = 19531, -1.0  # 10M images at batch 512; no clipping
    m.ema_rate, m.dropout = 0.9999, 0.0
    return config
