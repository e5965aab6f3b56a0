"""Masked (absorbing-state) discrete diffusion (MD4 / MDLM) of the 16x16 digits as tokens: each pixel's
17 gray levels are the K = 17 real tokens, MASK the 18th; linear α(t) = 1 − t, the NELBO with weight
−α′/(1 − α) (a bound on the discrete NLL, reported in bits/dim beside the PF-ODE bits/dim of
`configs/digits_ddpmpp.py` on the same 17-level data), ancestral unmasking on 64 uniform steps.
The denoiser is `TokenDenoiser` (a pre-LN transformer over the 256 positions).

    sdejax --config=configs/digits_masked.py --workdir=runs/digits_masked
"""
from configs import digits_ddpmpp


def get_config():
    config = digits_ddpmpp.get_config()
    t, m, s, e = config.training, config.model, config.sampling, config.eval
    t.objective = "masked"
    t.masking_schedule = "linear"
    t.batch_size, t.n_iters = 64, 2000  # a 2-CPU budget
    t.snapshot_sampling = False
    t.digits_monitor = False
    config.data.uniform_dequantization = False  # the levels are the tokens
    # drop the U-Net's keys; the schema's required training.sde (and its model keys) is built but not read
    for key in [k for k in m.keys() if k not in ("ema_rate", "ema_warmup", "beta_min", "beta_max", "num_scales",
                                                 "sigma_min", "sigma_max")]:
        del m[key]
    m.name = "token_denoiser"
    m.num_tokens = 17
    m.features, m.depth, m.num_heads, m.mlp_ratio = 64, 2, 4, 4
    s.num_steps = 64
    s.masked_grid = "uniform"
    e.num_probes = 4  # (t, mask) draws per held-out digit in the NELBO
    return config
