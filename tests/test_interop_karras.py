"""scoresde.interop.karras: the EDM denoiser D(x_hat, sigma) <-> scoresde's score_fn(x, t), against exact answers."""

import math

import pytest
import torch

from scoresde import GaussianMixture, sample
from scoresde.interop.karras import denoiser, score_fn, sigma_of_t, sigma_range, t_of_sigma
from scoresde.model import ScoreModel
from scoresde.nets.mlp import MLPScoreNet
from scoresde.sde import VESDE, VPSDE, SubVPSDE

F64 = torch.float64
SDES = {"vp": VPSDE(), "vp_cosine": VPSDE(schedule="cosine"), "subvp": SubVPSDE(), "ve": VESDE(sigma_max=5.0)}


@pytest.fixture(scope="module")
def gm():
    means = torch.tensor([[-1.0, 0.5], [1.5, -0.5], [0.0, 2.0]], dtype=F64)
    return GaussianMixture(means, torch.tensor([0.3, 0.5, 0.2], dtype=F64), torch.tensor([0.5, 0.3, 0.2], dtype=F64))


def gen(seed):
    return torch.Generator().manual_seed(seed)


def posterior_mean(gm, x_hat, sigma):
    """E[x_0 | x_hat = x_0 + sigma n] for the mixture, from the per-component Gaussian posteriors (no score involved):
    r_k ~ w_k N(x_hat; mu_k, (sigma_k^2 + sigma^2) I), E[x_0 | x_hat, k] = mu_k + sigma_k^2 / (sigma_k^2 + sigma^2) (x_hat - mu_k)."""
    var = gm.stds[None, :] ** 2 + sigma[:, None] ** 2  # (B, K)
    diff = x_hat[:, None, :] - gm.means[None]  # (B, K, D)
    logr = torch.log(gm.weights)[None] - 0.5 * gm.D * torch.log(var) - 0.5 * diff.pow(2).sum(-1) / var
    r = torch.softmax(logr, dim=1)
    cond = gm.means[None] + (gm.stds[None, :, None] ** 2 / var[:, :, None]) * diff
    return (r[:, :, None] * cond).sum(1)


@pytest.mark.parametrize("name", list(SDES))
def test_sigma_and_its_inverse(name):
    sde = SDES[name]
    t = torch.linspace(0.0 if name == "ve" else 1e-4, 1.0, 101, dtype=F64)
    sig = sigma_of_t(sde, t)
    m, s = sde.marginal_coef(t)
    torch.testing.assert_close(sig, s / m, rtol=0, atol=0)
    assert bool((sig[1:] > sig[:-1]).all())
    torch.testing.assert_close(t_of_sigma(sde, sig), t, rtol=1e-9, atol=1e-10)
    lo, hi = sigma_range(sde)
    assert hi == pytest.approx(float(sig[-1]), rel=1e-12) and (lo == 0.0) == (name != "ve")
    with pytest.raises(ValueError, match="sigma must lie in"):
        t_of_sigma(sde, torch.tensor([hi * 1.01]))
    if name == "ve":
        with pytest.raises(ValueError, match="sigma must lie in"):
            t_of_sigma(sde, torch.tensor([0.002]))  # EDM's sigma_min is below VE's sigma_min = 0.01


@pytest.mark.parametrize("name", list(SDES))
def test_round_trip_score_to_denoiser_to_score(gm, name):
    sde = SDES[name]
    exact = gm.score_fn(sde)
    B = 64
    t = torch.linspace(0.02, 1.0, B, dtype=F64)
    m, s = sde.marginal_coef(t)
    x = m[:, None] * gm.sample(B, gen(0)) + s[:, None] * torch.randn(B, 2, generator=gen(1), dtype=F64)
    back = score_fn(denoiser(exact, sde), sde)
    torch.testing.assert_close(back(x, t), exact(x, t), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("name", list(SDES))
def test_denoiser_of_the_oracle_is_the_posterior_mean(gm, name):
    sde = SDES[name]
    lo, hi = sigma_range(sde)
    B = 64
    sigma = torch.exp(torch.linspace(math.log(max(lo, 1e-3) * 1.001), math.log(hi * 0.999), B, dtype=F64))
    x_hat = gm.sample(B, gen(2)) + sigma[:, None] * torch.randn(B, 2, generator=gen(3), dtype=F64)
    D = denoiser(gm.score_fn(sde), sde)
    torch.testing.assert_close(D(x_hat, sigma), posterior_mean(gm, x_hat, sigma), rtol=1e-8, atol=1e-9)
    # a scalar sigma and EDM's (B, 1) shape give the same as (B,)
    torch.testing.assert_close(D(x_hat, sigma[:, None]), D(x_hat, sigma), rtol=0, atol=0)
    one = D(x_hat[:3], float(sigma[10]))
    torch.testing.assert_close(one, posterior_mean(gm, x_hat[:3], sigma[10].expand(3)), rtol=1e-8, atol=1e-9)
    with pytest.raises(ValueError, match="one value per sample"):
        D(x_hat, sigma[:5])


def edm_heun(D, x_hat, sigmas):
    """Karras et al. 2022, Algorithm 1 (deterministic Heun, no churn) over ``sigmas`` (decreasing, last > 0)."""
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        d = (x_hat - D(x_hat, s)) / s
        x_next = x_hat + (s_next - s) * d
        if s_next != 0:
            d2 = (x_next - D(x_next, s_next)) / s_next
            x_next = x_hat + (s_next - s) * 0.5 * (d + d2)
        x_hat = x_next
    return x_hat


def karras_sigmas(smax, smin, steps, rho=7.0):
    i = torch.arange(steps + 1, dtype=F64) / steps
    return (smax ** (1 / rho) + i * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho


@pytest.mark.parametrize("name", ["vp", "ve"])
@pytest.mark.parametrize("kind", ["oracle", "model"])
def test_heun_sampler_is_edm_heun_over_the_denoiser(gm, name, kind):
    sde = SDES[name]
    if kind == "oracle":
        fn = gm.score_fn(sde)
    else:
        net = MLPScoreNet(2, hidden=32, depth=1, seed=4).double()
        fn = ScoreModel(net, sde, "eps" if name == "vp" else "score").score_fn
    eps, steps, B = (1e-3 if name == "vp" else 1e-5), 8, 16
    x_T = sde.prior_std * torch.randn(B, 2, generator=gen(5), dtype=F64)
    with torch.no_grad():
        ours = sample(fn, sde, (B, 2), method="heun", steps=steps, eps=eps, x_T=x_T).x
        T, e = torch.tensor([1.0, eps], dtype=F64)
        (mT, _), (me, _) = sde.marginal_coef(T[None]), sde.marginal_coef(e[None])
        sig = karras_sigmas(float(sigma_of_t(sde, T)), float(sigma_of_t(sde, e)), steps)
        ref = me * edm_heun(denoiser(fn, sde), x_T / mT, sig.tolist())
    torch.testing.assert_close(ours, ref, rtol=1e-8, atol=1e-9)
