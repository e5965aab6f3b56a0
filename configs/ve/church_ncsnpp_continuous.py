"""NCSN++ on LSUN church 256x256, VE SDE, continuous training."""
from configs import _common
from configs.default_lsun_configs import get_default_configs


def get_config():
    config = _common.ncsnpp_256(get_default_configs(), sigma_max=380)
    config.data.category = 'church_outdoor'
    return config
