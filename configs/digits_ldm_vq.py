"""Latent diffusion of the 16x16 digits on a VQ autoencoder (LDM's "VQ-reg" first stage): `configs/digits_ldm.py`
with `autoencoder.kind = "vq"`, K = 64 codes of dimension 2 (= latent_channels), f = 2 (16x16x1 -> 8x8x2),
loss Σ(x − D(z_q))² + ‖sg(z_e) − e‖² + 0.25 ‖z_e − sg(e)‖² with a learned codebook. The diffusion model is
trained on the pre-quantisation encoder output z = s·z_e(x), s = 1/std(z_e), and its samples decode as
x = D(quantize(z/s)).

    sdejax --config=configs/digits_ldm_vq.py --workdir=runs/digits_ldm_vq --mode=train_autoencoder
    sdejax --config=configs/digits_ldm_vq.py --workdir=runs/digits_ldm_vq                   # diffusion on z_e
    sdejax --config=configs/digits_ldm_vq.py --workdir=runs/digits_ldm_vq --mode=sample     # decoded samples

`metrics.json` of the autoencoder reports the test split's codebook usage (codes used of K) and perplexity.
"""
from configs import digits_ldm


def get_config():
    config = digits_ldm.get_config()
    a = config.autoencoder
    del a["beta"]  # the KL weight: not read by a VQ autoencoder
    a.kind = "vq"
    a.num_codes = 64  # K; code dimension = latent_channels = 2
    a.commitment = 0.25  # β of the commitment term ‖z_e − sg(e)‖²
    del config.latent["use_mean"]  # z_e is deterministic
    return config
