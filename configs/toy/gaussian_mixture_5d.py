"""A 3-component Gaussian mixture in 5 dimensions (any dimension works), VP SDE."""
from configs.default_toy import get_config as default_config


def get_config():
    config = default_config()
    config.data.dataset = "gaussian_mixture"
    config.data.dataset_kwargs.weights = [0.5, 0.3, 0.2]
    config.data.dataset_kwargs.means = [[2.0, 0, 0, 0, 0], [0, -2.0, 0, 1.0, 0], [0, 0, 0, -2.0, 2.0]]
    config.data.dataset_kwargs.std = 0.5
    config.model.features = 128
    return config
