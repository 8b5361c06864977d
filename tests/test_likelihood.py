"""Likelihood through the probability-flow ODE, bits/dim and the DDPM ELBO, against Gaussian-mixture truth.

All numerics in float64. Tolerances: the ODE checks use the task's 1e-3 nats/dim; the statistical
checks use z-scores (3-4 standard errors) computed from the samples themselves, with fixed seeds.
"""

from __future__ import annotations

import math

import pytest
import torch

from scoresde import VESDE, VPSDE, GaussianMixture, SubVPSDE
import scoresde.elbo
import scoresde.likelihood
from scoresde.elbo import ddpm_elbo, discretized_gaussian_log_likelihood, evaluate_elbo
from scoresde.likelihood import (
    check_likelihood_options,
    bits_per_dim,
    dequantized_bits_per_dim,
    evaluate_bpd,
    log_likelihood,
)
from scoresde.samplers import CountingScore, sample
from scoresde.samplers.ode import ADAPTIVE_ODE_METHODS, FIXED_ODE_METHODS, TORCHDIFFEQ_ADAPTIVE, TORCHDIFFEQ_FIXED

F64 = torch.float64
EPS = 1e-5


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def mixture(D: int, K: int = 3, seed: int = 0) -> GaussianMixture:
    g = gen(seed)
    means = torch.randn(K, D, generator=g, dtype=F64)
    stds = 0.1 + 0.3 * torch.rand(K, generator=g, dtype=F64)
    weights = 0.2 + torch.rand(K, generator=g, dtype=F64)
    return GaussianMixture(means, stds, weights)


def oracle_reference(gm, sde, x, z):
    """``log p_eps(x) - log p_T(z) + prior_logp(z)``: what the ODE must return given its latent ``z``."""
    return gm.log_prob(x, EPS, sde) - gm.log_prob(z, sde.T, sde) + sde.prior_logp(z)


def unit_mixture(centered: bool) -> GaussianMixture:
    """A 2-D mixture living on the model scale of [0, 1) data (stds ~ 1-2 bins of 17 levels)."""
    a, b = (2.0, -1.0) if centered else (1.0, 0.0)
    means = torch.tensor([[0.3, 0.6], [0.7, 0.25]], dtype=F64) * a + b
    stds = torch.tensor([0.08, 0.15], dtype=F64) * a
    return GaussianMixture(means, stds, torch.tensor([0.4, 0.6], dtype=F64))


def quantise(y: torch.Tensor, levels: int, centered: bool) -> torch.Tensor:
    a, b = (2.0, -1.0) if centered else (1.0, 0.0)
    return ((y - b) / a * levels).floor().clamp(0, levels - 1).long()


def exact_discrete_logP(gm, k, levels, centered, m=1.0, s=0.0):
    """``log P(k) = log sum_c w_c prod_d [Phi((hi - m mu)/sd) - Phi((lo - m mu)/sd)]``, sd^2 = m^2 sigma_c^2 + s^2:
    the mass of the (perturbed) mixture in each closed bin, which factorises over dims per component."""
    a, b = (2.0, -1.0) if centered else (1.0, 0.0)
    kf = k.to(F64)
    lo, hi = a * kf / levels + b, a * (kf + 1) / levels + b
    sd = torch.sqrt(m**2 * gm.stds**2 + s**2)[None, :, None]
    mu = (m * gm.means)[None]
    Phi = torch.special.ndtr
    p = Phi((hi[:, None, :] - mu) / sd) - Phi((lo[:, None, :] - mu) / sd)
    return torch.logsumexp(torch.log(gm.weights)[None] + torch.log(p).sum(-1), dim=1)


# ------------------------------------------------------------------------------------------
# exact divergence
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("D", [2, 16])
@pytest.mark.parametrize("sde", [VPSDE(), SubVPSDE(), VESDE()], ids=["VP", "subVP", "VE"])
def test_exact_divergence_matches_oracle_per_sample(sde, D):
    gm = mixture(D)
    x = gm.sample(64, gen(1), dtype=F64)
    res = log_likelihood(gm.score_fn(sde), sde, x, divergence="exact")
    err = (res.logp - oracle_reference(gm, sde, x, res.z)).abs() / D
    assert res.logp.shape == (64,) and res.z.shape == x.shape and res.stderr is None
    assert float(err.max()) <= 1e-3, f"max per-sample error {float(err.max()):.2e} nats/dim"
    # logp is prior + delta
    torch.testing.assert_close(res.logp, res.prior_logp + res.delta_logp)


