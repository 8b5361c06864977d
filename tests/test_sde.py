"""SDE library against closed forms, the moment ODEs and a Monte-Carlo simulation of the forward SDE."""

import math

import pytest
import torch

from scoresde import VESDE, VPSDE, GaussianMixture, SubVPSDE
from scoresde.sde import as_time

DT = torch.float64


def all_sdes():
    return {
        "vp": VPSDE(),
        "vp_cosine": VPSDE(schedule="cosine"),
        "subvp": SubVPSDE(),
        "ve": VESDE(),
    }


SDE_NAMES = list(all_sdes())


@pytest.fixture(params=SDE_NAMES)
def sde(request):
    return all_sdes()[request.param]


# --- closed forms ------------------------------------------------------------------


def test_vp_discrete_betas_are_ddpm():
    sde = VPSDE()
    ref = torch.linspace(1e-4, 0.02, 1000, dtype=DT)
    assert sde.discrete_betas.shape == (1000,)
    assert torch.allclose(sde.discrete_betas, ref, atol=1e-6, rtol=0)
    ab = torch.cumprod(1 - ref, 0)
    assert torch.allclose(sde.alphas, 1 - ref, atol=1e-6, rtol=0)
    assert torch.allclose(sde.alphas_cumprod, ab, atol=1e-6, rtol=0)


def test_subvp_variance_below_vp():
    t = torch.linspace(0, 1, 2001, dtype=DT)
    _, s_vp = VPSDE().marginal_coef(t)
    m_sub, s_sub = SubVPSDE().marginal_coef(t)
    m_vp, _ = VPSDE().marginal_coef(t)
    assert torch.equal(m_sub, m_vp)
    assert bool((s_sub**2 <= s_vp**2 + 1e-15).all())
    assert bool((s_sub[1:] ** 2 < s_vp[1:] ** 2).all())


def test_ve_std_closed_form():
    sde = VESDE(sigma_min=0.01, sigma_max=50.0)
    t = torch.linspace(0, 1, 101, dtype=DT)
    x0 = torch.randn(101, 3, dtype=DT)
    mean, std = sde.marginal_prob(x0, t)
    assert torch.equal(mean, x0)
    assert torch.allclose(std, 0.01 * (50.0 / 0.01) ** t, rtol=1e-12)
    assert sde.prior_std == 50.0
    assert torch.allclose(sde.discrete_sigmas[[0, -1]], torch.tensor([0.01, 50.0], dtype=DT))


def test_vp_linear_closed_form():
    sde = VPSDE(beta_min=0.1, beta_max=20.0)
    t = torch.linspace(0, 1, 11, dtype=DT)
    c = -0.25 * t**2 * (20.0 - 0.1) - 0.5 * t * 0.1
    m, s = sde.marginal_coef(t)
    assert torch.allclose(m, torch.exp(c), rtol=1e-13)
    assert torch.allclose(s, torch.sqrt(1 - torch.exp(2 * c)), rtol=1e-12, atol=1e-15)


def test_moment_odes_match_drift_and_diffusion(sde):
    """For dx = f(t) x dt + g dw: dm/dt = f m and d(s^2)/dt = 2 f s^2 + g^2 (checked with autograd)."""
    t = torch.linspace(0.01, 0.99, 50, dtype=DT, requires_grad=True)
    m, s = sde.marginal_coef(t)
    m = m + 0.0 * t  # VE's m(t) = 1 is a constant with no graph
    dm = torch.autograd.grad(m.sum(), t, retain_graph=True)[0]
    dv = torch.autograd.grad((s**2).sum(), t)[0]
    x = torch.ones(50, 1, dtype=DT)
    drift, g = sde.sde(x, t.detach())
    f = drift[:, 0]  # drift coefficient, since x = 1
    assert torch.allclose(dm, f * m.detach(), rtol=1e-9, atol=1e-12)
    assert torch.allclose(dv, 2 * f * s.detach() ** 2 + g**2, rtol=1e-8, atol=1e-12)


