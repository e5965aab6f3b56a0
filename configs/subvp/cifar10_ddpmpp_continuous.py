"""DDPM++ on CIFAR-10, sub-VP SDE, continuous training."""
from configs import _common
from configs.default_cifar10_configs import get_default_configs


def get_config():
    config = _common.ddpmpp(_common.set_sde(get_default_configs(), 'subvpsde', continuous=True))
    return config
