"""End-to-end quality: an MLP trained with ``train`` on the 2-D Gaussian mixture reaches the true NLL.

The evaluation is checked first with the oracle: the mixture's exact score through the same PF-ODE
likelihood code gives the exact NLL (gap ~ 1e-5 nats/dim), so any gap of a trained model is the model's.

The slow test trains a residual MLP (``MLPScoreNet``, hidden 128, depth 3) with Gaussian Fourier
features of ``log(999 t)`` at ``fourier_scale = 1``, the ε-loss (continuous VP DSM, ``lambda = s^2``)
and EMA on samples of ``default_gmm(2)`` for a fixed number of steps (deterministic: seeded data,
seeded training, step-count based). Its test NLL (PF-ODE, exact divergence, rtol = atol = 1e-5) is
compared with the mixture's exact NLL on the same test points: the paired per-point difference
``(log p(x) - log p_model(x)) / D`` must have ``|mean| + 3 se < TOL`` nats/dim.

Diagnosis (the earlier recipe plateaued at a gap of 0.016): the Fourier features of ``log(999 t)`` at
the default scale 16 have periods of ~0.06 in ``log t``, far finer than the score changes, so the
network's time input was close to noise; scale 1 (period ~1 in ``log t``) is used here (see the
measurements below).
Replacing the model's score by the exact score for ``t >= tau`` showed that the remaining gap comes
from ``t`` in ``[0.01, 0.5]`` (where the mixture's modes merge), not from the ε-parameterisation's
``1/s`` amplification near ``t = eps`` (model used only below ``t = 0.01``: gap 0.0002). The rest is
optimiser noise (raw weights are 3-10x worse than the EMA): a second phase at a lower learning rate,
started from the EMA weights, removes most of it.

The training budget is about 3 minutes of one unloaded core, measured as the CPU time of this
process (``time.process_time``; the machine is shared, so wall time is not a fair measure). It is
printed with the wall time, not asserted.

Measured (``OMP_NUM_THREADS=1 python -m pytest tests/test_train_quality.py -m slow -s``, shared 2-core
x86_64 CPU, torch 2.13 CPU): 8000 + 4000 steps x 512 in 144 s CPU time (147 s wall); gap
0.0033 +- 0.0010 nats/dim (model 0.8183, true 0.8150 nats/dim), so ``|gap| + 3 se = 0.0062 < 0.01``.
Other recipes (4000 test points unless noted): this two-phase recipe with Fourier scale 16: 0.0054 +- 0.0011
(NFE 950, vs 200 at scale 1); one phase, scale 16, 6000 x 512, lr 2e-3 (the earlier recipe): 0.016 +- 0.003
(1000 points); one phase, scale 1, 12000 x 512, lr 1e-3, EMA 0.9995: 0.008 +- 0.003 (1000 points; training
loss 0.2295 vs the oracle's irreducible 0.2238, 0.2265 after phase 2); one phase, scale 1, 6000 x 2048
(twice the budget): 0.0068 +- 0.0012. So the learning-rate decay does most of the work and the time
embedding the rest (and most of the NFE).
"""

from __future__ import annotations

import math
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
N_TEST = 4000
BATCH = 512
PHASE1 = dict(n_steps=8000, lr=2e-3, warmup=200, ema_rate=0.999)
PHASE2 = dict(n_steps=4000, lr=2e-4, warmup=0, ema_rate=0.999)


def _nll_gap(score_fn, gmm, sde, x_test, error_norm="batch"):
    """Per-point ``(log p(x) - log p_model(x)) / D`` (nats/dim) and the ODE's NFE (rtol = atol = 1e-5)."""
    r = log_likelihood(score_fn, sde, x_test, divergence="exact", rtol=1e-5, atol=1e-5, error_norm=error_norm)
    return (gmm.log_prob(x_test) - r.logp) / x_test.shape[1], r.nfe


def test_oracle_score_gives_exact_nll():
    """Sanity check of the evaluation: the exact score through the PF-ODE reproduces the exact NLL.

    With the batch-RMS error norm the slow test uses, single points may be off by a few 1e-3 but the mean
    (what the slow test asserts) is off by ~1e-5; with the per-sample norm every point is within 1e-3.
    """
    gmm, sde = default_gmm(2), VPSDE()
    x_test = gmm.sample(500, generator=torch.Generator().manual_seed(2))  # float64
    gap, _ = _nll_gap(gmm.score_fn(sde), gmm, sde, x_test, error_norm="batch")
    assert abs(float(gap.mean())) < 1e-4, f"mean gap {float(gap.mean()):.2e} nats/dim"
    gap, _ = _nll_gap(gmm.score_fn(sde), gmm, sde, x_test, error_norm="per_sample")
    assert float(gap.abs().max()) < 1e-3, f"max |gap| {float(gap.abs().max()):.2e} nats/dim"


@pytest.mark.slow
def test_mlp_on_gaussian_mixture_reaches_true_nll(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        gmm, sde, D = default_gmm(2), VPSDE(), 2
        x_train = gmm.sample(200_000, generator=torch.Generator().manual_seed(1)).float()
        x_test = gmm.sample(N_TEST, generator=torch.Generator().manual_seed(2))  # float64
        net = MLPScoreNet(D, hidden=128, depth=3, time_embedding="fourier", fourier_scale=1.0, seed=0)
        model = ScoreModel(net, sde, "eps", continuous=True)
        loss_fn = get_loss_fn(sde)

        wall0, cpu0 = time.perf_counter(), time.process_time()
        res = train(model, loss_fn, x_train, TrainOptions(batch_size=BATCH, log_every=1000, seed=0, **PHASE1),
                    tmp_path / "phase1", progress=False)
        # phase 2: lower learning rate, starting from the phase-1 EMA weights (a step decay of the learning rate)
        model.load_state_dict(res.ema.module.state_dict())
        res = train(model, loss_fn, x_train, TrainOptions(batch_size=BATCH, log_every=1000, seed=1, **PHASE2),
                    tmp_path / "phase2", progress=False)
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0

        gap, nfe = _nll_gap(res.ema.module.double().score_fn, gmm, sde, x_test)
        mean, se = float(gap.mean()), float(gap.std()) / math.sqrt(N_TEST)
        print(f"\ntrained {PHASE1['n_steps']} + {PHASE2['n_steps']} steps x {BATCH}: {cpu:.0f} s CPU time of this "
              f"process ({wall:.0f} s wall); test NLL model {float(-(gmm.log_prob(x_test) - gap * D).mean()) / D:.4f}, "
              f"true {float(-gmm.log_prob(x_test).mean()) / D:.4f} nats/dim; gap {mean:.4f} +- {se:.4f}; NFE {nfe}")
        assert abs(mean) + 3 * se < TOL, f"gap {mean:.4f} +- {se:.4f} nats/dim"
    finally:
        torch.set_num_threads(threads)
