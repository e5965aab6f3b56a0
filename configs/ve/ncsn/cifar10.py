"""NCSN (v1) on CIFAR-10: 10 noise levels in [0.01, 1], annealed Langevin."""
from configs import _common
from configs.default_cifar10_configs import get_default_configs


def get_config():
    config = _common.refinenet(get_default_configs(), name='ncsn', sigma_max=1., num_scales=10, snr=0.316,
                               n_steps_each=100, ema_rate=0.)
    return config
