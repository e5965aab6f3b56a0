"""Shared pieces of the experiment configs: the default blocks and the architecture presets.

Every experiment config is `get_default_configs()` of its dataset plus one architecture preset
plus its own deltas, so each file reads as the list of what makes that experiment special.
"""
import ml_collections


def base_config(*, batch_size, n_iters, snapshot_freq_for_preemption, snr, eval_batch_size, enable_sampling, dataset, image_size, sigma_max, num_scales, dropout,
                extra_data=None):
    """The `default_*_configs` layout of score_sde, plus sdejax's `model.dtype` and `model.num_classes`."""
    config = ml_collections.ConfigDict()
    config.training = training = ml_collections.ConfigDict()
    training.batch_size = batch_size
    training.n_iters = n_iters
    training.snapshot_freq = 50000
    training.log_freq = 50
    training.eval_freq = 100
    training.snapshot_freq_for_preemption = snapshot_freq_for_preemption  # extra checkpoints for preemption
    training.snapshot_sampling = True  # produce samples at each snapshot
    training.likelihood_weighting = False
    training.continuous = True
    training.reduce_mean = False
    training.sde = 'vesde'

    config.sampling = sampling = ml_collections.ConfigDict()
    sampling.method = 'pc'
    sampling.predictor = 'reverse_diffusion'
    sampling.corrector = 'langevin'
    sampling.n_steps_each = 1
    sampling.noise_removal = True
    sampling.probability_flow = False
    sampling.snr = snr

    config.eval = evaluate = ml_collections.ConfigDict()
    # --mode=eval evaluates every retained checkpoint with step in [begin_ckpt, end_ckpt] (end_ckpt = -1:
    # no upper bound); begin_ckpt = end_ckpt = 0: the newest checkpoint only.
    evaluate.begin_ckpt = 0
    evaluate.end_ckpt = 0
    evaluate.batch_size = eval_batch_size
    evaluate.enable_sampling = enable_sampling
    evaluate.num_samples = 50000
    evaluate.enable_loss = True
    evaluate.enable_bpd = False
    # Sample quality (sdejax.evaluation.workflow): reference statistics of `fid_split` from
    # --mode=fid_stats, FID/KID/IS in --mode=eval when enable_sampling is set.
    evaluate.fid_split = 'train'
    evaluate.fid_num_samples = ml_collections.config_dict.placeholder(int)  # None: the whole split
    evaluate.kid_features = 10000
    evaluate.fid_stats_path = ml_collections.config_dict.placeholder(str)  # None: workdir/fid_stats/
    evaluate.inception_weights = ml_collections.config_dict.placeholder(str)  # None: $SDEJAX_INCEPTION_WEIGHTS

    config.data = data = ml_collections.ConfigDict()
    data.dataset = dataset
    data.image_size = image_size
    data.random_flip = True
    data.centered = False
    data.uniform_dequantization = False
    data.num_channels = 3
    for key, value in (extra_data or {}).items():
        data[key] = value

    config.model = model = ml_collections.ConfigDict()
    model.flax_checkpoint = ''  # a score_sde Flax checkpoint (file or checkpoints/ folder) to start from
    model.ema_warmup = False  # score_sde's fixed EMA rate (True: diffusers' warm-up, sdejax.training.state.ema_decay)
    model.sigma_min = 0.01
    model.sigma_max = float(sigma_max)
    model.num_scales = num_scales
    model.beta_min = 0.1
    model.beta_max = 20.
    model.dropout = dropout
    model.dtype = 'float32'  # compute dtype: 'float32' or 'bfloat16' (params stay float32)
    model.num_classes = 0  # > 0: class-conditional, index num_classes is the null class

    config.optim = optim = ml_collections.ConfigDict()
    optim.weight_decay = 0
    optim.optimizer = 'Adam'
    optim.lr = 2e-4
    optim.beta1 = 0.9
    optim.eps = 1e-8
    optim.warmup = 5000
    optim.grad_clip = 1.

    config.seed = 42
    return config


def set_sde(config, sde, continuous):
    """Training SDE and the matching default sampler (PC reverse diffusion + Langevin for VE, EM for VP)."""
    config.training.sde = sde
    config.training.continuous = continuous
    if sde != 'vesde':
        config.training.reduce_mean = True
        config.data.centered = True
        config.sampling.predictor = 'euler_maruyama'
        config.sampling.corrector = 'none'
    return config


