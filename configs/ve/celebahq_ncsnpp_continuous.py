"""NCSN++ on CelebA-HQ 1024x1024, VE SDE, continuous training."""
from configs import _common
from configs.default_lsun_configs import get_default_configs


def get_config():
    config = _common.ncsnpp_256(get_default_configs(), sigma_max=1348)
    config.data.dataset = 'CelebAHQ'
    config.data.image_size = 1024
    del config.data.category
    config.data.tfrecords_path = ''
    config.training.batch_size = 8
    config.model.nf = 16
    config.model.ch_mult = (1, 2, 4, 8, 16, 32, 32, 32)
    config.model.num_res_blocks = 1
    config.model.ema_rate = 0.9999
    return config
