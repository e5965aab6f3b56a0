"""DiT-S/2 on CIFAR-10 pixels (32×32×3 → 256 tokens), VP SDE, continuous training (labels 999·t).

    sdejax --config=configs/dit/cifar10_dit.py --workdir=runs/cifar10_dit
"""
from configs import _common
from configs.default_cifar10_configs import get_default_configs


def dit(config, *, size="S", patch_size=2, num_classes=0):
    """`config.model` set to a DiT (the U-Net keys removed: `dit.CONFIG_KEYS` declares the DiT's)."""
    model = config.model
    del model.dropout  # DiT has no dropout
    model.name = "dit"
    model.size = size
    model.patch_size = patch_size
    model.mlp_ratio = 4.0
    model.learn_sigma = False  # sdejax's losses use the C prediction channels only
    model.num_classes = num_classes
    model.ema_rate = 0.9999
    config.optim.lr = 1e-4  # DiT: AdamW, constant 1e-4, no weight decay
    return config


def get_config():
    return dit(_common.set_sde(get_default_configs(), "vpsde", continuous=True))
