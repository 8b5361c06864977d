"""The Gaussian-mixture oracle against torch.distributions and autograd."""

import math

import pytest
import torch
import torch.distributions as dist

from scoresde import VESDE, VPSDE, GaussianMixture, SubVPSDE

DT = torch.float64
SDES = {"vp": VPSDE(), "vp_cosine": VPSDE(schedule="cosine"), "subvp": SubVPSDE(), "ve": VESDE()}


def make_gm(D=2, K=3, seed=0, dtype=DT):
    g = torch.Generator().manual_seed(seed)
    means = 2 * torch.randn(K, D, generator=g, dtype=dtype)
    stds = 0.2 + torch.rand(K, generator=g, dtype=dtype)
    weights = 0.5 + torch.rand(K, generator=g, dtype=dtype)
    return GaussianMixture(means, stds, weights)


def torch_mixture(gm, m=1.0, s=0.0):
    var = m**2 * gm.stds**2 + s**2
    comp = dist.Independent(dist.Normal(m * gm.means, var.sqrt()[:, None].expand_as(gm.means)), 1)
    return dist.MixtureSameFamily(dist.Categorical(probs=gm.weights), comp)


def test_weights_are_normalised():
    gm = GaussianMixture(torch.zeros(2, 3), [1.0, 2.0], [1.0, 3.0])
    assert torch.allclose(gm.weights, torch.tensor([0.25, 0.75]))
    assert (gm.K, gm.D) == (2, 3)


def test_log_prob_matches_torch_distributions():
    gm = make_gm(D=5, K=4)
    x = torch.randn(64, 5, dtype=DT) * 3
    assert torch.allclose(gm.log_prob(x), torch_mixture(gm).log_prob(x), rtol=1e-12)


@pytest.mark.parametrize("name", list(SDES))
def test_perturbed_log_prob_matches_torch_distributions(name):
    sde = SDES[name]
    gm = make_gm(D=3, K=2)
    x = torch.randn(8, 3, dtype=DT)
    t = torch.tensor(0.37, dtype=DT)
    m, s = sde.marginal_coef(t)
    assert torch.allclose(gm.log_prob(x, t, sde), torch_mixture(gm, float(m), float(s)).log_prob(x), rtol=1e-12)


@pytest.mark.parametrize("name", list(SDES))
@pytest.mark.parametrize("D", [2, 64])
def test_score_equals_autograd_of_log_prob(name, D):
    sde = SDES[name]
    gm = make_gm(D=D, K=3, seed=D)
    g = torch.Generator().manual_seed(1)
    t = torch.rand(32, generator=g, dtype=DT)
    t[:3] = torch.tensor([0.0, 1e-5, 1.0], dtype=DT)
    m, s = sde.marginal_coef(t)
    x = (m[:, None] * gm.sample(32, generator=g) + s[:, None] * torch.randn(32, D, generator=g, dtype=DT)).requires_grad_(True)
    ref = torch.autograd.grad(gm.log_prob(x, t, sde).sum(), x)[0]
    score = gm.score_fn(sde)(x.detach(), t)
    assert score.shape == x.shape
    assert torch.allclose(score, ref, rtol=0, atol=1e-8 * max(1.0, float(ref.abs().max())))


def test_data_score_equals_autograd():
    gm = make_gm(D=4)
    x = torch.randn(10, 4, dtype=DT, requires_grad=True)
    ref = torch.autograd.grad(gm.log_prob(x).sum(), x)[0]
    assert torch.allclose(gm.score(x.detach()), ref, atol=1e-10)


def test_image_shaped_inputs():
    gm = make_gm(D=3 * 4 * 4, K=2)
    sde = VPSDE()
    x = torch.randn(5, 3, 4, 4, dtype=DT)
    t = torch.full((5,), 0.5, dtype=DT)
    s_img = gm.score(x, t, sde)
    assert s_img.shape == (5, 3, 4, 4)
    assert torch.allclose(s_img.reshape(5, -1), gm.score(x.reshape(5, -1), t, sde))
    assert torch.allclose(gm.log_prob(x, t, sde), gm.log_prob(x.reshape(5, -1), t, sde))
    with pytest.raises(ValueError, match="D = 48"):
        gm.score(torch.zeros(5, 7), t, sde)


def test_float32_matches_float64():
    gm64 = make_gm(D=8)
    gm32 = GaussianMixture(gm64.means.float(), gm64.stds.float(), gm64.weights.float())
    sde = SubVPSDE()
    x = torch.randn(16, 8, dtype=DT)
    t = torch.rand(16, dtype=DT) * 0.9 + 0.05
    s32 = gm32.score(x.float(), t.float(), sde)
    assert s32.dtype == torch.float32
    assert torch.allclose(s32.double(), gm64.score(x, t, sde), rtol=1e-4, atol=1e-4)
    # a float64 input works with a float32 mixture (computation follows the input's dtype)
    assert gm32.score(x, t, sde).dtype == DT


