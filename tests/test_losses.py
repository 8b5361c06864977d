"""Losses: hand-computed values with the same draws, unbiased importance sampling of t against a
quadrature of the exact expectation, and the discrete DDPM / continuous VP bridge."""

import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats
from torch import nn

from scoresde import VESDE, VPSDE, GaussianMixture, SubVPSDE
from scoresde.losses import (
    ddpm_loss,
    ddpm_per_sample,
    dsm_loss,
    dsm_per_sample,
    get_loss_fn,
    sample_importance_t,
    smld_loss,
)
from scoresde.model import ScoreModel
from scoresde.nets import MLPScoreNet

DT = torch.float64
B0, B1, SMIN, SMAX = 0.1, 20.0, 0.01, 50.0


class AffineNet(nn.Module):
    """A tiny deterministic net: ``out = a x + c t_in`` (elementwise, any shape)."""

    def __init__(self, a=0.7, c=1e-3):
        super().__init__()
        self.a, self.c = a, c

    def forward(self, x, t_in):
        return self.a * x + self.c * t_in.reshape(-1, *[1] * (x.dim() - 1))


# --- the SDE coefficients, written out by hand (FACTS.md table) -----------------------------
def hand_coefs(kind, t):
    """(m, s, g^2, net time) for the default VP / sub-VP / VE SDEs."""
    if kind == "ve":
        s = SMIN * (SMAX / SMIN) ** t
        return torch.ones_like(t), s, s**2 * 2 * math.log(SMAX / SMIN), s
    c = -0.25 * t**2 * (B1 - B0) - 0.5 * t * B0
    beta = B0 + t * (B1 - B0)
    if kind == "vp":
        return torch.exp(c), torch.sqrt(1 - torch.exp(2 * c)), beta, 999 * t
    return torch.exp(c), 1 - torch.exp(2 * c), beta * (1 - torch.exp(-2 * B0 * t - (B1 - B0) * t**2)), 999 * t


SDES = {"vp": VPSDE, "subvp": SubVPSDE, "ve": VESDE}
PARAM = {"vp": "eps", "subvp": "score", "ve": "sigma_scaled"}


def hand_score(kind, param, out, x, m, s):
    return {"eps": -out / s, "score": out, "sigma_scaled": out / s, "x0": (m * out - x) / s**2}[param]


def bcast(v, x):
    return v.reshape(-1, *[1] * (x.dim() - 1))


@pytest.mark.parametrize("kind,param", [("vp", "eps"), ("vp", "x0"), ("subvp", "score"), ("ve", "sigma_scaled")])
@pytest.mark.parametrize("weighting", ["default", "likelihood"])
@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_dsm_loss_equals_hand_computation(kind, param, weighting, reduce):
    x0 = torch.randn(6, 2, 3, dtype=DT, generator=torch.Generator().manual_seed(0))
    net = AffineNet(0.7, 1e-3)
    model = ScoreModel(net, SDES[kind](), param)
    loss = dsm_loss(model, x0, torch.Generator().manual_seed(5), eps=1e-5, weighting=weighting, reduce=reduce)
    # the same draws by hand: t ~ U(eps, 1), then z
    g = torch.Generator().manual_seed(5)
    t = 1e-5 + (1 - 1e-5) * torch.rand(6, generator=g, dtype=DT)
    z = torch.randn(x0.shape, generator=g, dtype=DT)
    m, s, g2, t_in = hand_coefs(kind, t)
    m, s = bcast(m, x0), bcast(s, x0)
    x = m * x0 + s * z
    score = hand_score(kind, param, net(x, t_in), x, m, s)
    lam = s.flatten() ** 2 if weighting == "default" else g2
    sq = (score + z / s) ** 2
    per = sq.flatten(1).mean(1) if reduce == "mean" else sq.flatten(1).sum(1)
    torch.testing.assert_close(loss, (lam * per).mean(), rtol=1e-10, atol=0)


