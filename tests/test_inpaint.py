"""Inpainting / imputation and colourisation (scoresde.samplers.inpaint) against the Gaussian-mixture oracle.

The replacement method (Song et al. 2021, App. I.2) is exact only where the observed and unobserved coordinates are
independent under p_0; there inpainted samples must reach the MMD^2 noise floor of the exact conditional
(``GaussianMixture.condition``). Where the observed coordinate is informative about a well-separated component, the
method is biased: the tests measure that bias against the exact conditional and assert only what the sample size
establishes (the bias is there, it shrinks with the separation and with more corrector steps).
Heavier grids (other SDEs, long corrector sweeps) are marked slow.
"""

from __future__ import annotations

import functools
import itertools
import math

import pytest
import torch
from torch.distributions import Normal

from scoresde import GaussianMixture, SubVPSDE, VESDE, VPSDE
from scoresde.metrics import median_bandwidth, mmd2_unbiased
from scoresde.samplers.inpaint import (
    COLORIZATION_MATRIX, _decoupled_score, _from_decoupled, _to_decoupled, colorization_matrix, colorize, inpaint,
)

F64 = torch.float64
Z_MAX = 5.0  # "at the noise floor": MMD^2 below Z_MAX standard deviations of the exact-vs-exact statistic


def make_sde(name):
    return {"vp": VPSDE(), "subvp": SubVPSDE(), "ve": VESDE(sigma_min=0.01, sigma_max=20.0)}[name]


def gen(seed):
    return torch.Generator().manual_seed(seed)


class Counter:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, x, t):
        self.calls += 1
        return self.fn(x, t)


def product_mixture(a_means, a_w, b_means, b_w, std):
    """``p(x) = p_a(x_a) p_b(x_b)``, both mixtures with the same std: the GMM over pairs of components."""
    pairs = list(itertools.product(range(len(a_w)), range(len(b_w))))
    means = torch.stack([torch.cat([a_means[i], b_means[j]]) for i, j in pairs])
    w = torch.stack([a_w[i] * b_w[j] for i, j in pairs])
    return GaussianMixture(means, std, w)


@functools.lru_cache(maxsize=None)
def independent_mixture() -> GaussianMixture:
    """D = 4: coordinates (0, 1) observed, a 2-component mixture; (2, 3) unobserved, a 3-component mixture, independent
    of (0, 1). The replacement method is exact here."""
    a = torch.tensor([[1.0, 0.5], [-1.0, -0.5]], dtype=F64)
    b = torch.tensor([[1.5, 0.0], [-1.0, 1.0], [0.0, -1.5]], dtype=F64)
    return product_mixture(a, torch.tensor([0.3, 0.7], dtype=F64), b, torch.tensor([0.5, 0.3, 0.2], dtype=F64), 0.3)


def mmd_z(x: torch.Tensor, cond: GaussianMixture, seed: int = 1000) -> float:
    """MMD^2 of ``x`` (n, D_u) against a sample of the exact conditional, in standard deviations of MMD^2 between two
    independent exact samples of the same size (10 independent pairs; the test's reference is an 11th sample)."""
    n = x.shape[0]
    refs = [cond.sample(n, gen(seed + i), dtype=F64) for i in range(21)]
    bw = [median_bandwidth(refs[0], refs[1]) * c for c in (0.25, 0.5, 1.0, 2.0, 4.0)]
    null = torch.stack([mmd2_unbiased(refs[2 * i + 1], refs[2 * i + 2], bw) for i in range(10)])
    return float(mmd2_unbiased(x, refs[0], bw)) / float(null.std())


# --- the contract: known pixels exact, per-sample generators, NFE ------------------------------------------
@functools.lru_cache(maxsize=None)
def image_mixture() -> GaussianMixture:
    g = gen(7)
    return GaussianMixture(torch.randn(3, 16, generator=g, dtype=F64), torch.tensor([0.2, 0.3, 0.4], dtype=F64))


def image_problem(B=6, dtype=F64):
    """known (B, 1, 4, 4) with NaN where unobserved (ignored), a (1, 1, 4, 4) mask broadcast over the batch."""
    x = image_mixture().sample(B, gen(3), dtype=dtype).reshape(B, 1, 4, 4)
    mask = torch.rand(1, 1, 4, 4, generator=gen(4)) < 0.5
    known = torch.where(mask, x, torch.full_like(x, float("nan")))
    return known, mask


