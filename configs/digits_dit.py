"""A small DiT on the 16x16 digits pixels (patch 2: 64 tokens), trained like `configs/digits_edm.py`'s
U-Net (EDM schedule and preconditioning, ln σ ~ N(−1.2, 1.2²), x₀-prediction, batch 64) so the two
sit side by side: depth 4, width 128, 4 heads (`model.shape`), 1.27 M parameters — CPU-sized,
not one of the paper's S/B/L/XL. Sampled with EDM's Heun, 18 steps = 35 NFE.

    sdejax --config=configs/digits_dit.py --workdir=runs/digits_dit
"""
from configs import digits_edm
from configs.dit.cifar10_dit import dit
from sdejax.models import registry


def get_config():
    config = dit(digits_edm.get_config(), size="S", patch_size=2)
    model = config.model
    for key in set(model) & (registry.UNET_KEYS | registry.NCSNPP_KEYS | {"nonlinearity"}):  # the U-Net's keys
        del model[key]
    model.shape = (4, 128, 4)
    model.ema_rate = 0.999
    config.optim.lr = 3e-4
    return config
