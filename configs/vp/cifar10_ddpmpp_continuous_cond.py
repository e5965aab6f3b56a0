"""Class-conditional DDPM++ on CIFAR-10 (VP SDE, continuous; label dropout 0.1 for classifier-free
guidance), with score_sde's noise-conditional Wide-ResNet-28-10 classifier for classifier guidance."""
from configs import _conditional
from configs.vp.cifar10_ddpmpp_continuous import get_config as get_base_config


def get_config():
    return _conditional.conditional(get_base_config(), 10, "wideresnet")