RUNS = [("pc", {"steps": 10}), ("pc", {"steps": 10, "predictor": "euler_maruyama", "corrector": "annealed_langevin", "n_steps": 2}),
        ("ode", {"steps": 10}), ("ode", {"steps": 10, "ode_step": "euler"}), ("ode", {"steps": 10, "ode_step": "reverse_diffusion"})]
RUN_IDS = ["-".join([m] + [f"{k}={v}" for k, v in kw.items()]) for m, kw in RUNS]


@pytest.mark.parametrize("sde_name", ["vp", "subvp", "ve"])
@pytest.mark.parametrize("method,kw", RUNS, ids=RUN_IDS)
def test_known_pixels_exact_in_output(sde_name, method, kw):
    sde = make_sde(sde_name)
    known, mask = image_problem()
    res = inpaint(image_mixture().score_fn(sde), sde, known, mask, method, generator=gen(0), **kw)
    m = mask.expand_as(known)
    assert res.x.shape == known.shape and res.x.dtype == known.dtype
    assert torch.equal(res.x[m], known[m])  # bitwise
    assert torch.isfinite(res.x).all()
    for denoise in (False,):  # without the final denoising too
        res = inpaint(image_mixture().score_fn(sde), sde, known, mask, method, generator=gen(0), denoise=denoise, **kw)
        assert torch.equal(res.x[m], known[m])


@pytest.mark.parametrize("method", ["pc", "ode"])
def test_known_pixels_exact_float32_per_sample_mask(method):
    """float32, and a (B, 1, H, W) mask with a different pattern per sample."""
    sde = VPSDE()
    known, _ = image_problem(B=4, dtype=torch.float32)
    known = torch.nan_to_num(known, nan=0.0)
    mask = torch.rand(4, 1, 4, 4, generator=gen(9)) < 0.3
    res = inpaint(image_mixture().score_fn(sde), sde, known, mask, method, steps=8, generator=gen(1))
    assert res.x.dtype == torch.float32 and torch.equal(res.x[mask], known[mask]) and torch.isfinite(res.x).all()


@pytest.mark.parametrize("method,kw", RUNS, ids=RUN_IDS)
def test_sample_does_not_depend_on_its_batch(method, kw):
    """Per-sample generators: samples 2 and 3 drawn in a batch of 6 equal the same samples drawn alone."""
    sde = VPSDE()
    known, mask = image_problem(B=6)
    score = image_mixture().score_fn(sde)
    full = inpaint(score, sde, known, mask, method, generator=[gen(100 + i) for i in range(6)], **kw)
    part = inpaint(score, sde, known[2:4], mask, method, generator=[gen(102), gen(103)], **kw)
    torch.testing.assert_close(part.x, full.x[2:4], rtol=0, atol=1e-12)
    other = inpaint(score, sde, known, mask, method, generator=[gen(200 + i) for i in range(6)], **kw)
    assert not torch.allclose(other.x, full.x)  # the generators are used


@pytest.mark.parametrize("method,kw,expected", [
    ("pc", {"steps": 7}, 7 * 2 + 1),
    ("pc", {"steps": 7, "n_steps": 3}, 7 * 4 + 1),
    ("pc", {"steps": 7, "corrector": "none", "denoise": False}, 7),
    ("pc", {"steps": 7, "predictor": "none", "n_steps": 2}, 7 * 2 + 1),
    ("ode", {"steps": 7}, 7 * 2 + 1),
    ("ode", {"steps": 7, "ode_step": "euler", "denoise": False}, 7),
])
def test_nfe_is_counted(method, kw, expected):
    sde = VPSDE()
    known, mask = image_problem(B=3)
    counter = Counter(image_mixture().score_fn(sde))
    res = inpaint(counter, sde, known, mask, method, generator=gen(0), **kw)
    assert res.nfe == counter.calls == expected


