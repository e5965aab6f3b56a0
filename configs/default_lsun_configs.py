"""Defaults for the 256px experiments (LSUN, CelebA-HQ, FFHQ)."""
from configs._common import base_config


def get_default_configs():
    # score_sde evaluated its checkpoints 50..96 (one per training.snapshot_freq = 50000 steps): here
    # --config.eval.begin_ckpt=2500000 --config.eval.end_ckpt=4800000 (steps); the default, the newest only.
    return base_config(batch_size=64, n_iters=2400001, snapshot_freq_for_preemption=5000, snr=0.075,
                       eval_batch_size=512, enable_sampling=True,
                       dataset='LSUN', image_size=256, sigma_max=378, num_scales=2000, dropout=0.,
                       extra_data={'category': 'bedroom'})
