"""MLP on the 2-D swiss roll toy distribution (VP SDE), a wider network and longer run than the quick start."""
from configs.default_toy import get_config as default_config


def get_config():
    config = default_config()
    config.data.dataset = "swiss_roll"
    config.model.features = 128
    config.training.n_iters = 20000
    config.training.snapshot_freq = 5000
    return config