@pytest.mark.parametrize("sde_name", ["vp", pytest.param("subvp", marks=pytest.mark.slow), pytest.param("ve", marks=pytest.mark.slow)])
def test_ode_is_deterministic_given_the_noise_and_converges_at_order_two(sde_name):
    """method="ode": the map (x_T[u], z) -> sample is deterministic, so the step count can be refined with the same
    draws. Against a 400-step Heun solution (max error over 100 samples), Heun converges at order 2 (measured slope
    over 20 -> 80 steps: VP 1.98, sub-VP 2.05, VE 2.11), Euler at order 1 (100 -> 400 steps: 0.92, 0.91, 0.94)."""
    sde = make_sde(sde_name)
    gm = GaussianMixture(torch.tensor([[1.0, 1.0], [-1.0, -1.0]], dtype=F64), torch.tensor([0.3, 0.5], dtype=F64))
    known, mask = torch.full((100, 2), 0.3, dtype=F64), torch.tensor([True, False])

    def run(steps, ode_step):
        return inpaint(gm.score_fn(sde), sde, known, mask, "ode", steps, gen(0), denoise=False, ode_step=ode_step).x

    ref = run(400, "heun")
    for ode_step, steps, order in (("heun", [20, 40, 80], 2.0), ("euler", [100, 200, 400], 1.0)):
        errs = [float((run(k, ode_step) - ref).abs().max()) for k in steps]
        slope = math.log2(errs[0] / errs[-1]) / 2
        assert abs(slope - order) < 0.3, f"{ode_step}: errors {errs}, slope {slope:.2f}, expected {order}"


