"""DDPM++ cont. (VP) on CIFAR-10 in score_sde's ml-collections format (the paper's field names).

Run it with this toolkit's equivalent configuration:

    scoresde-train score_sde_config=experiments/score_sde_configs/ddpmpp_continuous_vp_cifar10.py data.root=/path/to/data

Fields are those of the paper's public configs; ``scoresde.config.score_sde_overrides`` maps each one
and rejects any it cannot honour (e.g. ``model.fir=True``), naming it.
"""

import ml_collections


def get_config():
    config = ml_collections.ConfigDict()

    config.training = training = ml_collections.ConfigDict()
    training.sde = "vpsde"
    training.continuous = True
    training.reduce_mean = True
    training.likelihood_weighting = False
    training.n_iters = 1300001
    training.batch_size = 128
    training.snapshot_freq = 50000
    training.log_freq = 50
    training.eval_freq = 100
    training.snapshot_freq_for_preemption = 10000
    training.snapshot_sampling = True

    config.sampling = sampling = ml_collections.ConfigDict()
    sampling.method = "pc"
    sampling.predictor = "reverse_diffusion"
    sampling.corrector = "langevin"
    sampling.snr = 0.16
    sampling.n_steps_each = 1
    sampling.noise_removal = True
    sampling.probability_flow = False

    config.eval = evaluate = ml_collections.ConfigDict()
    evaluate.batch_size = 1024
    evaluate.enable_bpd = True
    evaluate.bpd_dataset = "test"
    evaluate.num_samples = 50000
    evaluate.begin_ckpt = 9
    evaluate.end_ckpt = 26

    config.data = data = ml_collections.ConfigDict()
    data.dataset = "CIFAR10"
    data.image_size = 32
    data.num_channels = 3
    data.centered = True
    data.random_flip = True
    data.uniform_dequantization = False

    config.model = model = ml_collections.ConfigDict()
    model.name = "ncsnpp"
    model.scale_by_sigma = False
    model.ema_rate = 0.9999
    model.normalization = "GroupNorm"
    model.nonlinearity = "swish"
    model.nf = 128
    model.ch_mult = (1, 2, 2, 2)
    model.num_res_blocks = 4
    model.attn_resolutions = (16,)
    model.resamp_with_conv = True
    model.conditional = True
    model.fir = False
    model.skip_rescale = True
    model.resblock_type = "biggan"
    model.progressive = "none"
    model.progressive_input = "none"
    model.progressive_combine = "sum"
    model.attention_type = "ddpm"
    model.init_scale = 0.0
    model.embedding_type = "positional"
    model.fourier_scale = 16
    model.conv_size = 3
    model.sigma_min = 0.01
    model.sigma_max = 50
    model.num_scales = 1000
    model.beta_min = 0.1
    model.beta_max = 20.0
    model.dropout = 0.1

    config.optim = optim = ml_collections.ConfigDict()
    optim.weight_decay = 0
    optim.optimizer = "Adam"
    optim.lr = 2e-4
    optim.beta1 = 0.9
    optim.eps = 1e-8
    optim.warmup = 5000
    optim.grad_clip = 1.0

    config.seed = 42
    return config
