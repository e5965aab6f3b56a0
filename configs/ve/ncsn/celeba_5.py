"""NCSN (v1) on CelebA 32x32 with NCSNv2 technique 5 (EMA) only."""
from configs import _common
from configs.default_celeba_configs import get_default_configs


def get_config():
    config = _common.refinenet(get_default_configs(), name='ncsn', sigma_max=1., num_scales=10, snr=0.316,
                               n_steps_each=100, ema_rate=0.999)
    config.data.image_size = 32
    return config
