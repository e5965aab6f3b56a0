"""NCSN++ on CIFAR-10, VE SDE, discrete SMLD training."""
from configs import _common
from configs.default_cifar10_configs import get_default_configs


def get_config():
    config = _common.ncsnpp(get_default_configs(), embedding_type='positional')
    config.training.continuous = False
    return config
