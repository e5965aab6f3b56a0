"""Tiny NCSN++ (VE, continuous, Fourier, FIR, BigGAN blocks, residual input pyramid) for tests."""
from configs import _common
from configs.ve.cifar10_ncsnpp_continuous import get_config as get_base_config


def get_config():
    return _common.tiny(get_base_config())