# --- against the exact conditional: the independent case (exact in theory) -------------------------------
EXACT_CASES = [
    pytest.param("vp", "pc", {"steps": 200}, id="vp-pc"),
    pytest.param("vp", "ode", {"steps": 25}, id="vp-ode-heun"),
    pytest.param("subvp", "pc", {"steps": 200}, id="subvp-pc", marks=pytest.mark.slow),
    pytest.param("subvp", "ode", {"steps": 25}, id="subvp-ode-heun", marks=pytest.mark.slow),
    pytest.param("ve", "pc", {"steps": 200}, id="ve-pc", marks=pytest.mark.slow),
    pytest.param("ve", "ode", {"steps": 25}, id="ve-ode-heun", marks=pytest.mark.slow),
    pytest.param("vp", "ode", {"steps": 200, "ode_step": "euler"}, id="vp-ode-euler", marks=pytest.mark.slow),
    pytest.param("vp", "pc", {"steps": 200, "predictor": "ancestral", "corrector": "none"}, id="vp-ancestral", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("sde_name,method,kw", EXACT_CASES)
def test_independent_case_reaches_noise_floor_of_exact_conditional(sde_name, method, kw):
    """Observed (0, 1) independent of unobserved (2, 3): p_0(x_u | x_o) = p_0(x_u) whatever x_o, so every row may
    have its own observed values (drawn from p_0) and the samples of x_u must match the exact conditional."""
    gm, sde, n = independent_mixture(), make_sde(sde_name), 1000
    mask = torch.tensor([True, True, False, False])
    known = gm.sample(n, gen(3), dtype=F64)
    cond = gm.condition(mask, known[0])
    torch.testing.assert_close(gm.condition(mask, known[1]).weights, cond.weights)  # the case's premise
    res = inpaint(gm.score_fn(sde), sde, known, mask, method, generator=gen(0), **kw)
    z = mmd_z(res.x[:, 2:], cond)
    assert z < Z_MAX, f"{sde_name} {method} {kw}: MMD^2 {z:.1f} null sd above the exact conditional"


# --- against the exact conditional: an informative observation (the method is biased) ----------------------
def two_modes(b: float) -> GaussianMixture:
    """D = 2, components N((1, b), 0.3^2 I), N((-1, -b), 0.3^2 I), equal weights. Observing x_0 = 0.3 puts
    0.9987 of the exact conditional's weight on the first component (mode x_1 ~ +b)."""
    return GaussianMixture(torch.tensor([[1.0, b], [-1.0, -b]], dtype=F64), torch.tensor([0.3, 0.3], dtype=F64))


def wrong_side(b: float, method: str, n: int = 1000, seed: int = 0, **kw):
    """``(P(x_1 < 0) of the inpainted samples, exact P(x_1 < 0 | x_0 = 0.3), the samples)`` under VP."""
    gm, sde = two_modes(b), VPSDE()
    known, mask = torch.full((n, 2), 0.3, dtype=F64), torch.tensor([True, False])
    cond = gm.condition(mask, known[0])
    exact = float((cond.weights * Normal(0.0, 1.0).cdf(-cond.means[:, 0] / cond.stds)).sum())
    x = inpaint(gm.score_fn(sde), sde, known, mask, method, generator=gen(seed), **kw).x
    return float((x[:, 1] < 0).double().mean()), exact, x, cond


def se(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 1e-4) / n)


def test_informative_observation_biases_the_replacement_method():
    """Measured (n = 1000, VP; seeds 0-2, VP / sub-VP / VE alike): with modes at x_1 = +-2 the exact conditional puts
    0.0013 of its mass at x_1 < 0, the replacement method 0.42-0.46 (PC, 100 steps) and 0.46-0.47 (ODE, Heun 50
    steps): it hardly uses the observation, since x_1 picks its mode while the noisy x_t[0] carries little of it.
    With modes at +-0.5 (exact 0.049) the error drops to 0.12-0.19."""
    n = 1000
    p_pc, exact, x_pc, cond = wrong_side(2.0, "pc", n, steps=100)
    p_ode, _, _, _ = wrong_side(2.0, "ode", n, steps=50)
    assert exact < 0.002
    for name, p in (("pc", p_pc), ("ode", p_ode)):
        assert p - exact > 10 * se(p, n), f"{name}: {p:.3f} on the wrong mode vs exact {exact:.4f}"
    # the same two-sample statistic that passes in the independent case rejects these samples
    assert mmd_z(x_pc[:, 1:], cond) > 5 * Z_MAX
    # a smaller separation of the unobserved modes reduces the bias (0.42 -> 0.12-0.19 measured)
    p_near, exact_near, _, _ = wrong_side(0.5, "pc", n, steps=100)
    assert (p_near - exact_near) < (p_pc - exact) - 5 * math.hypot(se(p_near, n), se(p_pc, n))


def test_more_corrector_steps_reduce_the_bias():
    """Modes at +-1 (exact 0.0017 on x_1 < 0), PC 100 steps: 0.25-0.26 with 1 Langevin step, 0.17-0.21 with 5
    (seeds 0-2, VP / sub-VP / VE)."""
    n = 1000
    p1, exact, _, _ = wrong_side(1.0, "pc", n, steps=100, n_steps=1)
    p5, _, _, _ = wrong_side(1.0, "pc", n, steps=100, n_steps=5)
    assert p5 < p1 - 2 * math.hypot(se(p1, n), se(p5, n)), f"1 corrector step {p1:.3f}, 5 steps {p5:.3f}"
    assert p5 - exact > 10 * se(p5, n)  # still biased


@pytest.mark.slow
def test_corrector_sweep_bias():
    """Modes at +-1, PC 200 steps, n = 2000: measured 0.225 / 0.156 / 0.064 on the wrong side for 1 / 5 / 20
    corrector steps, exact 0.0017: the bias falls with mixing but stays measurable (se 0.005 at 20 steps). (With modes
    at +-0.5 and 20 corrector steps, n = 1000, it was within one standard error of the exact 0.049: 0.042.)"""
    n = 2000
    ps = [wrong_side(1.0, "pc", n, steps=200, n_steps=k)[:2] for k in (1, 5, 20)]
    exact = ps[0][1]
    ps = [p for p, _ in ps]
    for a, b in zip(ps, ps[1:]):
        assert b < a - 3 * math.hypot(se(a, n), se(b, n)), f"wrong-side mass for 1/5/20 corrector steps: {ps}"
    assert ps[-1] - exact > 5 * se(ps[-1], n)


# --- colourisation --------------------------------------------------------------------------------
def test_colorization_matrix_orthogonal_with_grey_first_row():
    M = colorization_matrix(F64)
    torch.testing.assert_close(M @ M.T, torch.eye(3, dtype=F64), rtol=0, atol=1e-15)
    torch.testing.assert_close(M[0], torch.full((3,), 1 / math.sqrt(3), dtype=F64))
    assert torch.equal(M, torch.tensor(COLORIZATION_MATRIX, dtype=F64))
    x = torch.randn(5, 3, 2, 2, generator=gen(0), dtype=F64)
    torch.testing.assert_close(_from_decoupled(_to_decoupled(x, M), M), x)
    torch.testing.assert_close(_to_decoupled(x, M)[:, 0], math.sqrt(3) * x.mean(1))


@functools.lru_cache(maxsize=None)
def colour_mixtures():
    """A 3-channel 2x2 toy GMM (D = 12) built in decoupled coordinates u = M x: the grey channel u_0 (4 coords) a
    2-component mixture independent of the colour channels u_1, u_2 (8 coords), a 3-component mixture, std 0.3.
    Returns (the mixture of u, the mixture of x = M^T u), both flattened channel-major as (B, 3, 2, 2)."""
    g = gen(11)
    grey = torch.randn(2, 4, generator=g, dtype=F64)
    colour = 1.5 * torch.randn(3, 8, generator=g, dtype=F64)
    gm_u = product_mixture(grey, torch.tensor([0.4, 0.6], dtype=F64), colour, torch.tensor([0.5, 0.3, 0.2], dtype=F64), 0.3)
    M = colorization_matrix(F64)
    means_x = _from_decoupled(gm_u.means.reshape(-1, 3, 2, 2), M).reshape(gm_u.K, 12)
    return gm_u, GaussianMixture(means_x, gm_u.stds, gm_u.weights)


@pytest.mark.parametrize("sde_name", ["vp", "ve"])
def test_decoupled_score_is_the_exact_score_of_u(sde_name):
    gm_u, gm_x = colour_mixtures()
    sde, M = make_sde(sde_name), colorization_matrix(F64)
    u = torch.randn(8, 3, 2, 2, generator=gen(1), dtype=F64)
    t = torch.rand(8, generator=gen(2), dtype=F64) * 0.9 + 0.05
    torch.testing.assert_close(_decoupled_score(gm_x.score_fn(sde), M)(u, t), gm_u.score(u, t, sde), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("method", ["pc", "ode"])
@pytest.mark.parametrize("dtype,atol", [(F64, 1e-13), (torch.float32, 2e-6)])
def test_colorize_channel_mean_equals_gray(method, dtype, atol):
    _, gm_x = colour_mixtures()
    sde = VPSDE()
    gray = gm_x.sample(5, gen(5), dtype=dtype).reshape(5, 3, 2, 2).mean(1, keepdim=True)
    counter = Counter(gm_x.score_fn(sde))
    res = colorize(counter, sde, gray, method, steps=10, generator=gen(0))
    assert res.x.shape == (5, 3, 2, 2) and res.x.dtype == dtype and res.nfe == counter.calls
    torch.testing.assert_close(res.x.mean(1, keepdim=True), gray, rtol=0, atol=atol)
    assert res.x.std(1).min() > 1e-3  # colour was added, not only grey copied to three channels


@pytest.mark.parametrize("method,kw", [("ode", {"steps": 25}), pytest.param("pc", {"steps": 200}, marks=pytest.mark.slow)])
def test_colorize_reaches_noise_floor_of_exact_conditional(method, kw):
    """Grey independent of colour: the exact conditional of (u_1, u_2) given the grey values is their marginal, so
    colourised samples (each with its own grey image) must match ``gm_u.condition(grey mask, values)``."""
    gm_u, gm_x = colour_mixtures()
    sde, n, M = VPSDE(), 1000, colorization_matrix(F64)
    gray = gm_x.sample(n, gen(6), dtype=F64).reshape(n, 3, 2, 2).mean(1, keepdim=True)
    res = colorize(gm_x.score_fn(sde), sde, gray, method, generator=gen(0), **kw)
    mask_u = torch.zeros(3, 2, 2, dtype=torch.bool)
    mask_u[0] = True
    cond = gm_u.condition(mask_u, math.sqrt(3) * gray[0, 0].reshape(-1))
    torch.testing.assert_close(gm_u.condition(mask_u, math.sqrt(3) * gray[1, 0].reshape(-1)).weights, cond.weights)
    u = _to_decoupled(res.x, M)
    z = mmd_z(u[:, 1:].reshape(n, 8), cond)
    assert z < Z_MAX, f"colorize {method}: MMD^2 {z:.1f} null sd above the exact conditional"


# --- bad input: refused before any score call ---------------------------------------------------------
def _never(x, t):
    raise AssertionError("score_fn called before the input was validated")


BAD = [
    ({"method": "sde"}, ValueError, "method must be one of"),
    ({"steps": 0}, ValueError, "steps must be an integer"),
    ({"steps": 2.5}, ValueError, "steps must be an integer"),
    ({"eps": 0.0}, ValueError, "eps must be"),
    ({"eps": 1.0}, ValueError, "eps must lie in"),
    ({"denoise": 1}, ValueError, "denoise must be True or False"),
    ({"predictor": "rk4"}, ValueError, "predictor must be one of"),
    ({"corrector": "hmc"}, ValueError, "corrector must be one of"),
    ({"predictor": "none", "corrector": "none"}, ValueError, "cannot both be 'none'"),
    ({"snr": -0.1}, ValueError, "snr must be"),
    ({"n_steps": 0}, ValueError, "n_steps must be an integer"),
    ({"langevin_norm": "global"}, ValueError, "langevin_norm must be one of"),
    ({"schedule": "cosine"}, ValueError, "schedule must be one of"),
    ({"method": "ode", "ode_step": "rk4"}, ValueError, "ode_step must be one of"),
    ({"method": "ode", "predictor": "rk4"}, ValueError, "predictor must be one of"),  # checked whatever the method
    ({"sde": "vp"}, TypeError, "sde must be a VPSDE"),
    ({"score_fn": 3}, TypeError, "score_fn must be callable"),
    ({"known": [[0.0, 1.0]]}, TypeError, "known must be a tensor"),
    ({"known": torch.zeros(2, 4, dtype=torch.long)}, TypeError, "known must be a floating tensor"),
    ({"known": torch.zeros(4)}, ValueError, "known must have shape"),
    ({"mask": torch.ones(4)}, TypeError, "mask must be a bool tensor"),
    ({"mask": [True, False, True, False]}, TypeError, "mask must be a bool tensor"),
    ({"mask": torch.ones(3, dtype=torch.bool)}, ValueError, "mask must be broadcastable"),
    ({"mask": torch.ones(5, 2, 4, dtype=torch.bool)}, ValueError, "mask must be broadcastable"),
    ({"known": torch.tensor([[float("nan"), 0.0, 0.0, 0.0]] * 2)}, ValueError, "known must be finite where mask"),
    ({"generator": [gen(0)]}, ValueError, "one torch.Generator per sample"),
    ({"generator": 3}, TypeError, "generator must be"),
    ({"ode_step": "heun", "bogus": 1}, TypeError, "bogus"),
]


@pytest.mark.parametrize("change,exc,match", BAD, ids=[",".join(c) + f"-{i}" for i, (c, _, _) in enumerate(BAD)])
def test_bad_input_raises_before_any_score_call(change, exc, match):
    args = {"score_fn": _never, "sde": VPSDE(), "known": torch.zeros(2, 4, dtype=F64),
            "mask": torch.tensor([True, False, True, False]), "method": "pc", "steps": 5, "generator": None}
    args.update(change)
    with pytest.raises(exc, match=match):
        inpaint(**args)


@pytest.mark.parametrize("gray,exc,match", [
    (torch.zeros(2, 3, 2, 2), ValueError, r"gray must have shape \(B, 1, \*spatial\)"),
    (torch.zeros(2, 4), ValueError, "gray must have shape"),
    (torch.zeros(2, 1, 2, 2, dtype=torch.int64), TypeError, "gray must be a floating tensor"),
    ("gray", TypeError, "gray must be a tensor"),
    (torch.full((2, 1, 2, 2), float("inf")), ValueError, "gray must be finite"),
])
def test_colorize_bad_gray(gray, exc, match):
    with pytest.raises(exc, match=match):
        colorize(_never, VPSDE(), gray)


def test_colorize_bad_options_before_any_score_call():
    with pytest.raises(ValueError, match="method must be one of"):
        colorize(_never, VPSDE(), torch.zeros(2, 1, 2, 2), method="ddim")
    with pytest.raises(TypeError, match="sde must be"):
        colorize(_never, None, torch.zeros(2, 1, 2, 2))
