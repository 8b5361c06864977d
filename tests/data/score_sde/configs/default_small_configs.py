"""Shared defaults for the small score_sde-style configs used by tests/test_interop_score_sde.py.

Laid out like score_sde_pytorch's ``configs/`` package (a ``get_default_configs()`` that the per-run
files import as ``configs.default_small_configs``), shrunk to the 16x16, nf 16 networks of
/work/shared/fixtures/score_sde.
"""

import ml_collections


def get_default_configs():
    config = ml_collections.ConfigDict()
    config.training = training = ml_collections.ConfigDict()
    training.continuous = True
    training.sde = "vpsde"

    config.data = data = ml_collections.ConfigDict()
    data.image_size = 16
    data.num_channels = 3
    data.centered = False

    config.model = model = ml_collections.ConfigDict()
    model.sigma_min = 0.01
    model.sigma_max = 50
    model.num_scales = 1000
    model.beta_min = 0.1
    model.beta_max = 20.0
    model.dropout = 0.1
    model.embedding_type = "fourier"
    return config
