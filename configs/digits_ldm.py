"""Latent diffusion (Rombach et al. 2022) of the 16x16 digits: a KL autoencoder with f = 2 (16x16x1 -> 8x8x2
latents, pixel loss Σ(x − x̂)² + β KL; no LPIPS/adversarial terms, which need pretrained weights), then a
small DDPM++ on z = s·μ(x), s = 1/std of the encoder means, trained and sampled like the pixel U-Net of
`configs/digits_edm.py` (EDM schedule and preconditioning, log-normal σ, Heun 35 NFE) so the two compare;
samples decode as x = D(z/s) before the grids, the .npz files and the digits monitor.

    sdejax --config=configs/digits_ldm.py --workdir=runs/digits_ldm --mode=train_autoencoder  # -> autoencoder/
    sdejax --config=configs/digits_ldm.py --workdir=runs/digits_ldm                           # diffusion on latents
    sdejax --config=configs/digits_ldm.py --workdir=runs/digits_ldm --mode=eval     # latent_bits_per_dim
    sdejax --config=configs/digits_ldm.py --workdir=runs/digits_ldm --mode=sample   # decoded PNG grid + .npz

Sized for a 2-CPU budget (each stage a few minutes). Held-out bits/dim of this model are the latents'
(`latent_bits_per_dim`), not comparable with the pixel models' bits/dim.
"""
from ml_collections import config_dict

from configs import digits_edm


def get_config():
    config = digits_edm.get_config()
    config.autoencoder = a = config_dict.ConfigDict()
    a.f = 2
    a.latent_channels = 2
    a.features = 32
    a.channel_mult = (1, 2)  # 16x16 at 32 channels, 8x8 at 64
    a.num_res_blocks = 1
    a.beta = 1e-4  # KL weight against the summed squared error of 256 pixels in [-1, 1]
    a.n_iters = 1500
    a.batch_size = 64
    a.lr = 1e-3
    a.scale_batches = 10  # s = 1/std over 640 training digits' latents
    config.latent = z = config_dict.ConfigDict()
    z.use_mean = True  # z = s·μ(x) (False: s·(μ + σ ε), LDM's posterior sample)
    z.autoencoder_workdir = config_dict.placeholder(str)  # None: <workdir>/autoencoder
    t, m = config.training, config.model
    t.batch_size, t.n_iters = 64, 1200  # as digits_edm's 1200-step pixel U-Net
    t.snapshot_freq = 500
    t.snapshot_freq_for_preemption = 250
    t.eval_freq = 250
    t.n_jitted_steps = 1
    m.nf = 32
    m.ch_mult = (1, 2)  # 8 -> 4
    m.num_res_blocks = 1
    m.attn_resolutions = (4,)
    m.dropout = 0.0
    config.optim.warmup = 200
    return config
