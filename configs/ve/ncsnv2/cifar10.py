"""NCSNv2 on CIFAR-10: 232 noise levels in [0.01, 50]."""
from configs import _common
from configs.default_cifar10_configs import get_default_configs


def get_config():
    config = _common.refinenet(get_default_configs(), name='ncsnv2_64', sigma_max=50., num_scales=232,
                               snr=0.176, n_steps_each=5, ema_rate=0.999)
    return config
