"""NCSN++ on CelebA-HQ 1024x1024, VE SDE, continuous training."""
from configs import _common
from configs.default_lsun_configs import get_default_configs


def get_config():
    return _common.ncsnpp_1024(get_default_configs(), 'CelebAHQ')