@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_ddpm_loss_equals_hand_computation(reduce):
    x0 = torch.randn(8, 1, 2, 2, dtype=DT, generator=torch.Generator().manual_seed(0))
    net = AffineNet(0.6, 2e-4)
    model = ScoreModel(net, VPSDE(), "eps", continuous=False)
    loss = ddpm_loss(model, x0, torch.Generator().manual_seed(3), reduce=reduce)
    g = torch.Generator().manual_seed(3)
    i = torch.randint(0, 1000, (8,), generator=g)
    z = torch.randn(x0.shape, generator=g, dtype=DT)
    ab = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=DT), 0)[i]
    x = bcast(ab.sqrt(), x0) * x0 + bcast((1 - ab).sqrt(), x0) * z
    sq = (net(x, i.to(DT)) - z) ** 2  # the discrete net sees the step index
    per = sq.flatten(1).mean(1) if reduce == "mean" else sq.flatten(1).sum(1)
    torch.testing.assert_close(loss, per.mean(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("continuous", [False, True])
def test_smld_loss_equals_hand_computation(continuous):
    x0 = torch.randn(8, 3, dtype=DT, generator=torch.Generator().manual_seed(0))
    net = AffineNet(0.3, 0.01)
    model = ScoreModel(net, VESDE(), "sigma_scaled", continuous=continuous)
    loss = smld_loss(model, x0, torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(4)
    i = torch.randint(0, 1000, (8,), generator=g)
    z = torch.randn(x0.shape, generator=g, dtype=DT)
    sigma = SMIN * (SMAX / SMIN) ** (i.to(DT) / 999)  # the net sees sigma_i in both modes
    x = x0 + sigma[:, None] * z
    score = net(x, sigma) / sigma[:, None]
    per = sigma**2 * ((score + z / sigma[:, None]) ** 2).mean(1)
    torch.testing.assert_close(loss, per.mean(), rtol=1e-10, atol=0)


# --- importance sampling of t ---------------------------------------------------------------------
def test_importance_proposal_matches_analytic_density():
    """VP: g^2/s^2 = d/dt log(s^2/m^2), so the CDF is analytic; VE: g^2/s^2 is constant (uniform t)."""
    eps, n = 1e-5, 20000
    for kind in ("vp", "ve"):
        sde = SDES[kind]()
        t, q = sample_importance_t(sde, n, torch.Generator().manual_seed(11), eps)
        assert t.min() >= eps and t.max() <= 1.0
        if kind == "vp":
            L = lambda u: np.log(np.expm1(0.5 * u**2 * (B1 - B0) + u * B0))  # noqa: E731  log(s^2/m^2)
            cdf = lambda u: (L(u) - L(eps)) / (L(1.0) - L(eps))  # noqa: E731
            _, s, g2, _ = hand_coefs("vp", t)
            q_exact = g2 / s**2 / (L(1.0) - L(eps))
        else:
            cdf = lambda u: (u - eps) / (1 - eps)  # noqa: E731
            q_exact = torch.full_like(t, 1 / (1 - eps))
        assert stats.kstest(t.numpy(), cdf).pvalue > 1e-3
        # the tabulated density is piecewise constant in u = log t on 2001 points: relative error
        # <= du / 2 * max |d log(t g^2/s^2) / du|, du = log(1/eps) / 2000; that slope is <= 2 (VP, at t = 1)
        du = math.log(1 / eps) / 2000
        torch.testing.assert_close(q, q_exact, rtol=1.05 * du, atol=0)


def expected_likelihood_loss(kind, a, q0, eps):
    """(1/(1-eps)) int_eps^1 (g/s)^2 E_z mean_d (a x_t - z)^2 dt for eps_hat = a x_t, x0 with mean square q0."""

    def integrand(u):  # in u = log t
        t = torch.tensor(math.exp(u), dtype=DT)
        m, s, g2, _ = hand_coefs(kind, t)
        return float(g2 / s**2 * (a**2 * m**2 * q0 + (a * s - 1) ** 2) * t)

    val, err = integrate.quad(integrand, math.log(eps), 0.0, limit=200, epsabs=0, epsrel=1e-10)
    return val / (1 - eps)


@pytest.mark.parametrize("kind", ["vp", "subvp", "ve"])
def test_importance_sampling_is_unbiased_and_reduces_variance(kind):
    eps, a = 1e-5, 0.9
    x0 = torch.full((2000, 2), 0.8, dtype=DT)
    model = ScoreModel(AffineNet(a, 0.0), SDES[kind](), "eps")
    truth = expected_likelihood_loss(kind, a, 0.64, eps)
    results = {}
    for IS in (True, False):
        batch_means = torch.stack([
            dsm_loss(model, x0, torch.Generator().manual_seed(100 + k), eps, "likelihood", IS) for k in range(20)
        ])
        mean, se = batch_means.mean().item(), batch_means.std().item() / math.sqrt(20)
        assert abs(mean - truth) < 5 * se + 1e-9 * truth, (IS, mean, truth, se)
        results[IS] = batch_means.std().item()
    if kind != "ve":  # VE: g^2/s^2 is constant, the proposal is uniform
        assert results[True] < results[False] / 3


# --- the discrete / continuous bridge -------------------------------------------------------------
class OracleEpsNet(nn.Module):
    """Exact E[eps | x_t] of a Gaussian mixture for the continuous VP SDE (net time 999 t)."""

    def __init__(self, gmm, sde):
        super().__init__()
        self.gmm, self.sde = gmm, sde

    def forward(self, x, t_in):
        t = t_in / 999
        _, s = self.sde.marginal_coef(t)
        return -s[:, None] * self.gmm.score(x, t, self.sde)


@pytest.mark.parametrize("which", ["affine", "mlp", "oracle"])
def test_ddpm_loss_equals_continuous_vp_loss_at_matched_times(which):
    sde = VPSDE()
    gmm = GaussianMixture(torch.tensor([[-1.0, 0.5], [1.0, -0.5]], dtype=DT), torch.tensor([0.3, 0.6], dtype=DT))
    net = {"affine": AffineNet(0.5, 1e-3), "mlp": MLPScoreNet(2, hidden=32, depth=2, seed=1).double(),
           "oracle": OracleEpsNet(gmm, sde)}[which]
    if which == "mlp":  # give the zero-initialised output layers weights so the net is not ~0
        with torch.no_grad():
            for p in net.parameters():
                p.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(p.numel()))
    model = ScoreModel(net, sde, "eps")
    g = torch.Generator().manual_seed(7)
    B = 256
    x0 = gmm.sample(B, generator=g)
    i = torch.cat([torch.tensor([0, 995]), torch.randint(0, 996, (B - 2,), generator=g)])  # steps >= 996 lie beyond T
    z = torch.randn(B, 2, generator=g, dtype=DT)
    ab = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=DT), 0)[i]
    # t_i from the log-SNR lambda = 1/2 log(ab / (1 - ab)), inverting lambda(t) = -1/2 log(e^{-2c(t)} - 1)
    lam = 0.5 * torch.log(ab / (1 - ab))
    k = torch.log1p(torch.exp(-2 * lam))  # = -2 c(t) = t^2 (B1 - B0) / 2 + t B0
    t = (-B0 + torch.sqrt(B0**2 + 2 * (B1 - B0) * k)) / (B1 - B0)
    m, s, _, _ = hand_coefs("vp", t)
    torch.testing.assert_close(m, ab.sqrt(), rtol=1e-12, atol=0)
    torch.testing.assert_close(s, (1 - ab).sqrt(), rtol=1e-10, atol=0)
    discrete = ddpm_per_sample(model, x0, i, z)
    continuous = dsm_per_sample(model, x0, t, z, weighting="default")
    torch.testing.assert_close(discrete, continuous, rtol=1e-9, atol=1e-12)