def test_per_sample_error_norm_beats_batch_rms():
    """The measured fact behind ``error_norm``: a batch RMS norm lets single samples drift."""
    sde, D = VPSDE(), 2
    gm = mixture(D)
    x = gm.sample(200, gen(1), dtype=F64)
    errs = {}
    for norm in ("per_sample", "batch"):
        res = log_likelihood(gm.score_fn(sde), sde, x, divergence="exact", error_norm=norm)
        errs[norm] = float(((res.logp - oracle_reference(gm, sde, x, res.z)).abs() / D).max())
    assert errs["per_sample"] <= 1e-3 < errs["batch"] * 10
    assert errs["per_sample"] * 5 < errs["batch"]


def test_exact_divergence_chunking_and_loop_agree_and_image_shapes():
    sde, D = VPSDE(), 16
    gm = mixture(D)
    x = gm.sample(8, gen(2), dtype=F64)
    ref = log_likelihood(gm.score_fn(sde), sde, x, divergence="exact", method="rk4", options=dict(step_size=0.05))
    for kw in (dict(chunk_size=3), dict(vectorize=False)):
        r = log_likelihood(gm.score_fn(sde), sde, x, divergence="exact", method="rk4", options=dict(step_size=0.05), **kw)
        torch.testing.assert_close(r.logp, ref.logp)
    # image-shaped input (B, 1, 4, 4): the oracle flattens, the likelihood must keep the shape
    img = log_likelihood(gm.score_fn(sde), sde, x.reshape(8, 1, 4, 4), divergence="exact", method="rk4", options=dict(step_size=0.05))
    assert img.z.shape == (8, 1, 4, 4)
    torch.testing.assert_close(img.logp, ref.logp)


def test_float32_runs_and_agrees_with_float64():
    sde, D = VPSDE(), 2
    gm = mixture(D)
    x = gm.sample(32, gen(3), dtype=F64)
    r64 = log_likelihood(gm.score_fn(sde), sde, x, divergence="exact")
    r32 = log_likelihood(gm.score_fn(sde), sde, x.float(), divergence="exact")
    assert r32.logp.dtype == torch.float32 and r32.z.dtype == torch.float32
    assert float((r32.logp.double() - r64.logp).abs().max()) / D < 1e-3