def ncsnpp(config, *, nf=128, ch_mult=(1, 2, 2, 2), num_res_blocks=4, fir=True, progressive='none',
           progressive_input='residual', embedding_type='fourier', scale_by_sigma=True, ema_rate=0.999):
    """NCSN++ / DDPM++ (`model.name = 'ncsnpp'`)."""
    model = config.model
    model.name = 'ncsnpp'
    model.scale_by_sigma = scale_by_sigma
    model.ema_rate = ema_rate
    model.nonlinearity = 'swish'
    model.nf = nf
    model.ch_mult = ch_mult
    model.num_res_blocks = num_res_blocks
    model.attn_resolutions = (16,)
    model.resamp_with_conv = True
    model.conditional = True
    model.fir = fir
    model.fir_kernel = [1, 3, 3, 1]
    model.skip_rescale = True
    model.resblock_type = 'biggan'
    model.progressive = progressive
    model.progressive_input = progressive_input
    model.progressive_combine = 'sum'
    model.init_scale = 0.
    model.embedding_type = embedding_type
    model.fourier_scale = 16
    return config


def ddpmpp(config, *, num_res_blocks=4):
    """DDPM++: NCSN++ without FIR and pyramids, positional embedding, no 1/σ output scaling."""
    return ncsnpp(config, num_res_blocks=num_res_blocks, fir=False, progressive_input='none',
                  embedding_type='positional', scale_by_sigma=False, ema_rate=0.9999)


def ncsnpp_256(config, *, sigma_max):
    """The 256px NCSN++ (LSUN, CelebA-HQ, FFHQ): 7 resolutions, output/input skip pyramids."""
    config.model.sigma_max = float(sigma_max)
    return ncsnpp(config, ch_mult=(1, 1, 2, 2, 2, 2, 2), num_res_blocks=2, progressive='output_skip',
                  progressive_input='input_skip')


def tfrecords_dataset(config, dataset):
    """Read `dataset` (CelebAHQ or FFHQ) from score_sde's TFRecords (`data.tfrecords_path`) instead of LSUN."""
    config.data.dataset = dataset
    del config.data.category
    config.data.tfrecords_path = ''
    return config


def ncsnpp_1024(config, dataset):
    """The 1024px NCSN++ of CelebA-HQ and FFHQ (VE, σ_max = 1348): nf 16, 8 resolutions, batch 8."""
    config = tfrecords_dataset(ncsnpp_256(config, sigma_max=1348), dataset)
    config.data.image_size = 1024
    config.training.batch_size = 8
    config.model.nf = 16
    config.model.ch_mult = (1, 2, 4, 8, 16, 32, 32, 32)
    config.model.num_res_blocks = 1
    config.model.ema_rate = 0.9999
    return config


def ddpm(config, *, ch_mult=(1, 2, 2, 2), scale_by_sigma=False, ema_rate=0.9999, conditional=True):
    """The DDPM U-Net (`model.name = 'ddpm'`)."""
    model = config.model
    model.name = 'ddpm'
    model.scale_by_sigma = scale_by_sigma
    model.ema_rate = ema_rate
    model.nonlinearity = 'swish'
    model.nf = 128
    model.ch_mult = ch_mult
    model.num_res_blocks = 2
    model.attn_resolutions = (16,)
    model.resamp_with_conv = True
    model.conditional = conditional
    return config


def refinenet(config, *, name, sigma_max, num_scales, snr, n_steps_each, ema_rate):
    """NCSN v1 / NCSNv2: SMLD training (discrete VE), annealed Langevin dynamics sampling."""
    config.training.sde = 'vesde'
    config.training.continuous = False
    sampling = config.sampling
    sampling.method = 'pc'
    sampling.predictor = 'none'
    sampling.corrector = 'ald'
    sampling.n_steps_each = n_steps_each
    sampling.snr = snr
    model = config.model
    model.name = name
    del model.dropout  # RefineNets have no dropout
    model.sigma_max = float(sigma_max)
    model.num_scales = num_scales
    model.ema_rate = ema_rate
    model.normalization = 'InstanceNorm++'
    model.nonlinearity = 'elu'
    model.nf = 128
    if name != 'ncsn':
        model.flavor = 'pytorch'  # 'flax' for score_sde's Flax NCSNv2 (its checkpoints); sdejax.models.ncsnv2
    optim = config.optim
    optim.lr = 1e-4 if name != 'ncsn' else 1e-3
    optim.amsgrad = False
    optim.warmup = 0
    optim.grad_clip = -1.
    return config


def tiny(config, *, nf=16):
    """Shrink an experiment config to a seconds-on-CPU test size (8x8 images, batch 4)."""
    config.data.image_size = 8
    config.training.batch_size = 4
    config.eval.batch_size = 4
    model = config.model
    model.nf = nf
    if 'dropout' in model:
        model.dropout = 0.1
    if 'ch_mult' in model:
        model.ch_mult = (1, 2)
        model.num_res_blocks = 1
        model.attn_resolutions = (4,)
    return config