def test_oracle_minimises_dsm_loss_with_common_random_numbers():
    sde = VPSDE()
    gmm = GaussianMixture(torch.tensor([[-1.0, 0.5], [1.0, -0.5]], dtype=DT), torch.tensor([0.3, 0.6], dtype=DT))
    x0 = gmm.sample(4000, generator=torch.Generator().manual_seed(0))
    oracle = ScoreModel(OracleEpsNet(gmm, sde), sde, "eps")

    class Scaled(nn.Module):
        def __init__(self, net, k):
            super().__init__()
            self.net, self.k = net, k

        def forward(self, x, t_in):
            return self.k * self.net(x, t_in)

    best = dsm_loss(oracle, x0, torch.Generator().manual_seed(1))
    for k in (0.9, 1.1):
        assert dsm_loss(ScoreModel(Scaled(oracle.net, k), sde, "eps"), x0, torch.Generator().manual_seed(1)) > best


# --- factory, determinism, validation ----------------------------------------------------------------
def test_get_loss_fn_dispatch_and_determinism():
    x0 = torch.randn(16, 2, dtype=DT, generator=torch.Generator().manual_seed(0))
    vp_c = ScoreModel(AffineNet(), VPSDE(), "eps")
    vp_d = ScoreModel(AffineNet(), VPSDE(), "eps", continuous=False)
    ve_d = ScoreModel(AffineNet(), VESDE(), "sigma_scaled", continuous=False)
    gen = lambda: torch.Generator().manual_seed(9)  # noqa: E731
    f = get_loss_fn(VPSDE(), weighting="likelihood", importance_sampling=True, reduce="sum", eps=1e-3)
    assert f(vp_c, x0, gen()) == dsm_loss(vp_c, x0, gen(), 1e-3, "likelihood", True, "sum")
    assert get_loss_fn(VPSDE(), continuous=False)(vp_d, x0, gen()) == ddpm_loss(vp_d, x0, gen())
    assert get_loss_fn(VESDE(), continuous=False)(ve_d, x0, gen()) == smld_loss(ve_d, x0, gen())
    # same seed, same loss; another seed, another loss; sum = D * mean with the same draws
    a, b = dsm_loss(vp_c, x0, gen()), dsm_loss(vp_c, x0, torch.Generator().manual_seed(10))
    assert a == dsm_loss(vp_c, x0, gen()) and a != b
    torch.testing.assert_close(dsm_loss(vp_c, x0, gen(), reduce="sum"), 2 * a)


