"""DiT-XL/2 for ImageNet 256² in the SD-VAE latent space (32×32×4, 1000 classes, p_uncond 0.1), VP SDE.

NEEDS A LATENT DATASET: `data.dataset = 'ImageNetLatents'` is not provided by sdejax.datasets yet
(pre-encoded VAE latents, scaled by 0.18215); this config fixes the network's shape and conditioning.
"""
from configs import _common
from configs.default_cifar10_configs import get_default_configs
from configs.dit.cifar10_dit import dit


def get_config():
    config = dit(_common.set_sde(get_default_configs(), "vpsde", continuous=True), size="XL", patch_size=2,
                 num_classes=1000)
    data = config.data
    data.dataset = "ImageNetLatents"  # needs a latent dataset (not in sdejax.datasets)
    data.image_size = 32
    data.num_channels = 4
    data.centered = True
    data.random_flip = False
    config.training.p_uncond = 0.1
    config.training.batch_size = 256
    return config
