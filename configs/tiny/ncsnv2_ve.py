"""Tiny NCSNv2 (VE, discrete noise indices) for tests."""
from configs import _common
from configs.ve.ncsnv2.cifar10 import get_config as get_base_config


def get_config():
    return _common.tiny(get_base_config(), nf=8)
