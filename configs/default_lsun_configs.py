"""Defaults for the 256px experiments (LSUN, CelebA-HQ, FFHQ)."""
from configs._common import base_config


def get_default_configs():
    return base_config(batch_size=64, n_iters=2400001, snapshot_freq_for_preemption=5000, snr=0.075,
                       eval_begin=50, eval_end=96, eval_batch_size=512, enable_sampling=True,
                       dataset='LSUN', image_size=256, sigma_max=378, num_scales=2000, dropout=0.,
                       extra_data={'category': 'bedroom'})
