"""Guided consistency distillation (latent consistency models, Luo et al. 2023) of the class-conditional
digits EDM teacher (`configs/digits_edm_cond.py`), on pixels: each example draws w ~ U[1, 4], the
teacher's Heun step uses classifier-free guidance s_c + w(s_c − s_u) and skips k = 2 of N = 18 Karras
levels, and the student (the teacher's network plus a zero-initialised w-embedding, started from the
teacher) is conditioned on (y, w). Sampling: classes in turn at w = `sampling.guidance_weight`.

    sdejax --config=configs/digits_lcm.py --workdir=runs/digits_lcm \
        --config.training.teacher_workdir=runs/digits_edm_cond

LCM-LoRA (a rank-r adapter over the frozen teacher instead of a full student, at one fixed w, no
w-embedding): `configs/digits_lcm.py:lora`.
"""
from configs import digits_edm


def get_config(variant: str = "full"):
    config = digits_edm.edm_digits("cd")
    t, m, s = config.training, config.model, config.sampling
    t.teacher_workdir = "runs/digits_edm_cond"
    t.num_scales, t.cd_solver, t.target_ema = 18, "heun", 0.95
    t.cd_skip = 2
    config.optim.lr = 4e-4
    m.num_classes = 10
    s.class_label = -1
    s.consistency_sigmas = (80.0, 0.821)
    if variant == "lora":
        t.cd_guidance = (2.0, 2.0)  # one w: the adapter has no w input
        t.lora_rank, t.lora_alpha = 4, 4.0
        config.optim.lr = 1e-3
        s.guidance_weight = 0.0  # the student's w is the trained one
    else:
        t.cd_guidance = (1.0, 4.0)
        m.guidance_embedding = True
        s.guidance_weight = 2.0
    return config