def test_losses_backpropagate_through_a_network():
    model = ScoreModel(MLPScoreNet(2, hidden=16, depth=1), VPSDE(), "eps")
    x0 = torch.randn(32, 2, generator=torch.Generator().manual_seed(0))
    loss = dsm_loss(model, x0, torch.Generator().manual_seed(1), weighting="likelihood", importance_sampling=True)
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(gr is not None and torch.isfinite(gr).all() for gr in grads)
    assert loss.dtype == torch.float32


def test_validation():
    vp = ScoreModel(AffineNet(), VPSDE(), "eps")
    x0 = torch.zeros(4, 2)
    with pytest.raises(ValueError, match="weighting"):
        dsm_loss(vp, x0, weighting="uniform")
    with pytest.raises(ValueError, match="reduce"):
        dsm_loss(vp, x0, reduce="none")
    with pytest.raises(ValueError, match="importance_sampling"):
        dsm_loss(vp, x0, importance_sampling=True)
    with pytest.raises(ValueError, match="eps"):
        dsm_loss(vp, x0, eps=0.0)
    with pytest.raises(ValueError, match="x0"):
        dsm_loss(vp, torch.zeros(4, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="continuous=True"):
        dsm_loss(ScoreModel(AffineNet(), VPSDE(), "eps", continuous=False), x0)
    with pytest.raises(TypeError, match="VESDE"):
        smld_loss(vp, x0)
    with pytest.raises(TypeError, match="VPSDE"):
        ddpm_loss(ScoreModel(AffineNet(), VESDE(), "sigma_scaled"), x0)
    with pytest.raises(ValueError, match="continuous=False"):
        get_loss_fn(SubVPSDE(), continuous=False)
    with pytest.raises(ValueError, match="continuous loss only"):
        get_loss_fn(VPSDE(), continuous=False, weighting="likelihood")
    with pytest.raises(ValueError, match="differs"):
        get_loss_fn(VPSDE(beta_max=10.0))(vp, x0)


def test_get_loss_fn_checks_options_once_not_per_step(monkeypatch):
    """The options are validated by get_loss_fn; its loss_fn re-checks only x0 (and a model the first time it sees it)."""
    import scoresde.losses as L

    x0 = torch.randn(8, 2, dtype=DT, generator=torch.Generator().manual_seed(0))
    cases = [
        (dict(weighting="likelihood", importance_sampling=True, reduce="sum", eps=1e-3), VPSDE(), {},
         lambda m, g: dsm_loss(m, x0, g, 1e-3, "likelihood", True, "sum")),
        (dict(continuous=False), VPSDE(), dict(continuous=False), lambda m, g: ddpm_loss(m, x0, g)),
        (dict(continuous=False, reduce="sum"), VESDE(), dict(continuous=False), lambda m, g: smld_loss(m, x0, g, "sum")),
    ]
    for kw, sde, mkw, public in cases:
        model = ScoreModel(AffineNet(), sde, "eps" if isinstance(sde, VPSDE) else "sigma_scaled", **mkw)
        f = get_loss_fn(sde, **kw)
        expected = [public(model, torch.Generator().manual_seed(s)) for s in range(3)]
        calls = []
        for name in ("_check_dsm_options", "check_choice", "_check_eps", "_check_model", "likelihood_importance_proposal"):
            def counted(*a, _n=name, _f=getattr(L, name), **k):
                calls.append(_n)
                return _f(*a, **k)
            monkeypatch.setattr(L, name, counted)
        got = [f(model, x0, torch.Generator().manual_seed(s)) for s in range(3)]
        monkeypatch.undo()
        assert calls == ["_check_model"]  # the first call only
        assert all(torch.equal(a, b) for a, b in zip(got, expected))  # bit-identical to the public losses
    # the returned function still rejects a wrong model or x0 on any call
    f = get_loss_fn(VPSDE(), continuous=False)
    with pytest.raises(TypeError, match="ScoreModel"):
        f(AffineNet(), x0)
    with pytest.raises(TypeError, match="VPSDE"):
        get_loss_fn(VESDE(), continuous=False)(ScoreModel(AffineNet(), VPSDE(), "eps", continuous=False), x0)
    with pytest.raises(ValueError, match="continuous=True"):
        get_loss_fn(VPSDE())(ScoreModel(AffineNet(), VPSDE(), "eps", continuous=False), x0)
    vp = ScoreModel(AffineNet(), VPSDE(), "eps", continuous=False)
    f(vp, x0)
    with pytest.raises(ValueError, match="x0"):
        f(vp, x0.long())
