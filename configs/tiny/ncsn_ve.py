"""Tiny NCSN v1 (noise-conditional InstanceNorm++) for tests."""
from configs import _common
from configs.ve.ncsn.cifar10 import get_config as get_base_config


def get_config():
    return _common.tiny(get_base_config(), nf=8)
