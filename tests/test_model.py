"""ScoreModel: with an 'oracle net' (the exact Gaussian-mixture score written in each parameterisation)
the wrapper must give back the oracle's score, ε and posterior mean, in float64, for VP, sub-VP and VE,
continuous and discrete."""

import math

import pytest
import torch
from torch import nn

from scoresde import VESDE, VPSDE, GaussianMixture, SubVPSDE
from scoresde.model import ScoreModel
from scoresde.nets import MLPScoreNet

DT = torch.float64


def make_gmm():
    g = torch.Generator().manual_seed(0)
    means = 1.5 * torch.randn(3, 3, generator=g, dtype=DT)
    return GaussianMixture(means, torch.tensor([0.3, 0.5, 1.0], dtype=DT), torch.tensor([0.2, 0.3, 0.5], dtype=DT))


def vp_ab(sde, i):
    """DDPM alpha_bar_i by hand: prod_{j<=i} (1 - beta_j), beta = linspace(beta_min/N, beta_max/N, N)."""
    betas = torch.linspace(sde.beta_min / sde.N, sde.beta_max / sde.N, sde.N, dtype=DT)
    return torch.cumprod(1 - betas, 0)[i]


class OracleNet(nn.Module):
    """Outputs the exact mixture score at the network time ``t_in`` in the given parameterisation.

    Recovers the diffusion time from ``t_in`` with the inverse of the documented convention, computes
    ``(m, s)`` and the exact score independently of ScoreModel, and writes it as eps / score / sigma*score / x0.
    """

    def __init__(self, gmm, sde, parameterization, continuous):
        super().__init__()
        self.gmm, self.sde, self.p, self.continuous = gmm, sde, parameterization, continuous

    def forward(self, x, t_in):
        sde, gmm = self.sde, self.gmm
        if isinstance(sde, VESDE):  # t_in = sigma (continuous: sigma(t), discrete: sigma_i)
            t = (torch.log(t_in / sde.sigma_min) / math.log(sde.sigma_max / sde.sigma_min)).clamp(0, 1)
            m, s = torch.ones_like(t_in), t_in
            score = gmm.score(x, t, sde)
        elif self.continuous:  # t_in = 999 t
            t = t_in / 999.0
            m, s = sde.marginal_coef(t)
            score = gmm.score(x, t, sde)
        else:  # DDPM step i
            i = t_in.round().long()
            ab = vp_ab(sde, i).to(x.dtype)
            m, s = ab.sqrt(), (1 - ab).sqrt()
            score = -gmm.ddpm_eps(x, i, sde) / s.reshape(-1, *[1] * (x.dim() - 1))
        m = m.reshape(-1, *[1] * (x.dim() - 1))
        s = s.reshape(-1, *[1] * (x.dim() - 1))
        return {"eps": -s * score, "score": score, "sigma_scaled": s * score, "x0": (x + s**2 * score) / m}[self.p]


def posterior_mean(gmm, x, m, s):
    """E[x0 | x_t = x] for x_t = m x0 + s z by Bayes per component: mu_k + m sd_k^2 / v_k (x - m mu_k)."""
    xf = x.reshape(x.shape[0], -1)
    mu, sd, w = gmm.means, gmm.stds, gmm.weights
    v = m[:, None] ** 2 * sd[None] ** 2 + s[:, None] ** 2  # (B, K)
    diff = xf[:, None, :] - m[:, None, None] * mu[None]
    logj = torch.log(w)[None] - 0.5 * xf.shape[1] * torch.log(2 * math.pi * v) - 0.5 * diff.pow(2).sum(-1) / v
    r = torch.softmax(logj, 1)
    post = mu[None] + (m[:, None] * sd[None] ** 2 / v)[:, :, None] * diff
    return (r[:, :, None] * post).sum(1).reshape(x.shape)


def reference(gmm, sde, continuous, x, t):
    """Exact (m, s, score) at continuous t, or at the discrete level i = round(t (N-1)) for discrete models."""
    if continuous:
        m, s = sde.marginal_coef(t)
        return m, s, gmm.score(x, t, sde)
    i = torch.round(t * (sde.N - 1)).long()
    if isinstance(sde, VESDE):
        s = sde.sigma_min * (sde.sigma_max / sde.sigma_min) ** (i.to(DT) / (sde.N - 1))
        return torch.ones_like(s), s, gmm.score(x, i.to(DT) / (sde.N - 1), sde)
    ab = vp_ab(sde, i)
    s = (1 - ab).sqrt()
    return ab.sqrt(), s, -gmm.ddpm_eps(x, i, sde) / s.reshape(-1, *[1] * (x.dim() - 1))


