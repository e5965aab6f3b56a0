"""DDPM U-Net on CIFAR-10 without noise-level input (model.conditional = False)."""
from configs import _common
from configs.default_cifar10_configs import get_default_configs


def get_config():
    config = _common.ddpm(_common.set_sde(get_default_configs(), 'vpsde', continuous=False), conditional=False)
    config.sampling.predictor = 'ancestral_sampling'
    return config
