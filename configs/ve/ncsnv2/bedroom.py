"""NCSNv2 on LSUN bedroom 128x128: 1086 noise levels in [0.01, 190]."""
from configs import _common
from configs.default_lsun_configs import get_default_configs


def get_config():
    config = _common.refinenet(get_default_configs(), name='ncsnv2_128', sigma_max=190., num_scales=1086,
                               snr=0.095, n_steps_each=3, ema_rate=0.999)
    config.data.image_size = 128
    config.data.category = 'bedroom'
    config.training.batch_size = 128
    return config
