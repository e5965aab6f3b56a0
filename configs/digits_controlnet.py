"""ControlNet (Zhang et al. 2023) on the digits: the frozen EDM pixel U-Net of `configs/digits_edm.py`
steered by blurred digits c = G_σ ∗ x (σ = 1.5 px). Only the ControlNet trains (the encoder copy, a
hint encoder of widths 16, 32 and the zero projections); the base's own DSM loss on (x, c) pairs.
Samples are conditioned on the held-out digits' blurs, and their re-blur error is reported
(`condition_rms`).

    sdejax --config=configs/digits_edm.py --workdir=runs/digits_edm
    sdejax --config=configs/digits_controlnet.py --workdir=runs/digits_controlnet \\
        --config.controlnet.base_workdir=runs/digits_edm
"""
from ml_collections import config_dict

from configs import digits_edm


def get_config():
    config = digits_edm.get_config()
    config.controlnet = cn = config_dict.ConfigDict()
    cn.base_workdir = "runs/digits_edm"
    cn.control = "blur"
    cn.blur_sigma = 1.5
    cn.hint_channels = (16, 32)
    cn.scale = 1.0
    config.training.n_iters = 600
    config.training.snapshot_freq = 300
    config.optim.lr = 5e-4
    config.optim.warmup = 0
    return config
