"""NCSNv2 on CelebA 64x64: 500 noise levels in [0.01, 90]."""
from configs import _common
from configs.default_celeba_configs import get_default_configs


def get_config():
    config = _common.refinenet(get_default_configs(), name='ncsnv2_64', sigma_max=90., num_scales=500,
                               snr=0.128, n_steps_each=5, ema_rate=0.999)
    return config
