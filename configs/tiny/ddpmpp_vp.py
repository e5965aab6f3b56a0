"""Tiny DDPM++ (VP, continuous, positional embedding) for tests."""
from configs import _common
from configs.vp.cifar10_ddpmpp_continuous import get_config as get_base_config


def get_config():
    return _common.tiny(get_base_config())
