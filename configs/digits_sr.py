"""Cascaded super-resolution of the digits (Ho et al. 2022): 16x16 digits x conditioned on z = D_2(x) (8x8,
area downsampling), trained and sampled as the pixel U-Net of `configs/digits_edm.py` (EDM schedule and
preconditioning, log-normal σ, Heun 35 NFE) with the network reading [x_t, up_2(z_s), s] (nearest
upsampling). Gaussian conditioning augmentation z_s = z + s ε on the run's EDM schedule (α = 1, σ = s):
s ~ U[0, 0.5] in training, s = 0.1 at sampling, so samples of an imperfect 8x8 base still condition it.

    sdejax --config=configs/digits_sr.py --workdir=runs/digits_sr                 # train
    sdejax --config=configs/digits_sr.py --workdir=runs/digits_sr --mode=sample   # on held-out D_2(x)
    sdejax --config=configs/digits_sr.py --workdir=runs/digits_sr --mode=sample \\
        --config.superres.base_workdir=runs/digits_lowres    # the cascade after configs/digits_lowres.py

Held-out bits/dim are the conditional −log p(x | z_s) (in bits per 16x16 pixel).
"""
from ml_collections import config_dict

from configs import digits_edm


def get_config():
    config = digits_edm.get_config()
    config.superres = sr = config_dict.ConfigDict()
    sr.factor = 2
    sr.upsample = "nearest"
    sr.aug_max = 0.5
    sr.aug_level = 0.1
    sr.base_workdir = config_dict.placeholder(str)  # None: condition on held-out D_2(x)
    config.training.n_iters = 1200
    config.training.snapshot_freq = 600
    return config
