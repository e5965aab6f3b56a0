"""DDPM++ (small) on scikit-learn's 8x8 digits padded to 16x16 (`data.dataset = "DIGITS"`), VP SDE,
continuous DSM. The data ship with scikit-learn: the TFDS builder prepares them offline into
`data.data_dir` (default: TFDS's ~/tensorflow_datasets) on first use.

    sdejax --config=configs/digits_ddpmpp.py --workdir=runs/digits                # train
    sdejax --config=configs/digits_ddpmpp.py --workdir=runs/digits --mode=eval    # bits/dim, test split
    sdejax --config=configs/digits_ddpmpp.py --workdir=runs/digits --mode=sample  # PNG grid + .npz

Pixel values have 17 levels (0-16), dequantised uniformly on that grid, so bits/dim include
+log2(17) ≈ 4.09 and are NOT comparable with 8-bit images (log2 256 = 8).
"""
from ml_collections import config_dict

from configs import _common


def get_config():
    config = _common.base_config(
        batch_size=128, n_iters=20000, snapshot_freq_for_preemption=1000, snr=0.16,
        eval_batch_size=100, enable_sampling=False, dataset="DIGITS", image_size=16, sigma_max=50.0,
        num_scales=1000, dropout=0.1)
    _common.set_sde(config, "vpsde", continuous=True)  # also centres the data to [-1, 1]
    _common.ddpmpp(config, num_res_blocks=2)
    training = config.training
    training.snapshot_freq = 5000
    training.log_freq = 100
    training.eval_freq = 1000
    training.n_jitted_steps = 5
    training.snapshot_num_samples = 64
    training.digits_monitor = True  # log the digits classifier's Fréchet distance of the snapshot samples (not FID)
    data = config.data
    data.num_channels = 1
    data.random_flip = False  # digits are not mirror-symmetric
    data.uniform_dequantization = True
    data.centered = True
    data.data_dir = config_dict.placeholder(str)  # None: TFDS's default; the digits are built there if missing
    model = config.model
    model.nf = 32
    model.ch_mult = (1, 2, 2)  # 16 -> 8 -> 4
    model.attn_resolutions = (8,)
    model.ema_rate = 0.999
    model.ema_warmup = True  # decay min(0.999, (1+step)/(10+step)): a 300-step run samples digits
    evaluate = config.eval
    evaluate.enable_bpd = True
    evaluate.num_samples = 64
    evaluate.divergence = "hutchinson_rademacher"  # PF-ODE likelihood: one Rademacher probe per example
    evaluate.num_probes = 1
    evaluate.rtol = 1e-5
    evaluate.atol = 1e-5
    evaluate.num_bpd_batches = 0  # all 3 batches of the 300 test digits
    config.optim.lr = 1e-3
    config.optim.warmup = 500
    return config
