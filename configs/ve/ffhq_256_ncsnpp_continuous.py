"""NCSN++ on FFHQ 256x256, VE SDE, continuous training."""
from configs import _common
from configs.default_lsun_configs import get_default_configs


def get_config():
    return _common.tfrecords_dataset(_common.ncsnpp_256(get_default_configs(), sigma_max=348), 'FFHQ')
