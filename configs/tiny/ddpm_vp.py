"""Tiny DDPM U-Net (VP, discrete; GroupNorm(32) needs nf = 32) for tests."""
from configs import _common
from configs.vp.ddpm.cifar10 import get_config as get_base_config


def get_config():
    return _common.tiny(get_base_config(), nf=32)