def test_cosine_schedule_matches_nichol_dhariwal():
    sde = VPSDE(schedule="cosine", N=1000)
    s = 0.008
    i = torch.arange(1001, dtype=DT) / 1000
    f = torch.cos((i + s) / (1 + s) * math.pi / 2) ** 2
    ab = f / f[0]
    betas = torch.clamp(1 - ab[1:] / ab[:-1], max=0.999)
    assert torch.allclose(sde.discrete_betas, betas, atol=1e-12)
    assert float(sde.discrete_betas.max()) <= 0.999
    # continuous marginal equals the cosine alpha_bar wherever beta is not clipped
    t = torch.linspace(0, 0.999, 500, dtype=DT)
    m, _ = sde.marginal_coef(t)
    f_t = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    assert torch.allclose(m**2, f_t / f[0], rtol=1e-10, atol=1e-14)
    # beta(t) = pi/(1+s) tan(phi(t)) below the clip, and is capped above it
    tt = torch.tensor([0.2, 0.7], dtype=DT)
    assert torch.allclose(sde.beta(tt), math.pi / (1 + s) * torch.tan((tt + s) / (1 + s) * math.pi / 2))
    assert float(sde.beta(torch.tensor(1.0, dtype=DT))) == pytest.approx(-1000 * math.log(1 - 0.999))
    assert torch.isfinite(torch.stack(sde.marginal_coef(torch.tensor([0.0, 1.0], dtype=DT)))).all()


def test_log_snr_inverse(sde):
    t = torch.linspace(0.001, 0.999, 37, dtype=DT)
    lam = sde.log_snr(t)
    assert bool((lam[1:] < lam[:-1]).all())
    assert torch.allclose(sde.t_from_log_snr(lam), t, atol=1e-9)


# --- prior -------------------------------------------------------------------------


def test_prior_logp_matches_torch_distributions(sde):
    g = torch.Generator().manual_seed(0)
    z = sde.prior_sampling((7, 3, 4, 4), generator=g, dtype=DT)
    assert z.shape == (7, 3, 4, 4)
    ref = torch.distributions.Normal(torch.zeros((), dtype=DT), sde.prior_std).log_prob(z).reshape(7, -1).sum(1)
    lp = sde.prior_logp(z)
    assert lp.shape == (7,)
    assert torch.allclose(lp, ref, rtol=1e-12)
    g2 = torch.Generator().manual_seed(0)
    assert torch.equal(sde.prior_sampling((7, 3, 4, 4), generator=g2, dtype=DT), z)


def test_prior_sample_std():
    z = VESDE(sigma_max=50.0).prior_sampling((20000, 1), generator=torch.Generator().manual_seed(1), dtype=DT)
    # std of the sample std of n normals is sigma / sqrt(2n)
    assert abs(float(z.std()) - 50.0) < 4 * 50.0 / math.sqrt(2 * 20000)


# --- reverse-time SDE / probability-flow ODE --------------------------------------------


def test_reverse_drift_and_probability_flow(sde):
    gm = GaussianMixture(torch.tensor([[1.0, -1.0], [-2.0, 0.5]], dtype=DT), [0.3, 0.6], [0.4, 0.6])
    score_fn = gm.score_fn(sde)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(16, 2, generator=g, dtype=DT)
    t = torch.rand(16, generator=g, dtype=DT) * 0.98 + 0.01
    f, gt = sde.sde(x, t)
    s = score_fn(x, t)
    rd, rg = sde.reverse(score_fn).sde(x, t)
    assert torch.allclose(rd, f - gt[:, None] ** 2 * s, rtol=1e-12, atol=1e-12)
    assert torch.equal(rg, gt)
    od, og = sde.reverse(score_fn, probability_flow=True).sde(x, t)
    assert torch.allclose(od, f - 0.5 * gt[:, None] ** 2 * s, rtol=1e-12, atol=1e-12)
    assert torch.equal(og, torch.zeros_like(gt))
    # discretised reverse: f_rev = f - G^2 s (SDE) or f - G^2 s / 2 (ODE)
    fd, Gd = sde.discretize(x, t)
    rfd, rGd = sde.reverse(score_fn).discretize(x, t)
    assert torch.allclose(rfd, fd - Gd[:, None] ** 2 * s, atol=1e-12)
    assert torch.equal(rGd, Gd)
    ofd, oGd = sde.reverse(score_fn, probability_flow=True).discretize(x, t)
    assert torch.allclose(ofd, fd - 0.5 * Gd[:, None] ** 2 * s, atol=1e-12)
    assert torch.equal(oGd, torch.zeros_like(Gd))


def test_vp_discretize_is_ddpm_step():
    sde = VPSDE()
    x = torch.randn(3, 5, dtype=DT)
    i = torch.tensor([0, 500, 999])
    t = i.to(DT) / 999
    f, G = sde.discretize(x, t)
    beta = torch.linspace(1e-4, 0.02, 1000, dtype=DT)[i]
    assert torch.allclose(x + f, torch.sqrt(1 - beta)[:, None] * x)
    assert torch.allclose(G, torch.sqrt(beta))


