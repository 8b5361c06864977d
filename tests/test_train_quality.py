"""End-to-end quality: an MLP trained with ``train`` on the 2-D Gaussian mixture reaches the true NLL.

A residual MLP with Gaussian Fourier time features, ε-loss (continuous VP DSM, ``lambda = s^2``)
and EMA is trained on samples of ``default_gmm(2)`` for a fixed step budget (about 3 minutes of
training on one core of a shared 2-core CPU; the time is printed, not asserted). Its
test NLL (PF-ODE, exact divergence, rtol = atol = 1e-5) is compared with the mixture's exact NLL on
the same test points: the paired per-point difference ``(log p(x) - log p_model(x)) / D`` has mean
below ``TOL`` nats/dim, with a margin of 3 standard errors so the assertion is not carried by
luck of the test sample.

Measured (commit of this file, shared 2-core CPU under load): 6000 steps x 512, hidden 128, lr 2e-3
-> gap 0.0164 +- 0.0034 nats/dim (127 s of training); hidden 256, lr 1e-3 -> 0.0162 +- 0.0036
(825 s, heavily loaded machine); batch 256 x 4000 steps -> 0.033 +- 0.003. The training loss
plateaus at 0.2335 in all of them, so this test does NOT pass yet at TOL = 0.01: the remaining gap
is not capacity or step count (see the report to the lead).
"""

from __future__ import annotations

import math
import os
import time

import pytest
import torch

from scoresde.data.toy import default_gmm
from scoresde.likelihood import log_likelihood
from scoresde.losses import get_loss_fn
from scoresde.model import ScoreModel
from scoresde.nets import MLPScoreNet
from scoresde.sde import VPSDE
from scoresde.train import TrainOptions, train

TOL = 0.01  # nats/dim
QUALITY_STEPS = 6000  # about 3 minutes on one core of the shared CPU
QUALITY_BATCH = 512
N_TEST = 1000


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("SCORESDE_RUN_SLOW") != "1", reason="3-minute training run; set SCORESDE_RUN_SLOW=1")
def test_mlp_on_gaussian_mixture_reaches_true_nll(tmp_path):
    torch.set_num_threads(1)
    gmm, sde, D = default_gmm(2), VPSDE(), 2
    x_train = gmm.sample(200_000, generator=torch.Generator().manual_seed(1)).float()
    x_test = gmm.sample(N_TEST, generator=torch.Generator().manual_seed(2))  # float64
    model = ScoreModel(MLPScoreNet(D, hidden=128, depth=3, time_embedding="fourier"), sde, "eps", continuous=True)

    t0 = time.perf_counter()
    opts = TrainOptions(n_steps=QUALITY_STEPS, batch_size=QUALITY_BATCH, lr=2e-3, warmup=200, ema_rate=0.999, log_every=500)
    res = train(model, get_loss_fn(sde), x_train, opts, tmp_path, progress=False)
    train_s = time.perf_counter() - t0
    ema = res.ema.module.double()
    r = log_likelihood(ema.score_fn, sde, x_test, divergence="exact", rtol=1e-5, atol=1e-5, error_norm="batch_rms")
    gap = (gmm.log_prob(x_test) - r.logp) / D  # per point, nats/dim
    mean, se = float(gap.mean()), float(gap.std()) / math.sqrt(N_TEST)
    print(f"\ntrained {res.step} steps in {train_s:.0f} s; test NLL model {float(-r.logp.mean()) / D:.4f}, "
          f"true {float(-gmm.log_prob(x_test).mean()) / D:.4f} nats/dim; gap {mean:.4f} +- {se:.4f}; NFE {r.nfe}")
    assert abs(mean) + 3 * se < TOL, f"gap {mean:.4f} +- {se:.4f} nats/dim"

