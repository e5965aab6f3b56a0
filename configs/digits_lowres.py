"""The first stage of a digits cascade: the EDM pixel U-Net of `configs/digits_edm.py` on D_2(x), the 16x16
digits area-downsampled to 8x8 (`data.downsample = 2`: each pixel the mean of a 2x2 block, so 65 levels).
Its samples are the low-resolution images `configs/digits_sr.py` (8x8 -> 16x16) is chained after:

    sdejax --config=configs/digits_lowres.py --workdir=runs/digits_lowres
    sdejax --config=configs/digits_sr.py --workdir=runs/digits_sr
    sdejax --config=configs/digits_sr.py --workdir=runs/digits_sr --mode=sample \\
        --config.superres.base_workdir=runs/digits_lowres      # the cascade: 8x8 base, then 16x16
"""
from configs import digits_edm


def get_config():
    config = digits_edm.get_config()
    config.data.downsample = 2
    t, m = config.training, config.model
    t.n_iters = 1200
    t.snapshot_freq = 600
    m.ch_mult = (1, 2)  # 8 -> 4
    m.attn_resolutions = (4,)
    return config