# ------------------------------------------------------------------------------------------
# Hutchinson
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("noise", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased(noise):
    sde, D, n = VPSDE(), 2, 1000
    gm = mixture(D)
    x = gm.sample(n, gen(4), dtype=F64)
    exact = log_likelihood(gm.score_fn(sde), sde, x, divergence="exact")
    hutch = log_likelihood(gm.score_fn(sde), sde, x, noise=noise, generator=gen(5))
    err = hutch.logp - exact.logp
    se = float(err.std()) / math.sqrt(n)
    assert float(err.std()) > 0.05  # really stochastic (~0.25 nats/dim per sample for Rademacher)
    assert abs(float(err.mean())) <= 3 * se, f"mean error {float(err.mean()):.4f}, 3 SE = {3 * se:.4f}"


def test_hutchinson_stderr_shrinks_like_inverse_sqrt_probes_and_is_honest():
    sde, D, n = VPSDE(), 16, 400
    gm = mixture(D)
    x = gm.sample(n, gen(6), dtype=F64)
    exact = log_likelihood(gm.score_fn(sde), sde, x, divergence="exact")
    med, mean_se, nfes = [], {}, []
    probes = (1, 4, 16)
    for P in probes:
        r = log_likelihood(gm.score_fn(sde), sde, x, probes=P, generator=gen(7 + P))
        err = r.logp - exact.logp
        # per-sample error spreads differ by orders of magnitude (heavy tail over samples), so
        # the robust median |error| is the scale statistic; it is ~ P^(-1/2) like each sample's error
        med.append(float(err.abs().median()))
        nfes.append(r.nfe)
        if P > 1:
            mean_se[P] = float(r.stderr.mean())
            z = err / r.stderr
            if P == 16:
                # t-distribution with 15 dof: var 15/13 ~ 1.15; 400 samples -> sd of the variance ~ 0.1
                assert 0.8 < float(z.var()) < 1.6, float(z.var())
    # empirical error ~ P^(-1/2): least-squares slope of log median |error| vs log P
    lp, lr = torch.log(torch.tensor(probes, dtype=F64)), torch.log(torch.tensor(med, dtype=F64))
    slope = float(((lp - lp.mean()) * (lr - lr.mean())).sum() / (lp - lp.mean()).pow(2).sum())
    assert -0.6 < slope < -0.4, slope
    # the reported per-sample standard error halves from 4 to 16 probes
    assert 1.7 < mean_se[4] / mean_se[16] < 2.3
    # all probes share one solve: NFE does not grow with probes
    assert max(nfes) < 1.5 * min(nfes)


def test_same_seed_same_numbers():
    sde, gm = VESDE(), mixture(2)
    x = gm.sample(16, gen(8), dtype=F64)
    a = log_likelihood(gm.score_fn(sde), sde, x, probes=3, generator=gen(9))
    b = log_likelihood(gm.score_fn(sde), sde, x, probes=3, generator=gen(9))
    assert torch.equal(a.logp, b.logp) and torch.equal(a.stderr, b.stderr)


# ------------------------------------------------------------------------------------------
# NFE and input validation
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw",
    [dict(divergence="exact"), dict(divergence="hutchinson", probes=4), dict(divergence="exact", method="rk4", options=dict(step_size=0.1))],
    ids=["exact-dopri5", "hutch4-dopri5", "exact-rk4"],
)
def test_nfe_equals_calls(kw):
    sde, gm = SubVPSDE(), mixture(4)
    x = gm.sample(10, gen(10), dtype=F64)
    counted = CountingScore(gm.score_fn(sde))
    res = log_likelihood(counted, sde, x, generator=gen(11), **kw)
    assert res.nfe == counted.calls > 0
    if kw.get("method") == "rk4":
        assert res.nfe == 4 * 10  # 10 steps of (1 - eps)/0.1 rounded up, 4 stages each


def _never(x, t):
    raise AssertionError("score_fn must not be called for invalid input")


@pytest.mark.parametrize(
    "kw, exc, word",
    [
        (dict(divergence="trace"), ValueError, "divergence"),
        (dict(noise="uniform"), ValueError, "noise"),
        (dict(method="rk45"), ValueError, "method"),
        (dict(probes=0), ValueError, "probes"),
        (dict(eps=0.0), ValueError, "eps"),
        (dict(eps=1.5), ValueError, "eps"),
        (dict(rtol=-1.0), ValueError, "rtol"),
        (dict(error_norm="l2"), ValueError, "error_norm"),
        (dict(divergence="exact", probes=4), ValueError, "probes"),
    ],
)
def test_log_likelihood_rejects_bad_arguments(kw, exc, word):
    x = torch.zeros(3, 2, dtype=F64)
    with pytest.raises(exc, match=word) as in_solve:
        log_likelihood(_never, VPSDE(), x, **kw)
    # the same check on its own (used by evaluate_bpd and the config layer), and evaluate_bpd before any work
    with pytest.raises(exc) as alone:
        check_likelihood_options(**kw)
    assert str(alone.value) == str(in_solve.value)
    with pytest.raises(exc, match=word):
        evaluate_bpd(_never, VPSDE(), (torch.zeros(3, 2, dtype=torch.long) for _ in range(0)), levels=4, **kw)


def test_solver_names_are_the_samplers():
    """One list of ODE solvers: the likelihood takes every torchdiffeq solver the sampler takes (scipy's RK45,
    which cannot carry the divergence, is the sampler's only extra)."""
    assert set(ADAPTIVE_ODE_METHODS) - set(TORCHDIFFEQ_ADAPTIVE) == {"scipy_rk45"} and FIXED_ODE_METHODS == TORCHDIFFEQ_FIXED
    for method in TORCHDIFFEQ_ADAPTIVE + TORCHDIFFEQ_FIXED:
        check_likelihood_options(method=method)
    with pytest.raises(ValueError, match="method"):
        check_likelihood_options(method="scipy_rk45")


