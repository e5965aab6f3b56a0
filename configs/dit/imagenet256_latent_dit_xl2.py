"""DiT-XL/2 on ImageNet 256² in the latent space of a KL autoencoder with f = 8 (32×32×4 latents, as the
SD-VAE of the DiT paper), 1000 classes with label dropout 0.1 for classifier-free guidance, VP SDE.

The first stage is trained by the driver (pixel loss only: LPIPS and the adversarial term need pretrained
weights sdejax cannot download); ImageNet itself is TFDS's `imagenet2012`, which needs its manual download
in `data.data_dir` (`data.download = True` prepares it from there).

    sdejax --config=configs/dit/imagenet256_latent_dit_xl2.py --workdir=runs/in256_dit --mode=train_autoencoder
    sdejax --config=configs/dit/imagenet256_latent_dit_xl2.py --workdir=runs/in256_dit   # DiT on s·μ(x)
"""
from ml_collections import config_dict

from configs import _common
from configs.default_cifar10_configs import get_default_configs
from configs.dit.cifar10_dit import dit


def get_config():
    config = dit(_common.set_sde(get_default_configs(), "vpsde", continuous=True), size="XL", patch_size=2,
                 num_classes=1000)
    data = config.data
    data.dataset = "IMAGENET"
    data.image_size = 256  # centre crop of the largest square, resized
    data.num_channels = 3
    data.centered = True
    data.random_flip = True
    config.autoencoder = a = config_dict.ConfigDict()
    a.f = 8
    a.latent_channels = 4
    a.features = 128
    a.channel_mult = (1, 2, 4, 4)  # 256 -> 128 -> 64 -> 32, as LDM's KL-f8
    a.num_res_blocks = 2
    a.beta = 1e-6
    a.n_iters = 200_000
    a.batch_size = 64
    a.lr = 4.5e-6 * 64  # LDM's base rate times the batch size
    a.scale_batches = 10
    config.latent = z = config_dict.ConfigDict()
    z.use_mean = False  # LDM samples the posterior for the diffusion model's latents
    z.autoencoder_workdir = config_dict.placeholder(str)
    config.training.p_uncond = 0.1
    config.training.batch_size = 256
    config.training.n_iters = 400_000
    config.sampling.guidance_weight = 0.5  # CFG scale 1.5 = 1 + w
    return config