def test_sample_moments():
    gm = GaussianMixture(torch.tensor([[0.0, 0.0], [4.0, -2.0]], dtype=DT), [0.5, 1.0], [0.3, 0.7])
    n = 50000
    x = gm.sample(n, generator=torch.Generator().manual_seed(0))
    assert x.shape == (n, 2) and x.dtype == DT
    mean = gm.weights @ gm.means
    second = (gm.weights[:, None] * (gm.means**2 + gm.stds[:, None] ** 2)).sum(0)
    var = second - mean**2
    z = (x.mean(0) - mean) / (var / n).sqrt()
    assert bool((z.abs() < 4.5).all()), z
    assert gm.sample(0).shape == (0, 2)
    # reproducible from the generator
    assert torch.equal(gm.sample(10, generator=torch.Generator().manual_seed(5)), gm.sample(10, generator=torch.Generator().manual_seed(5)))


def test_ddpm_eps_is_scaled_score_of_discrete_marginal():
    sde = VPSDE(N=1000)
    gm = make_gm(D=6)
    i = torch.tensor([0, 10, 250, 999, 500])
    ab = sde.alphas_cumprod[i]
    x = torch.randn(5, 6, dtype=DT, requires_grad=True)
    # q(x_i) = sum_k w_k N(sqrt(ab) mu_k, (ab sigma_k^2 + 1 - ab) I)
    logq = torch.stack([torch_mixture(gm, float(a.sqrt()), float((1 - a).sqrt())).log_prob(x[j]) for j, a in enumerate(ab)])
    grad = torch.autograd.grad(logq.sum(), x)[0]
    ref = -(1 - ab).sqrt()[:, None] * grad
    eps = gm.ddpm_eps_fn(sde)(x.detach(), i)
    assert torch.allclose(eps, ref, atol=1e-10)


def test_ddpm_eps_is_unbiased_for_the_noise():
    """E[eps_hat(x_i)] over (x_0, eps) equals E[eps] = 0 and E[eps_hat * eps] = E[eps_hat^2] (it is E[eps | x_i])."""
    sde = VPSDE()
    gm = make_gm(D=2, K=2)
    n = 40000
    g = torch.Generator().manual_seed(2)
    x0 = gm.sample(n, generator=g)
    i = torch.full((n,), 300)
    ab = sde.alphas_cumprod[i][:, None]
    eps = torch.randn(n, 2, generator=g, dtype=DT)
    xi = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    eh = gm.ddpm_eps(xi, i, sde)
    # orthogonality of the conditional-mean residual: E[(eps - eps_hat) . eps_hat] = 0
    r = ((eps - eh) * eh).sum(1)
    assert abs(float(r.mean())) < 4 * float(r.std()) / math.sqrt(n)


def test_ddpm_eps_bad_input():
    gm = make_gm(D=2)
    with pytest.raises(TypeError, match="VPSDE"):
        gm.ddpm_eps(torch.zeros(2, 2, dtype=DT), torch.tensor([1, 2]), VESDE())
    with pytest.raises(ValueError, match="N-1"):
        gm.ddpm_eps(torch.zeros(2, 2, dtype=DT), torch.tensor([1, 1000]), VPSDE())
    with pytest.raises(ValueError, match="integer"):
        gm.ddpm_eps(torch.zeros(2, 2, dtype=DT), torch.tensor([1.0, 2.0]), VPSDE())


@pytest.mark.parametrize(
    "args, field",
    [
        ((torch.zeros(2, 2), [1.0, -1.0], [1.0, 1.0]), "stds"),
        ((torch.zeros(2, 2), [1.0, 0.0], [1.0, 1.0]), "stds"),
        ((torch.zeros(2, 2), [1.0, 1.0], [0.0, 0.0]), "weights"),
        ((torch.zeros(2, 2), [1.0, 1.0], [1.0, -2.0]), "weights"),
        ((torch.zeros(2, 2), [1.0, 1.0, 1.0], [1.0, 1.0]), "stds"),
        ((torch.zeros(2, 2), [1.0, 1.0], [1.0]), "weights"),
        ((torch.zeros(2), [1.0], [1.0]), "means"),
    ],
)
def test_bad_mixture_arguments(args, field):
    with pytest.raises(ValueError, match=field):
        GaussianMixture(*args)


def test_log_prob_needs_both_t_and_sde():
    gm = make_gm()
    with pytest.raises(ValueError, match="t and sde"):
        gm.log_prob(torch.zeros(1, 2, dtype=DT), t=torch.zeros(1, dtype=DT))
