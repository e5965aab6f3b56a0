"""Defaults for CIFAR-10 (32x32) experiments."""
from configs._common import base_config


def get_default_configs():
    # score_sde evaluated its checkpoints 9..26 (one per training.snapshot_freq = 50000 steps): here
    # --config.eval.begin_ckpt=450000 --config.eval.end_ckpt=1300000 (steps); the default, the newest only.
    return base_config(batch_size=128, n_iters=1300001, snapshot_freq_for_preemption=10000, snr=0.16,
                       eval_batch_size=1024, enable_sampling=False,
                       dataset='CIFAR10', image_size=32, sigma_max=50, num_scales=1000, dropout=0.1)