CASES = [
    (VPSDE(), p, True) for p in ("eps", "score", "x0")
] + [
    (VPSDE(schedule="cosine"), "eps", True),
    *[(SubVPSDE(), p, True) for p in ("eps", "score", "x0")],
    *[(VESDE(), p, True) for p in ("sigma_scaled", "eps", "score", "x0")],
    *[(VPSDE(), p, False) for p in ("eps", "x0")],
    *[(VESDE(), p, False) for p in ("sigma_scaled", "score")],
]


def close(a, b, tol=1e-9):
    err = (a - b).abs().max().item()
    assert err <= tol * (1.0 + b.abs().max().item()), f"max error {err:.3e}"


@pytest.mark.parametrize("sde,param,continuous", CASES, ids=lambda v: repr(v) if not isinstance(v, bool) else str(v))
def test_oracle_net_reproduces_exact_score_eps_and_posterior_mean(sde, param, continuous):
    gmm = make_gmm()
    g = torch.Generator().manual_seed(1)
    B = 64
    t = torch.cat([torch.tensor([1e-3, 0.01, 0.5, 1.0], dtype=DT), torch.rand(B - 4, generator=g, dtype=DT)])
    x0 = gmm.sample(B, generator=g)
    m_c, s_c = sde.marginal_coef(t)
    x = m_c[:, None] * x0 + s_c[:, None] * torch.randn(B, 3, generator=g, dtype=DT)
    x = x.reshape(B, 3, 1, 1)  # image-shaped input: per-sample coefficients must broadcast
    model = ScoreModel(OracleNet(gmm, sde, param, continuous), sde, param, continuous)
    m, s, score = reference(gmm, sde, continuous, x, t)
    close(model.score_fn(x, t), score)
    close(model.eps_fn(x, t), -s.reshape(B, 1, 1, 1) * score)
    close(model.denoise_fn(x, t), posterior_mean(gmm, x, m, s))


def test_net_time_conventions():
    t = torch.tensor([0.0, 0.25, 0.5004, 1.0], dtype=DT)
    net = MLPScoreNet(2)
    vp, ve = VPSDE(), VESDE(sigma_min=0.01, sigma_max=50.0)
    torch.testing.assert_close(ScoreModel(net, vp).net_time(t), 999 * t)
    torch.testing.assert_close(ScoreModel(net, SubVPSDE()).net_time(t), 999 * t)
    torch.testing.assert_close(ScoreModel(net, ve, "sigma_scaled").net_time(t), 0.01 * 5000.0**t)
    torch.testing.assert_close(ScoreModel(net, vp, continuous=False).net_time(t), torch.tensor([0.0, 250.0, 500.0, 999.0], dtype=DT))
    i = torch.tensor([0, 250, 500, 999])
    torch.testing.assert_close(
        ScoreModel(net, ve, "sigma_scaled", continuous=False).net_time(t), 0.01 * 5000.0 ** (i.to(DT) / 999)
    )


def test_forward_is_raw_net_output_and_module_behaviour():
    net = MLPScoreNet(3, hidden=16, depth=1).double()
    model = ScoreModel(net, VESDE(), "sigma_scaled")
    x = torch.randn(4, 3, dtype=DT, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=DT)
    torch.testing.assert_close(model(x, t), net(x, model.sde.sigma(t)), rtol=0, atol=0)
    # a scalar time broadcasts to the batch
    torch.testing.assert_close(model.score_fn(x, 0.3), model.score_fn(x, torch.full((4,), 0.3, dtype=DT)))
    assert {n for n, _ in model.named_parameters()} == {"net." + n for n, _ in net.named_parameters()}
    with pytest.raises(ValueError, match=r"t must lie in \[0, T\]"):
        model.score_fn(x, torch.full((4,), 1.5, dtype=DT))
    with pytest.raises(ValueError, match="t must have shape"):
        model.score_fn(x, torch.zeros(3, dtype=DT))


@pytest.mark.parametrize("param,continuous,schedule", [("eps", True, "linear"), ("x0", True, "linear"),
                                                       ("eps", False, "linear"), ("eps", True, "cosine")])
