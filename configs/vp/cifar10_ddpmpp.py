"""DDPM++ on CIFAR-10, VP SDE, discrete (DDPM) training."""
from configs import _common
from configs.default_cifar10_configs import get_default_configs


def get_config():
    config = _common.ddpmpp(_common.set_sde(get_default_configs(), 'vpsde', continuous=False))
    return config