@pytest.mark.parametrize("sde", [VPSDE(), VESDE(sigma_min=0.01, sigma_max=20.0)], ids=["vp", "ve"])
def test_likelihood_and_sampler_integrate_the_same_ode(sde):
    """The likelihood's latent ``z = x(T)``, integrated back by the sampler's probability-flow ODE (the same drift
    function), returns the data: PF-ODE round trip to the solvers' tolerance."""
    gm = mixture(2)
    x = gm.sample(8, gen(12), dtype=F64)
    res = log_likelihood(gm.score_fn(sde), sde, x, divergence="exact", rtol=1e-10, atol=1e-10, eps=EPS)
    back = sample(gm.score_fn(sde), sde, x.shape, method="ode", x_T=res.z, rtol=1e-10, atol=1e-10, eps=EPS)
    torch.testing.assert_close(back.x, x, rtol=0, atol=1e-6)


def test_bad_data_rejected():
    with pytest.raises(TypeError, match="x"):
        log_likelihood(_never, VPSDE(), torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="x"):
        log_likelihood(_never, VPSDE(), torch.zeros(3, dtype=F64))
    k = torch.tensor([[0, 17]])
    with pytest.raises(ValueError, match="levels"):
        dequantized_bits_per_dim(lambda y: _never(y, None), k, levels=17)
    with pytest.raises(TypeError, match="k"):
        dequantized_bits_per_dim(lambda y: _never(y, None), k.double(), levels=17)
    with pytest.raises(ValueError, match="levels"):
        bits_per_dim(torch.zeros(2), 2, levels=1)
    with pytest.raises(TypeError, match="VPSDE"):
        ddpm_elbo(lambda x, i: x, VESDE(), k, levels=17)
    with pytest.raises(ValueError, match="terms"):
        ddpm_elbo(lambda x, i: _never(x, i), VPSDE(beta_max=5.0, N=10), torch.tensor([[0, 1]]), levels=17, terms=10)
    with pytest.raises(ValueError, match="levels"):
        ddpm_elbo(lambda x, i: _never(x, i), VPSDE(beta_max=5.0, N=10), k, levels=17)


# ------------------------------------------------------------------------------------------
# bits/dim against directly computed discrete probabilities
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("levels", [256, 17])
@pytest.mark.parametrize("centered", [True, False], ids=["centred", "uncentred"])
def test_bits_per_dim_matches_exact_bin_probabilities(levels, centered):
    """Exact continuous density in place of the ODE: this checks the bpd arithmetic (the scaler's
    log2 a and the log2 L offset) and the importance-weighted dequantisation."""
    gm = unit_mixture(centered)
    n, D = 200, 2
    k = quantise(gm.sample(n, gen(12), dtype=F64), levels, centered)
    exact = -exact_discrete_logP(gm, k, levels, centered) / (D * math.log(2))

    # many dequantisation draws: the IW estimate converges to the exact discrete value
    J = 1024
    iw = dequantized_bits_per_dim(gm.log_prob, k, levels, centered, draws=J, generator=gen(13), dtype=F64)
    diff = iw - exact
    assert abs(float(diff.mean())) <= 4 * float(diff.std()) / math.sqrt(n) + 1e-4
    assert float(diff.abs().max()) < 0.05  # bits/dim; a wrong offset is off by >= 1

    # one draw: the usual dequantised bound (above the exact value in expectation)
    one = dequantized_bits_per_dim(gm.log_prob, k, levels, centered, draws=1, generator=gen(14), dtype=F64)
    d1 = one - exact
    assert float(d1.mean()) >= -3 * float(d1.std()) / math.sqrt(n)
    assert float(d1.abs().mean()) > float(diff.abs().mean())  # IW is sharper per sample

    # bits_per_dim is exactly the stated formula
    logp = gm.log_prob(torch.zeros(1, 2, dtype=F64))
    a = 2.0 if centered else 1.0
    torch.testing.assert_close(bits_per_dim(logp, D, levels, centered), -logp / (D * math.log(2)) - math.log2(a) + math.log2(levels))