def test_ddpm_eps_fn_matches_oracle_ddpm_eps(param, continuous, schedule):
    sde = VPSDE(schedule=schedule)
    gmm = make_gmm()
    g = torch.Generator().manual_seed(2)
    B = 64
    i_max = 996 if schedule == "linear" else 999  # later steps lie beyond T (documented in ddpm_time)
    i = torch.cat([torch.tensor([0, 1, i_max - 1]), torch.randint(0, i_max, (B - 3,), generator=g)])
    ab = sde.alphas_cumprod[i]
    x = ab.sqrt()[:, None] * gmm.sample(B, generator=g) + (1 - ab).sqrt()[:, None] * torch.randn(B, 3, generator=g, dtype=DT)
    model = ScoreModel(OracleNet(gmm, sde, param, continuous), sde, param, continuous)
    close(model.ddpm_eps_fn()(x, i), gmm.ddpm_eps(x, i, sde), tol=1e-8)
    if continuous:  # the matched time reproduces the DDPM kernel
        m, s = sde.marginal_coef(model.ddpm_time(i))
        close(m, ab.sqrt(), 1e-12)
        close(s, (1 - ab).sqrt(), 1e-12)


@pytest.mark.parametrize("schedule,n_clamped", [("linear", 4), ("cosine", 1)])
def test_ddpm_time_clamps_last_steps_to_T(schedule, n_clamped):
    model = ScoreModel(MLPScoreNet(2), VPSDE(schedule=schedule))
    t = model.ddpm_time(torch.arange(990, 1000))
    assert torch.all(t[-n_clamped:] == 1.0) and torch.all(t[:-n_clamped] < 1.0)
    assert torch.all(t[1:] > t[:-1]) if n_clamped == 1 else torch.all(t[1:] >= t[:-1])


def test_validation():
    net = MLPScoreNet(2)
    with pytest.raises(ValueError, match="parameterization must be one of"):
        ScoreModel(net, VPSDE(), "v")
    with pytest.raises(ValueError, match="sigma_scaled"):
        ScoreModel(net, VPSDE(), "sigma_scaled")
    with pytest.raises(ValueError, match="continuous=False"):
        ScoreModel(net, SubVPSDE(), "eps", continuous=False)
    with pytest.raises(TypeError, match="net"):
        ScoreModel(lambda x, t: x, VPSDE())
    with pytest.raises(TypeError, match="sde"):
        ScoreModel(net, "vp")
    with pytest.raises(TypeError, match="continuous"):
        ScoreModel(net, VPSDE(), continuous=1)
    with pytest.raises(TypeError, match="VPSDE"):
        ScoreModel(net, VESDE(), "sigma_scaled").ddpm_eps_fn()
    eps = ScoreModel(net, VPSDE()).ddpm_eps_fn()
    x = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="integer tensor"):
        eps(x, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"\[0, N-1\]"):
        eps(x, torch.tensor([0, 1000]))


class ConstNet(nn.Module):
    """``net(x, t_in) = 1`` (like ``x``): with ``parameterization="score"`` the model's ``eps`` is ``-s``."""

    def forward(self, x, t_in):
        return torch.ones_like(x)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_discrete_vp_coefficients_are_exact_in_float32(schedule):
    """``(m, s) = (sqrt(abar_i), sqrt(1 - abar_i))`` of a float32 discrete VP model equal the float64 values
    rounded once to float32 (relative error <= 1e-7), at the first steps too, where ``1 - abar_i`` is small:
    forming ``1 - abar_i`` in float32 would cost ~1e-4 relative error in ``s`` (i = 0..5)."""
    sde = VPSDE(schedule=schedule)
    i = torch.arange(6)
    ab = sde.alphas_cumprod[i]  # float64
    m_ref, s_ref = ab.sqrt(), (1 - ab).sqrt()
    model = ScoreModel(ConstNet(), sde, "score", continuous=False)
    t = (i.to(DT) * sde.T / (sde.N - 1)).float()
    m, s = model.coefs(t)
    assert m.dtype == s.dtype == torch.float32
    rel = lambda a, b: ((a.double() - b) / b).abs().max().item()  # noqa: E731
    assert rel(m, m_ref) <= 1e-7 and rel(s, s_ref) <= 1e-7, (rel(m, m_ref), rel(s, s_ref))
    x = torch.zeros(6, 2)
    # the same s in the model's eps (eps = -s score) at t and at the integer steps of ddpm_eps_fn
    eps_t, eps_i = model.eps_fn(x, t), model.ddpm_eps_fn()(x, i)
    assert eps_t.dtype == eps_i.dtype == torch.float32
    assert rel(-eps_t[:, 0], s_ref) <= 1e-7 and rel(-eps_i[:, 0], s_ref) <= 1e-7
