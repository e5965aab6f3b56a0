"""DDPM (Ho et al.) on CIFAR-10: VP SDE, discrete training, ancestral sampling."""
from configs import _common
from configs.default_cifar10_configs import get_default_configs


def get_config():
    config = _common.ddpm(_common.set_sde(get_default_configs(), 'vpsde', continuous=False))
    config.sampling.predictor = 'ancestral_sampling'
    return config
