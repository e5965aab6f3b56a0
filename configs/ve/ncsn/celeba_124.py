"""NCSN (v1) on CelebA 32x32 with NCSNv2 techniques 1, 2, 4."""
from configs import _common
from configs.default_celeba_configs import get_default_configs


def get_config():
    config = _common.refinenet(get_default_configs(), name='ncsn', sigma_max=90., num_scales=500, snr=0.128,
                               n_steps_each=5, ema_rate=0.)
    config.data.image_size = 32
    return config
