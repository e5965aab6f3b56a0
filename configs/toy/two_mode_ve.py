"""The two-mode mixture with a VE SDE (σ_max = 20 > the 14.1 distance between the modes).

The MLP predicts ε (score = −ε/σ), which plays the role of NCSN++'s output scaling by 1/σ; σ labels
get the Fourier embedding of log σ, as NCSN++.
"""
from configs.default_toy import get_config as default_config


def get_config():
    config = default_config()
    config.training.sde = "vesde"
    config.model.embedding_type = "fourier"
    return config
