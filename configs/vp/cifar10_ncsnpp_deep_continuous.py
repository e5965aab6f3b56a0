"""NCSN++ (deep) on CIFAR-10, VP SDE, continuous training."""
from configs import _common
from configs.default_cifar10_configs import get_default_configs


def get_config():
    config = _common.ncsnpp(_common.set_sde(get_default_configs(), 'vpsde', continuous=True), num_res_blocks=8,
                            embedding_type='positional', scale_by_sigma=False, ema_rate=0.9999)
    return config