@pytest.mark.parametrize("levels, centered, draws", [(256, True, 2), (17, False, 64)])
def test_ode_bpd_end_to_end(levels, centered, draws):
    """The whole path: dequantise -> PF-ODE (exact divergence, oracle score) -> bits/dim, against the
    exact bin probabilities of the oracle's p_eps."""
    sde, D, n = VPSDE(), 2, 24
    gm = unit_mixture(centered)
    k = quantise(gm.sample(n, gen(15), dtype=F64), levels, centered)
    m, s = sde.marginal_coef(torch.tensor([EPS], dtype=F64))
    exact = -exact_discrete_logP(gm, k, levels, centered, float(m), float(s)) / (D * math.log(2))
    res = evaluate_bpd(gm.score_fn(sde), sde, k, levels, centered, batch_size=12, draws=draws,
                       generator=gen(16), dtype=F64, divergence="exact")
    diff = res.bpd - exact
    # ODE error <= 1e-3 nats/dim -> 1.5e-3 bits/dim; IW error from the finite draws
    tol = 4 * float(diff.std()) / math.sqrt(n) + 1.5e-3
    assert abs(float(diff.mean())) <= tol, (float(diff.mean()), tol)
    assert float(diff.abs().max()) < 0.1
    assert res.nfe > 0 and math.isclose(res.mean, float(res.bpd.mean()))
    assert math.isclose(res.stderr, float(res.bpd.std()) / math.sqrt(n))


# ------------------------------------------------------------------------------------------
# DDPM ELBO
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("levels", [256, 17])
@pytest.mark.parametrize("centered", [True, False], ids=["centred", "uncentred"])
def test_discretized_decoder_is_normalised(levels, centered):
    """Sum over all levels of the decoder probability is one (edge bins open to +-inf)."""
    k = torch.arange(levels)[:, None]
    for mean_val, std in ((0.1, 0.03), (-0.97, 0.01), (0.99, 0.2), (5.0, 0.5)):
        mean = torch.full((levels, 1), mean_val, dtype=F64)
        logp = discretized_gaussian_log_likelihood(k, mean, torch.full((levels,), std, dtype=F64), levels, centered)
        assert torch.isfinite(logp).all()
        torch.testing.assert_close(torch.logsumexp(logp, 0), torch.zeros((), dtype=F64), atol=1e-10, rtol=0)


@pytest.mark.parametrize(
    "levels, centered, variance, narrow, n",
    [(256, True, "large", True, 600), (256, False, "small", True, 300), (17, False, "large", False, 200)],
)
def test_ddpm_elbo_bounds_exact_ode_nll(levels, centered, variance, narrow, n):
    """-ELBO of the oracle's exact eps >= exact PF-ODE NLL, both bits/dim (paired, 3 standard errors).

    The ELBO is a one-draw-per-term estimate (per-sample sd ~ 1 bit/dim at 256 levels) and its gap
    to the NLL at 256 levels is ~0.2 bit/dim, so each sample's ELBO is averaged over R = 5 runs."""
    sde = VPSDE()
    gm = unit_mixture(centered)
    if narrow:  # components a few 8-bit bins wide
        gm = GaussianMixture(gm.means, gm.stds * 0.375, gm.weights)
    k = quantise(gm.sample(n, gen(17), dtype=F64), levels, centered)
    R = 5
    elbo = evaluate_elbo(gm.ddpm_eps_fn(sde), sde, k.repeat(R, 1), levels, centered, batch_size=R * n,
                         variance=variance, generator=gen(18), dtype=F64)
    ode = evaluate_bpd(gm.score_fn(sde), sde, k, levels, centered, batch_size=n, generator=gen(19), dtype=F64,
                       divergence="exact")
    gap = elbo.bpd.reshape(R, n).mean(0) - ode.bpd
    assert float(gap.mean()) > 3 * float(gap.std()) / math.sqrt(n), (float(gap.mean()), float(gap.std()))
    assert elbo.nfe == sde.N


