"""Exact conditionals of the Gaussian-mixture oracle, and samplers against them.

``GaussianMixture.condition`` against brute force (quadrature and the mixture's marginal), ``sample(return_labels=True)``
against the plain draws, ``subset`` / ``class_log_prob`` / ``label_score_fn`` against Bayes' rule and autograd,
``cfg_gaussian_target`` against the guided score; samples of the samplers (VP / sub-VP / VE; DPM-Solver, ODE, PC)
driven by the exact score of a conditional or a class reach the MMD^2 noise floor of that distribution's own samples.
Guidance itself (``scoresde.samplers.guidance``) is tested in tests/test_guidance.py.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributions as dist

from scoresde import GaussianMixture, SubVPSDE, VESDE, VPSDE
from scoresde.oracle import cfg_gaussian_target, labelled_score_fn
from scoresde.metrics import median_bandwidth, mmd2_unbiased
from scoresde.samplers import sample

F64 = torch.float64
Z_MAX = 5.0  # as tests/test_samplers.py: "at the floor" = MMD^2 below 5 sd of the data-vs-data statistic
N = 1000
# the step counts at which tests/test_samplers.py finds each sampler at the floor on the oracle
METHODS = {"dpm_solver": {"steps": 20}, "ode": {}, "pc": {"steps": 500}}
CASES = [(sde, m) for sde in ("vp", "subvp", "ve") for m in METHODS if not (sde == "ve" and m == "dpm_solver")]
# one case per SDE and per method for the everyday suite; the full grid is marked slow
FAST_CASES = [("vp", "dpm_solver"), ("subvp", "ode"), ("ve", "pc")]
SDE_NAMES = ("vp", "subvp", "ve")
CLASSES = [[0, 2], [1, 3]]  # two classes of two components each (of ``mixture(D=2)``)


def grid(cases=CASES, fast=FAST_CASES):
    return [pytest.param(*c, marks=() if c in fast else pytest.mark.slow) for c in cases]


def make_sde(name):
    return {"vp": VPSDE(), "subvp": SubVPSDE(), "ve": VESDE(sigma_min=0.01, sigma_max=20.0)}[name]


def mixture(D=2, K=4, seed=1) -> GaussianMixture:
    g = torch.Generator().manual_seed(seed)
    means = 2.0 * torch.randn(K, D, generator=g, dtype=F64)
    stds = 0.2 + 0.3 * torch.rand(K, generator=g, dtype=F64)
    return GaussianMixture(means, stds, 0.5 + torch.rand(K, generator=g, dtype=F64))


_FLOORS: dict = {}


def floor_z(x: torch.Tensor, target: GaussianMixture, key: str) -> float:
    """MMD^2 of ``x`` (``N`` rows) against ``N`` samples of ``target``, in standard deviations of the MMD^2 between
    independent samples of ``target`` (10 pairs; as ``reference`` in tests/test_samplers.py). Cached under ``key``."""
    if key not in _FLOORS:
        data = [target.sample(N, torch.Generator().manual_seed(100 + i), dtype=F64) for i in range(11)]
        bw = [median_bandwidth(data[0], data[1]) * c for c in (0.25, 0.5, 1.0, 2.0, 4.0)]
        _FLOORS[key] = data[0], bw, float(torch.stack([mmd2_unbiased(data[0], d, bw) for d in data[1:]]).std())
    data, bw, sd = _FLOORS[key]
    return float(mmd2_unbiased(x, data, bw)) / sd


def draw(target: GaussianMixture, sde_name: str, method: str, n=N, seed=5):
    sde = make_sde(sde_name)
    return sample(target.score_fn(sde), sde, (n, target.D), method=method, generator=torch.Generator().manual_seed(seed),
                  dtype=F64, **METHODS[method]).x


# --- sample(return_labels=True) ------------------------------------------------------------------------
def test_sample_return_labels_same_draws_and_labels_are_components():
    gm = mixture(D=3)
    x0 = gm.sample(500, torch.Generator().manual_seed(3))
    x, k = gm.sample(500, torch.Generator().manual_seed(3), return_labels=True)
    assert torch.equal(x, x0)
    assert k.dtype == torch.long and k.shape == (500,) and int(k.min()) >= 0 and int(k.max()) < gm.K
    # each row is its component's mean plus noise of that component's std: the standardised residuals are N(0, 1)
    r = (x - gm.means[k]) / gm.stds[k, None]
    assert abs(float(r.mean())) < 5 / math.sqrt(r.numel()) and abs(float(r.var()) - 1) < 5 * math.sqrt(2 / r.numel())
    # label frequencies match the weights (z-scores)
    freq = torch.bincount(k, minlength=gm.K).to(F64) / 500
    assert bool(((freq - gm.weights).abs() <= 5 * (gm.weights * (1 - gm.weights) / 500).sqrt()).all())
    xe, ke = gm.sample(0, return_labels=True)
    assert xe.shape == (0, 3) and ke.shape == (0,) and ke.dtype == torch.long
    with pytest.raises(ValueError, match="return_labels"):
        gm.sample(3, return_labels=1)


# --- condition(mask, values) ---------------------------------------------------------------------------
def test_condition_equals_quadrature_in_2d():
    """D = 2, x_0 observed: log p(x_1 | x_0) = log p(x_0, x_1) - log ∫ p(x_0, u) du, the integral by quadrature."""
    gm = mixture(D=2)
    v = float(gm.means[:2, 0].mean())  # between two components, so the reweighting matters
    cond = gm.condition(torch.tensor([True, False]), torch.tensor([v], dtype=F64))
    assert (cond.K, cond.D) == (gm.K, 1) and torch.equal(cond.stds, gm.stds)
    u = torch.linspace(-20, 20, 40001, dtype=F64)
    logj = gm.log_prob(torch.stack([torch.full_like(u, v), u], 1))
    log_marg = torch.logsumexp(logj, 0) + math.log(float(u[1] - u[0]))  # Riemann sum of a smooth, decayed integrand
    x1 = torch.linspace(-4, 4, 41, dtype=F64)
    ref = gm.log_prob(torch.stack([torch.full_like(x1, v), x1], 1)) - log_marg
    torch.testing.assert_close(cond.log_prob(x1[:, None]), ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("full_values", [False, True])
def test_condition_equals_joint_minus_marginal(full_values):
    """D = 6, coordinates {0, 2, 3} observed: log p_cond(x_u) = log p(x_o, x_u) - log p(x_o) with the joint from the full
    mixture and the marginal p(x_o) from torch.distributions (a mixture's marginal projects each component)."""
    gm = mixture(D=6, K=5, seed=2)
    mask = torch.tensor([True, False, True, True, False, False])
    full = gm.sample(1, torch.Generator().manual_seed(9))[0]
    cond = gm.condition(mask, full if full_values else full[mask])
    comp = dist.Independent(dist.Normal(gm.means[:, mask], gm.stds[:, None].expand(-1, 3)), 1)
    log_marg = dist.MixtureSameFamily(dist.Categorical(probs=gm.weights), comp).log_prob(full[mask])
    xu = torch.randn(50, 3, generator=torch.Generator().manual_seed(4), dtype=F64) * 2
    x = full.expand(50, 6).clone()
    x[:, ~mask] = xu
    torch.testing.assert_close(cond.log_prob(xu), gm.log_prob(x) - log_marg, rtol=0, atol=1e-10)
    assert cond.D == 3 and abs(float(cond.weights.sum()) - 1) < 1e-12


def test_condition_image_shaped_mask_and_nothing_observed():
    gm = mixture(D=12, K=3, seed=3)
    mask = torch.zeros(3, 2, 2, dtype=torch.bool)
    mask[0] = True  # first "channel" observed
    full = gm.sample(1, torch.Generator().manual_seed(1))[0]
    a = gm.condition(mask, full.reshape(3, 2, 2))
    b = gm.condition(mask.reshape(12), full[mask.reshape(12)])
    assert torch.equal(a.means, b.means) and torch.equal(a.weights, b.weights) and a.D == 8
    none = gm.condition(torch.zeros(12, dtype=torch.bool), torch.empty(0, dtype=F64))
    torch.testing.assert_close(none.weights, gm.weights, rtol=1e-14, atol=0)
    assert torch.equal(none.means, gm.means)


def test_condition_float32_and_far_observation():
    """A value far from every component still gives finite, normalised weights (log-space reweighting)."""
    gm = mixture(D=2)
    far = gm.condition(torch.tensor([True, False]), torch.tensor([80.0], dtype=F64))
    assert bool(torch.isfinite(far.weights).all()) and abs(float(far.weights.sum()) - 1) < 1e-12
    gm32 = GaussianMixture(gm.means.float(), gm.stds.float(), gm.weights.float())
    c32 = gm32.condition(torch.tensor([True, False]), torch.tensor([0.3]))
    c64 = gm.condition(torch.tensor([True, False]), torch.tensor([0.3], dtype=F64))
    assert c32.means.dtype == torch.float32
    torch.testing.assert_close(c32.weights.double(), c64.weights, rtol=1e-5, atol=1e-6)


def test_condition_bad_input():
    gm = mixture(D=3)
    v = torch.zeros(1, dtype=F64)
    with pytest.raises(ValueError, match="mask must have shape"):
        gm.condition(torch.tensor([True, False]), v)
    with pytest.raises(ValueError, match="mask must be a bool"):
        gm.condition(torch.tensor([1, 0, 0]), v)
    with pytest.raises(ValueError, match="at least one coordinate unobserved"):
        gm.condition(torch.ones(3, dtype=torch.bool), torch.zeros(3, dtype=F64))
    with pytest.raises(ValueError, match=r"values must have shape \(n_obs,\) = \(1,\)"):
        gm.condition(torch.tensor([True, False, False]), torch.zeros(2, dtype=F64))
    with pytest.raises(ValueError, match="values must be finite"):
        gm.condition(torch.tensor([True, False, False]), torch.tensor([float("nan")]))


def conditional_target() -> GaussianMixture:
    """D = 3 with coordinate 0 observed between two components: a 2-D bimodal conditional."""
    means = torch.tensor([[0.0, -1.5, 0.0], [0.2, 1.5, 1.0], [3.0, 0.0, -2.0], [-3.0, 1.0, 1.0]], dtype=F64)
    gm = GaussianMixture(means, torch.tensor([0.3, 0.4, 0.5, 0.3], dtype=F64), torch.tensor([0.2, 0.3, 0.3, 0.2], dtype=F64))
    return gm.condition(torch.tensor([True, False, False]), torch.tensor([0.1], dtype=F64))


@pytest.mark.parametrize("sde_name,method", CASES)  # every case: the inpainting work relies on this one
def test_samplers_reach_floor_of_condition(sde_name, method):
    target = conditional_target()
    assert float(target.weights.max()) < 0.9  # a genuine mixture, not one component
    z = floor_z(draw(target, sde_name, method), target, "condition")
    assert z < Z_MAX, f"{sde_name} {method}: MMD^2 at {z:.1f} null sd"


def test_floor_test_detects_a_wrong_conditional():
    """Power: the projection of the mixture with the prior weights (no reweighting by the observation) and the
    conditional at a slightly different observed value are both far above the floor."""
    target = conditional_target()
    means = torch.tensor([[0.0, -1.5, 0.0], [0.2, 1.5, 1.0], [3.0, 0.0, -2.0], [-3.0, 1.0, 1.0]], dtype=F64)
    gm = GaussianMixture(means, torch.tensor([0.3, 0.4, 0.5, 0.3], dtype=F64), torch.tensor([0.2, 0.3, 0.3, 0.2], dtype=F64))
    unweighted = GaussianMixture(target.means, target.stds, gm.weights)
    shifted = gm.condition(torch.tensor([True, False, False]), torch.tensor([0.3], dtype=F64))
    for wrong in (unweighted, shifted):
        x = wrong.sample(N, torch.Generator().manual_seed(7), dtype=F64)
        assert floor_z(x, target, "condition") > 3 * Z_MAX


# --- classes: subset, class_log_prob, label_score_fn ----------------------------------------------------
def random_xt(sde, gm, n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(n, generator=g, dtype=F64) * 0.999 + 1e-3
    m, s = sde.marginal_coef(t)
    x = m[:, None] * gm.sample(n, g) + s[:, None] * torch.randn(n, gm.D, generator=g, dtype=F64)
    return x, t


def test_subset_is_renormalised_sub_mixture():
    gm = mixture(D=2)
    sub = gm.subset([2, 0])
    assert torch.equal(sub.means, gm.means[[2, 0]]) and torch.equal(sub.stds, gm.stds[[2, 0]])
    torch.testing.assert_close(sub.weights, gm.weights[[2, 0]] / gm.weights[[2, 0]].sum(), rtol=1e-15, atol=0)
    # p_0(x | c) pi_c summed over a partition is p_0(x)
    x = torch.randn(20, 2, dtype=F64)
    pis = [float(gm.weights[c].sum()) for c in CLASSES]
    mix = torch.logsumexp(torch.stack([gm.subset(c).log_prob(x) + math.log(p) for c, p in zip(CLASSES, pis)]), 0)
    torch.testing.assert_close(mix, gm.log_prob(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("sde_name", SDE_NAMES)
def test_class_log_prob_is_bayes_rule(sde_name):
    """log p_t(c | x) = log p_t(x | c) + log pi_c - log p_t(x), each side from independent pieces."""
    sde, gm = make_sde(sde_name), mixture(D=2)
    x, t = random_xt(sde, gm)
    lp = gm.class_log_prob(x, t, sde, CLASSES)
    assert lp.shape == (64, 2)
    ref = torch.stack([gm.subset(c).log_prob(x, t, sde) + math.log(float(gm.weights[c].sum())) for c in CLASSES], 1)
    torch.testing.assert_close(lp, ref - gm.log_prob(x, t, sde)[:, None], rtol=0, atol=1e-11)
    torch.testing.assert_close(lp.exp().sum(1), torch.ones(64, dtype=F64), rtol=0, atol=1e-13)
    # the data classifier (t, sde None) and a scalar t
    torch.testing.assert_close(gm.class_log_prob(x, None, None, CLASSES).exp().sum(1), torch.ones(64, dtype=F64), rtol=0, atol=1e-13)
    torch.testing.assert_close(gm.class_log_prob(x, 0.5, sde, CLASSES), gm.class_log_prob(x, torch.full((64,), 0.5, dtype=F64), sde, CLASSES))


@pytest.mark.parametrize("sde_name", SDE_NAMES)
def test_label_score_fn_is_class_score_and_null_is_unconditional(sde_name):
    sde, gm = make_sde(sde_name), mixture(D=2)
    x, t = random_xt(sde, gm, seed=1)
    y = torch.arange(64) % 3  # labels 0, 1 and the null label 2
    out = gm.label_score_fn(sde, CLASSES)(x, t, y)
    for label, ref in enumerate([gm.class_score_fn(sde, CLASSES[0]), gm.class_score_fn(sde, CLASSES[1]), gm.score_fn(sde)]):
        rows = y == label
        assert torch.equal(out[rows], ref(x[rows], t[rows]))
    # the class score is the autograd gradient of the class-conditional log-density
    xg = x.clone().requires_grad_(True)
    grad = torch.autograd.grad(gm.subset(CLASSES[1]).log_prob(xg, t, sde).sum(), xg)[0]
    torch.testing.assert_close(gm.class_score_fn(sde, CLASSES[1])(x, t), grad, rtol=0, atol=1e-9 * max(1.0, float(grad.abs().max())))


def test_class_and_subset_bad_input():
    gm = mixture(D=2)
    with pytest.raises(ValueError, match="components must be a non-empty list"):
        gm.subset([])
    with pytest.raises(ValueError, match="distinct component indices"):
        gm.subset([0, 0])
    with pytest.raises(ValueError, match=r"in \[0, K\) = \[0, 4\)"):
        gm.subset([4])
    with pytest.raises(ValueError, match="components must be a non-empty list"):
        gm.subset([0.5])
    with pytest.raises(ValueError, match="partition"):
        gm.class_log_prob(torch.zeros(2, 2, dtype=F64), None, None, [[0, 1], [2]])
    with pytest.raises(ValueError, match="partition"):
        gm.label_score_fn(VPSDE(), [[0, 1, 2], [2, 3]])
    with pytest.raises(ValueError, match=r"classes\[1\]"):
        gm.class_log_prob_fn(VPSDE(), [[0, 1], []])
    cond = gm.condition(torch.tensor([True, False]), torch.tensor([1e4], dtype=F64))  # far: some weights underflow to 0
    zero = [k for k in range(4) if float(cond.weights[k]) == 0.0]
    if zero:
        with pytest.raises(ValueError, match="total weight 0"):
            cond.subset(zero)
    cs = labelled_score_fn([gm, gm.subset([0])], VPSDE())
    with pytest.raises(ValueError, match=r"y must lie in \[0, 1\]"):
        cs(torch.zeros(2, 2, dtype=F64), torch.full((2,), 0.5, dtype=F64), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="y must be an integer tensor"):
        cs(torch.zeros(2, 2, dtype=F64), torch.full((2,), 0.5, dtype=F64), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="one dimension"):
        labelled_score_fn([gm, mixture(D=3)], VPSDE())


@pytest.mark.parametrize("sde_name,method", grid())
def test_samplers_with_class_score_reach_class_floor(sde_name, method):
    gm = mixture(D=2)
    target = gm.subset(CLASSES[1])
    z = floor_z(draw(target, sde_name, method), target, "class1")
    assert z < Z_MAX, f"{sde_name} {method}: MMD^2 at {z:.1f} null sd of p_0(x | y = 1)"
    x_all = gm.sample(N, torch.Generator().manual_seed(8), dtype=F64)  # power: the unconditional data is far off
    assert floor_z(x_all, target, "class1") > 3 * Z_MAX


# --- the closed-form target of classifier-free guidance -------------------------------------------------
def gaussian_pair(dtype=F64):
    cond = GaussianMixture(torch.tensor([[1.0, 0.5]], dtype=dtype), torch.tensor([0.5], dtype=dtype))
    uncond = GaussianMixture(torch.tensor([[-0.5, 0.0]], dtype=dtype), torch.tensor([0.5], dtype=dtype))
    return cond, uncond


@pytest.mark.parametrize("sde_name", SDE_NAMES + ("vp_cosine",))
@pytest.mark.parametrize("w", [0.0, 0.5, 1.0, 3.0])
def test_cfg_gaussian_target_score_is_guided_score(sde_name, w):
    """(1 + w) s_c - w s_u equals the score of the perturbed N(mu_w, s^2 I) at every t (float64)."""
    sde = VPSDE(schedule="cosine") if sde_name == "vp_cosine" else make_sde(sde_name)
    cond, uncond = gaussian_pair()
    target = cfg_gaussian_target(cond, uncond, w)
    torch.testing.assert_close(target.means, (1 + w) * cond.means - w * uncond.means, rtol=0, atol=0)
    x, t = random_xt(sde, target, n=200, seed=3)
    t[:2] = torch.tensor([0.0, 1.0], dtype=F64)
    guided = (1 + w) * cond.score(x, t, sde) - w * uncond.score(x, t, sde)
    ref = target.score(x, t, sde)
    torch.testing.assert_close(guided, ref, rtol=1e-12, atol=1e-12 * float(ref.abs().max()))


def test_cfg_gaussian_target_refuses_unequal_stds_and_bad_input():
    cond, uncond = gaussian_pair()
    wide = GaussianMixture(uncond.means, torch.tensor([0.6], dtype=F64))
    with pytest.raises(ValueError, match="same std"):
        cfg_gaussian_target(cond, wide, 1.0)
    # with unequal stds the guided score is indeed not the score of any perturbed Gaussian: its precision in t is
    # not 1 / (m^2 sigma^2 + s^2) for one sigma
    sde = VPSDE()
    t = torch.tensor([0.05, 0.5], dtype=F64)
    m, s = sde.marginal_coef(t)
    prec = 2 / (m**2 * 0.25 + s**2) - 1 / (m**2 * 0.36 + s**2)  # w = 1
    sigma2 = (1 / prec - s**2) / m**2
    assert abs(float(sigma2[0] - sigma2[1])) > 1e-3
    with pytest.raises(ValueError, match="one-component"):
        cfg_gaussian_target(mixture(D=2), uncond, 1.0)
    with pytest.raises(ValueError, match="same dimension"):
        cfg_gaussian_target(cond, GaussianMixture(torch.zeros(1, 3, dtype=F64), 0.5), 1.0)
    with pytest.raises(ValueError, match="w must be a finite number"):
        cfg_gaussian_target(cond, uncond, float("nan"))
    assert torch.equal(cfg_gaussian_target(cond, uncond, 0).means, cond.means)
    assert torch.equal(cfg_gaussian_target(cond, uncond, -1).means, uncond.means)
