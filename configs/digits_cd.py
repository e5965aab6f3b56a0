"""Consistency distillation (Song et al. 2023) of the digits EDM teacher (`configs/digits_edm.py`):
N = 18 Karras levels, one Heun step of the teacher's PF-ODE, target θ⁻ an EMA at μ = 0.95, squared
L2 distance, the student (the same small DDPM++) initialised from the teacher. Sampled in one or two
network evaluations on `sampling.consistency_sigmas`.

    sdejax --config=configs/digits_cd.py --workdir=runs/digits_cd \
        --config.training.teacher_workdir=runs/digits_edm
"""
from configs.digits_edm import edm_digits


def get_config():
    config = edm_digits("cd")
    t = config.training
    t.teacher_workdir = "runs/digits_edm"
    t.num_scales, t.cd_solver, t.target_ema = 18, "heun", 0.95
    config.optim.lr = 4e-4
    config.sampling.consistency_sigmas = (80.0, 0.821)  # two steps; (80.0,) is one
    return config