def test_ve_discretize_is_smld_step():
    sde = VESDE(N=10)
    x = torch.randn(3, 2, dtype=DT)
    i = torch.tensor([0, 4, 9])
    f, G = sde.discretize(x, i.to(DT) / 9)
    sig = sde.discrete_sigmas
    assert torch.equal(f, torch.zeros_like(x))
    assert torch.allclose(G, torch.stack([sig[0], torch.sqrt(sig[4] ** 2 - sig[3] ** 2), torch.sqrt(sig[9] ** 2 - sig[8] ** 2)]))


def test_subvp_default_discretize_is_euler_maruyama():
    sde = SubVPSDE(N=100)
    x = torch.randn(4, 2, dtype=DT)
    t = torch.full((4,), 0.3, dtype=DT)
    f, G = sde.discretize(x, t)
    drift, g = sde.sde(x, t)
    assert torch.allclose(f, drift / 100) and torch.allclose(G, g / 10)


# --- Monte-Carlo check of marginal_prob ---------------------------------------------------


MC_TIMES = {"vp": [0.05, 0.3, 0.6, 1.0], "vp_cosine": [0.05, 0.3, 0.6, 0.99], "subvp": [0.05, 0.3, 0.6, 1.0], "ve": [0.05, 0.3, 0.6, 1.0]}


@pytest.mark.parametrize("name", SDE_NAMES)
def test_marginal_prob_matches_euler_maruyama_simulation(name):
    """Simulate dx = f dt + g dw with fine Euler–Maruyama from a fixed x0 and compare the sample mean and
    variance at several times with marginal_prob, with z-scores from the sample size (n paths)."""
    sde = all_sdes()[name]
    n, n_steps, x0 = 20000, 4000, 1.5
    gen = torch.Generator().manual_seed(1234)
    x = torch.full((n, 1), x0, dtype=DT)
    if name == "ve":  # VE's p_0 convention: data convolved with N(0, sigma_min^2)
        x = x + sde.sigma_min * torch.randn(n, 1, generator=gen, dtype=DT)
    t_end = max(MC_TIMES[name])
    dt = t_end / n_steps
    checks = {round(tc / dt): tc for tc in MC_TIMES[name]}
    for k in range(1, n_steps + 1):
        t = torch.full((n,), (k - 1) * dt, dtype=DT)
        drift, g = sde.sde(x, t)
        x = x + drift * dt + g[:, None] * math.sqrt(dt) * torch.randn(n, 1, generator=gen, dtype=DT)
        if k in checks:
            tc = torch.full((1,), checks[k], dtype=DT)
            mean, std = sde.marginal_prob(torch.full((1, 1), x0, dtype=DT), tc)
            mu, var = float(mean), float(std) ** 2
            z_mean = (float(x.mean()) - mu) / math.sqrt(var / n)
            z_var = (float(x.var()) - var) / (var * math.sqrt(2 / (n - 1)))
            # 5 sigma for the sampling error; Euler-Maruyama's O(dt) bias is far below it at this step size
            assert abs(z_mean) < 5, (name, checks[k], z_mean)
            assert abs(z_var) < 5, (name, checks[k], z_var)


# --- bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: VPSDE(beta_min=20.0, beta_max=0.1), "beta_min"),
        (lambda: VPSDE(beta_min=1.0, beta_max=1.0), "beta_min"),
        (lambda: VPSDE(beta_min=-0.1), "beta_min"),
        (lambda: VPSDE(N=0), "N"),
        (lambda: VPSDE(N=2.5), "N"),
        (lambda: VPSDE(beta_max=20.0, N=20), "N must be > beta_max"),
        (lambda: VPSDE(schedule="quadratic"), "schedule"),
        (lambda: SubVPSDE(beta_min=5.0, beta_max=1.0), "beta_min"),
        (lambda: SubVPSDE(N=-3), "N"),
        (lambda: VESDE(sigma_min=50.0, sigma_max=0.01), "sigma_min"),
        (lambda: VESDE(sigma_min=0.0), "sigma_min"),
        (lambda: VESDE(N=0), "N"),
    ],
)
def test_bad_arguments_raise_value_error_naming_field(make, field):
    with pytest.raises(ValueError, match=field):
        make()


def test_time_outside_range_or_wrong_shape_raises():
    sde = VPSDE()
    x = torch.zeros(4, 2)
    with pytest.raises(ValueError, match=r"\[0, T\]"):
        sde.marginal_prob(x, torch.tensor([0.1, 0.2, 1.5, 0.3]))
    with pytest.raises(ValueError, match="shape"):
        sde.sde(x, torch.zeros(3))
    assert as_time(0.5, x).shape == (4,)