def test_ddpm_elbo_terms_and_sampled_estimate_is_unbiased():
    sde = VPSDE(beta_min=0.1, beta_max=20.0, N=100)
    gm = unit_mixture(True)
    levels, n = 256, 40
    k = quantise(gm.sample(n, gen(20), dtype=F64), levels, True)
    eps_fn = gm.ddpm_eps_fn(sde)
    full = [ddpm_elbo(eps_fn, sde, k, levels, True, generator=gen(100 + r), dtype=F64) for r in range(12)]
    samp = [ddpm_elbo(eps_fn, sde, k, levels, True, terms=8, generator=gen(200 + r), dtype=F64) for r in range(40)]
    # L_T is the closed-form KL(N(sqrt(ab) x0, 1 - ab) || N(0, 1)) per dim
    x0 = 2 * (k.double() + 0.5) / levels - 1
    ab = sde.alphas_cumprod[-1]
    q = torch.distributions.Normal(ab.sqrt() * x0, (1 - ab).sqrt())
    kl = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).sum(1) / (2 * math.log(2))
    torch.testing.assert_close(full[0].prior, kl)
    torch.testing.assert_close(full[0].bpd, full[0].prior + full[0].diffusion + full[0].decoder)
    assert full[0].nfe == sde.N and samp[0].nfe == 9
    fm = torch.stack([r.bpd.mean() for r in full])
    sm = torch.stack([r.bpd.mean() for r in samp])
    se = math.sqrt(float(fm.var()) / len(fm) + float(sm.var()) / len(sm))
    assert abs(float(fm.mean() - sm.mean())) <= 4 * se, (float(fm.mean()), float(sm.mean()), se)
    # both variances are valid bounds; "small" sigma^2 = beta~ has no variance-mismatch term
    small = ddpm_elbo(eps_fn, sde, k, levels, True, variance="small", generator=gen(300), dtype=F64)
    assert torch.isfinite(small.bpd).all()


def test_evaluate_accepts_iterables_of_labelled_batches():
    """A DataLoader-like iterable of (batch, label) gives the same numbers as the tensor split into batches."""
    sde, levels = VPSDE(), 17
    gm = unit_mixture(False)
    k = quantise(gm.sample(12, gen(21), dtype=F64), levels, False)
    kw = dict(levels=levels, centered=False, dtype=F64, divergence="exact")
    a = evaluate_bpd(gm.score_fn(sde), sde, k, batch_size=5, generator=gen(22), **kw)
    loader = [(b, torch.zeros(len(b))) for b in torch.split(k, 5)]
    b = evaluate_bpd(gm.score_fn(sde), sde, loader, generator=gen(22), progress=True, **kw)
    assert torch.equal(a.bpd, b.bpd) and a.bpd.shape == (12,) and a.nfe == b.nfe
    e = evaluate_elbo(gm.ddpm_eps_fn(VPSDE(N=50)), VPSDE(N=50), loader, levels, False, generator=gen(23), dtype=F64)
    assert e.bpd.shape == (12,) and e.nfe == 3 * 50 and math.isfinite(e.mean)


def test_elbo_names_stay_importable_from_likelihood():
    """The DDPM ELBO lives in ``scoresde.elbo``; ``scoresde.likelihood`` and the package re-export the same objects."""
    for name in ("ELBOResult", "ddpm_elbo", "evaluate_elbo", "discretized_gaussian_log_likelihood"):
        assert getattr(scoresde.likelihood, name) is getattr(scoresde.elbo, name)
        assert name in scoresde.likelihood.__all__ and name in scoresde.elbo.__all__
    assert scoresde.ddpm_elbo is ddpm_elbo and scoresde.evaluate_elbo is evaluate_elbo


def test_evaluate_elbo_of_a_network_keeps_no_autograd_graph():
    """Reported: the ELBO of a conv net over 1000 terms on 300 digits grew to 18 GB (every term's graph was kept)."""
    from scoresde.model import ScoreModel
    from scoresde.nets import MLPScoreNet

    sde = VPSDE(N=50)
    model = ScoreModel(MLPScoreNet(4, hidden=8, depth=1), sde, continuous=False)
    k = torch.randint(0, 17, (6, 4))
    res = evaluate_elbo(model.ddpm_eps_fn(), sde, k, levels=17, centered=True, batch_size=6, generator=gen(1))
    assert not res.bpd.requires_grad and res.bpd.grad_fn is None and res.nfe == 50
