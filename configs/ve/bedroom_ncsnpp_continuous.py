"""NCSN++ on LSUN bedroom 256x256, VE SDE, continuous training."""
from configs import _common
from configs.default_lsun_configs import get_default_configs


def get_config():
    config = _common.ncsnpp_256(get_default_configs(), sigma_max=378)
    config.data.category = 'bedroom'
    return config
