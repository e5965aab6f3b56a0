"""Class-conditional DDPM++ on the 16x16 digits (`configs/digits_ddpmpp.py` with 10 classes and label
dropout 0.1), with a small noise-conditional conv classifier for classifier guidance.

    sdejax --config=configs/digits_ddpmpp_cond.py --workdir=runs/digits_cond                  # train
    sdejax --config=configs/digits_ddpmpp_cond.py --workdir=runs/digits_cond --mode=sample \\
        --config.sampling.guidance_weight=2.0                                              # CFG, w = 2
    sdejax --config=configs/digits_ddpmpp_cond.py --workdir=runs/digits_cond --mode=train_classifier \\
        --config.training.n_iters=2000                                                     # its classifier
"""
from configs import _conditional
from configs.digits_ddpmpp import get_config as get_base_config


def get_config():
    config = _conditional.conditional(get_base_config(), 10, "conv")
    config.training.digits_monitor = False  # snapshot grids cycle through the classes; the monitor scores any mix
    return config
