"""A seconds-long score_sde-style config: discrete DDPM (VP, ``training.continuous=False``) with a tiny
U-Net on the embedded 8x8 digits. The test suite runs it through ``scoresde-train score_sde_config=...``.

    scoresde-train score_sde_config=experiments/score_sde_configs/ddpm_digits_tiny.py
"""

import ml_collections


def get_config():
    config = ml_collections.ConfigDict()
    config.training = training = ml_collections.ConfigDict()
    training.sde = "vpsde"
    training.continuous = False
    training.reduce_mean = True
    training.likelihood_weighting = False
    training.n_iters = 10
    training.batch_size = 16
    training.snapshot_freq = 10
    training.log_freq = 5

    config.sampling = sampling = ml_collections.ConfigDict()
    sampling.method = "pc"
    sampling.predictor = "ancestral_sampling"
    sampling.corrector = "none"
    sampling.noise_removal = True

    config.eval = evaluate = ml_collections.ConfigDict()
    evaluate.batch_size = 8
    evaluate.enable_bpd = False
    evaluate.num_samples = 8

    config.data = data = ml_collections.ConfigDict()
    data.dataset = "digits"
    data.image_size = 8
    data.num_channels = 1
    data.centered = True
    data.random_flip = False

    config.model = model = ml_collections.ConfigDict()
    model.name = "ddpm"
    model.ema_rate = 0.9
    model.nf = 32
    model.ch_mult = (1, 2)
    model.num_res_blocks = 1
    model.attn_resolutions = (4,)
    model.dropout = 0.0
    model.num_scales = 50
    model.beta_min = 0.1
    model.beta_max = 20.0
    model.resamp_with_conv = True
    model.scale_by_sigma = False
    model.conditional = True
    model.nonlinearity = "swish"
    model.normalization = "GroupNorm"

    config.optim = optim = ml_collections.ConfigDict()
    optim.optimizer = "Adam"
    optim.lr = 1e-3
    optim.warmup = 2
    optim.grad_clip = 1.0

    config.seed = 0
    return config
