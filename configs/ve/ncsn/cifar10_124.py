"""NCSN (v1) on CIFAR-10 with NCSNv2 techniques 1, 2, 4 (sigma_max, #scales, step size)."""
from configs import _common
from configs.default_cifar10_configs import get_default_configs


def get_config():
    config = _common.refinenet(get_default_configs(), name='ncsn', sigma_max=50., num_scales=232, snr=0.176,
                               n_steps_each=5, ema_rate=0.)
    return config
