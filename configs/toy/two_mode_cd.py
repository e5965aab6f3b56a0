"""Consistency distillation (CD) of the EDM teacher `configs/toy/two_mode_edm.py` on the two-mode
mixture: N = 18 Karras levels, Heun PF-ODE step of the teacher, θ⁻ an EMA at μ = 0.95, the student
starting from the teacher. Set training.teacher_workdir to the teacher's workdir.
"""
from configs.toy.two_mode_edm import get_config as teacher_config


def get_config():
    config = teacher_config()
    t = config.training
    del t.time_sampling, t.p_mean, t.p_std
    t.objective = "cd"
    t.teacher_workdir = "workdir/toy_edm"
    t.cd_solver = "heun"
    t.num_scales = 18
    t.target_ema = 0.95
    t.n_iters = 6000
    t.snapshot_freq = 6000
    config.sampling.consistency_sigmas = (80.0, 0.821)
    return config
