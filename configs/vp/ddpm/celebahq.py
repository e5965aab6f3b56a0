"""DDPM on CelebA-HQ 256x256, VP SDE, discrete training."""
from configs import _common
from configs.default_lsun_configs import get_default_configs


def get_config():
    config = _common.ddpm(_common.set_sde(get_default_configs(), 'vpsde', continuous=False), ch_mult=(1, 1, 2, 2, 4, 4))
    config.sampling.predictor = 'ancestral_sampling'
    return _common.tfrecords_dataset(config, 'CelebAHQ')
