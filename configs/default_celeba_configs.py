"""Defaults for CelebA (64x64) experiments."""
from configs._common import base_config


def get_default_configs():
    return base_config(batch_size=128, n_iters=1300001, snapshot_freq_for_preemption=10000, snr=0.17,
                       eval_begin=1, eval_end=26, eval_batch_size=1024, enable_sampling=True,
                       dataset='CELEBA', image_size=64, sigma_max=90, num_scales=1000, dropout=0.1)
