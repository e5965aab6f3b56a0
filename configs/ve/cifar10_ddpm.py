"""The DDPM U-Net trained as an SMLD model (VE SDE, discrete), output divided by sigma."""
from configs import _common
from configs.default_cifar10_configs import get_default_configs


def get_config():
    config = _common.ddpm(get_default_configs(), scale_by_sigma=True, ema_rate=0.999)
    config.training.continuous = False
    return config
