"""Guidance as score transforms (scoresde.samplers.guidance) against exact answers.

Classifier-free guidance on two Gaussians with one std has a closed-form target N(mu_w, s^2 I)
(``oracle.cfg_gaussian_target``): the guided score equals its score at every t, and DPM-Solver / ODE / PC on VP,
sub-VP and VE reach its MMD^2 noise floor. ``w = 0`` is the conditional score bitwise; the guided score costs one
counted call of ``2B`` rows per evaluation. Classifier guidance with the oracle's exact ``p_t(y | x)`` and ``w = 1`` is
the exact class-conditional score. ``model_label_score`` drives a class-conditional network.
"""

from __future__ import annotations

import pytest
import torch

from scoresde import GaussianMixture, SubVPSDE, VESDE, VPSDE
from scoresde.model import ScoreModel
from scoresde.metrics import median_bandwidth, mmd2_unbiased
from scoresde.nets import DiT
from scoresde.oracle import cfg_gaussian_target, labelled_score_fn
from scoresde.samplers import cfg_score_fn, classifier_guided_score_fn, model_label_score, sample

F64 = torch.float64
Z_MAX = 5.0  # as tests/test_samplers.py: "at the floor" = MMD^2 below 5 sd of the data-vs-data statistic
N = 1000
METHODS = {"dpm_solver": {"steps": 20}, "ode": {}, "pc": {"steps": 500}}  # tests/test_samplers.py's floor settings
CASES = [(sde, m) for sde in ("vp", "subvp", "ve") for m in METHODS if not (sde == "ve" and m == "dpm_solver")]
FAST_CASES = [("vp", "pc"), ("subvp", "dpm_solver"), ("ve", "ode")]
SDE_NAMES = ("vp", "subvp", "ve")
CLASSES = [[0, 2], [1, 3]]


def make_sde(name):
    return {"vp": VPSDE(), "subvp": SubVPSDE(), "ve": VESDE(sigma_min=0.01, sigma_max=20.0)}[name]


def mixture() -> GaussianMixture:
    g = torch.Generator().manual_seed(1)
    return GaussianMixture(2.0 * torch.randn(4, 2, generator=g, dtype=F64), 0.2 + 0.3 * torch.rand(4, generator=g, dtype=F64),
                           0.5 + torch.rand(4, generator=g, dtype=F64))


def gaussian_pair():
    """cond N((0.3, 0.2), 0.5^2 I) (label 0), uncond N((0.7, 0.4), 0.5^2 I) (the null label 1): mu_w = (-0.1, 0) at
    w = 1, (-0.9, -0.4) at w = 3. The targets sit near the origin on purpose: VE's prior N(0, sigma_max^2 I) ignores
    the data mean, and the PF-ODE carries that into a mean error of about |mu| s / sigma_max (0.15 for |mu_w| = 5.9,
    s = 0.5, sigma_max = 20: 9 standard errors at N = 1000, which the floor test detects)."""
    return (GaussianMixture(torch.tensor([[0.3, 0.2]], dtype=F64), torch.tensor([0.5], dtype=F64)),
            GaussianMixture(torch.tensor([[0.7, 0.4]], dtype=F64), torch.tensor([0.5], dtype=F64)))


_FLOORS: dict = {}


def floor_z(x, target: GaussianMixture, key: str) -> float:
    """MMD^2 of ``x`` against ``N`` samples of ``target`` in sd of the data-vs-data statistic (10 pairs), cached by key."""
    if key not in _FLOORS:
        data = [target.sample(N, torch.Generator().manual_seed(100 + i), dtype=F64) for i in range(11)]
        bw = [median_bandwidth(data[0], data[1]) * c for c in (0.25, 0.5, 1.0, 2.0, 4.0)]
        _FLOORS[key] = data[0], bw, float(torch.stack([mmd2_unbiased(data[0], d, bw) for d in data[1:]]).std())
    data, bw, sd = _FLOORS[key]
    assert torch.isfinite(x).all()
    return float(mmd2_unbiased(x, data, bw)) / sd


def random_xt(sde, D=2, n=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(n, generator=g, dtype=F64) * 0.999 + 1e-3
    return torch.randn(n, D, generator=g, dtype=F64) * sde.marginal_coef(t)[1][:, None].clamp(min=1.0) * 2, t


class Recorder:
    """Wraps a labelled score and records the batch size of every call."""

    def __init__(self, cond_score):
        self.cond_score, self.sizes = cond_score, []

    def __call__(self, x, t, y):
        self.sizes.append(x.shape[0])
        return self.cond_score(x, t, y)


# --- classifier-free guidance ----------------------------------------------------------------------------
@pytest.mark.parametrize("sde_name", SDE_NAMES)
@pytest.mark.parametrize("w", [0.0, 1.0, 3.0])
def test_cfg_of_gaussian_pair_is_score_of_closed_form_target(sde_name, w):
    sde = make_sde(sde_name)
    cond, uncond = gaussian_pair()
    guided = cfg_score_fn(labelled_score_fn([cond, uncond], sde), 0, w, null_label=1)
    x, t = random_xt(sde)
    ref = cfg_gaussian_target(cond, uncond, w).score(x, t, sde)
    torch.testing.assert_close(guided(x, t), ref, rtol=1e-12, atol=1e-12 * float(ref.abs().max()))


_CFG_GRID = [pytest.param(s, m, w, marks=() if ((s, m) in FAST_CASES and w == 3.0) or (s, m, w) == ("vp", "dpm_solver", 1.0)
                          else pytest.mark.slow) for (s, m) in CASES for w in (0.0, 1.0, 3.0)]


@pytest.mark.parametrize("sde_name,method,w", _CFG_GRID)
def test_cfg_samplers_reach_guided_target_floor(sde_name, method, w):
    """Samples with the guided score reach the floor of N(mu_w, s^2 I), mu_w = (1 + w) mu_c - w mu_u; NFE as counted."""
    sde = make_sde(sde_name)
    cond, uncond = gaussian_pair()
    rec = Recorder(labelled_score_fn([cond, uncond], sde))
    res = sample(cfg_score_fn(rec, 0, w, null_label=1), sde, (N, 2), method=method, generator=torch.Generator().manual_seed(5),
                 dtype=F64, **METHODS[method])
    target = cfg_gaussian_target(cond, uncond, w)
    z = floor_z(res.x, target, f"cfg{w}")
    assert z < Z_MAX, f"{sde_name} {method} w={w}: MMD^2 at {z:.1f} null sd of N(mu_w, s^2 I)"
    assert res.nfe == len(rec.sizes) and set(rec.sizes) == {N if w == 0 else 2 * N}


@pytest.mark.parametrize("w", [1.0, 3.0])
def test_cfg_floor_test_has_power(w):
    """Neither the conditional nor the unconditional distribution passes for the guided target."""
    cond, uncond = gaussian_pair()
    target = cfg_gaussian_target(cond, uncond, w)
    for other in (cond, uncond):
        assert floor_z(other.sample(N, torch.Generator().manual_seed(9), dtype=F64), target, f"cfg{w}") > 3 * Z_MAX


@pytest.mark.parametrize("method,kw", [("dpm_solver", {"steps": 10}), ("pc", {"steps": 6}), ("ode", {}),
                                       ("ode", {"ode_method": "rk4", "steps": 5})])
@pytest.mark.parametrize("w", [0.0, 2.0])
def test_cfg_costs_the_nfe_it_reports(method, kw, w):
    """One counted NFE = one call of cond_score with 2B rows (B rows when w = 0)."""
    sde, gm = VPSDE(), mixture()
    rec = Recorder(gm.label_score_fn(sde, CLASSES))
    y = torch.tensor([0, 1, 1, 0, 1])
    res = sample(cfg_score_fn(rec, y, w, null_label=2), sde, (5, 2), method=method, generator=torch.Generator().manual_seed(0),
                 dtype=F64, **kw)
    assert res.nfe == len(rec.sizes) > 0
    assert rec.sizes == [10 if w else 5] * res.nfe


@pytest.mark.parametrize("method", ["dpm_solver", "pc"])
def test_cfg_w0_is_the_conditional_model_bitwise(method):
    """w = 0 reproduces the conditional network's samples bit for bit (only the B conditional rows are evaluated)."""
    model = tiny_conditional_model(dtype=torch.float32)
    cs = model_label_score(model)
    y = torch.tensor([0, 2, 1, 0])
    kw = dict(method=method, steps=8, generator=torch.Generator().manual_seed(3))
    a = sample(cfg_score_fn(cs, y, 0.0, null_label=3), model.sde, (4, 1, 4, 4), **kw)
    b = sample(lambda x, t: cs(x, t, y), model.sde, (4, 1, 4, 4), generator=torch.Generator().manual_seed(3),
               method=method, steps=8)
    assert torch.equal(a.x, b.x) and a.nfe == b.nfe


def test_cfg_of_a_network_is_the_two_scores_combined():
    model = tiny_conditional_model(dtype=F64)
    cs = model_label_score(model)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(6, 1, 4, 4, generator=g, dtype=F64), torch.rand(6, generator=g, dtype=F64)
    y = torch.tensor([0, 1, 2, 2, 1, 0])
    s_c, s_u = cs(x, t, y), cs(x, t, torch.full((6,), 3))
    assert (s_c - s_u).abs().max() > 1e-3  # the labels matter
    for w, yy in ((2.0, y), (0.5, 1)):
        s_c = cs(x, t, y if torch.is_tensor(yy) else torch.full((6,), yy))
        torch.testing.assert_close(cfg_score_fn(cs, yy, w, 3)(x, t), (1 + w) * s_c - w * s_u, rtol=1e-12, atol=1e-12)
    # a scalar t is broadcast
    torch.testing.assert_close(cfg_score_fn(cs, y, 1.0, 3)(x, torch.tensor(0.3, dtype=F64)),
                               cfg_score_fn(cs, y, 1.0, 3)(x, torch.full((6,), 0.3, dtype=F64)))


# --- model_label_score ---------------------------------------------------------------------------------
def tiny_conditional_model(dtype, num_classes=3):
    net = DiT(in_channels=1, image_size=4, patch_size=2, hidden_size=16, depth=1, num_heads=2, num_classes=num_classes, seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # move every weight off its (partly zero) initialisation so the labels change the output
        for p in net.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return ScoreModel(net, VPSDE(), "eps").to(dtype).eval()


def test_model_label_score_passes_labels_to_the_network():
    model = tiny_conditional_model(dtype=F64)
    cs = model_label_score(model)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(4, 1, 4, 4, generator=g, dtype=F64), torch.rand(4, generator=g, dtype=F64)
    y = torch.tensor([0, 1, 2, 3])  # 3 = the null label
    out = cs(x, t, y)
    with model.conditioned(class_labels=y):
        ref = model.score_fn(x, t)
    assert torch.equal(out, ref)
    assert torch.equal(cs(x, t, torch.full((4,), 3)), model.score_fn(x, t))  # the net's default is the null class
    with pytest.raises(ValueError, match=r"y must lie in \[0, 3\]"):
        cs(x, t, torch.tensor([0, 1, 2, 4]))
    with pytest.raises(ValueError, match=r"y must have shape \(B,\) = \(4,\)"):
        cs(x, t, torch.tensor([0, 1]))
    uncond = ScoreModel(DiT(in_channels=1, image_size=4, patch_size=2, hidden_size=16, depth=1, num_heads=2), VPSDE())
    with pytest.raises(ValueError, match="num_classes is None"):
        model_label_score(uncond)
    with pytest.raises(TypeError, match="ScoreModel"):
        model_label_score(lambda x, t: x)


# --- classifier guidance -------------------------------------------------------------------------------
@pytest.mark.parametrize("sde_name", SDE_NAMES)
def test_classifier_guidance_with_exact_classifier_is_class_score(sde_name):
    """s + grad log p_t(y | x) (w = 1) is the class-conditional score; any w gives s + w (s_y - s)."""
    sde, gm = make_sde(sde_name), mixture()
    x, t = random_xt(sde, seed=2)
    s = gm.score_fn(sde)
    clf = gm.class_log_prob_fn(sde, CLASSES)
    for y in (0, 1):
        ref = gm.class_score_fn(sde, CLASSES[y])(x, t)
        torch.testing.assert_close(classifier_guided_score_fn(s, clf, y, 1.0)(x, t), ref, rtol=1e-10, atol=1e-10 * float(ref.abs().max()))
        torch.testing.assert_close(classifier_guided_score_fn(s, clf, y, 2.5)(x, t), s(x, t) + 2.5 * (ref - s(x, t)), rtol=1e-10,
                                   atol=1e-10 * float(ref.abs().max()))
    # per-sample labels, logits (log-probabilities shifted per row) instead of log-probabilities, and under no_grad
    y = torch.arange(128) % 2
    logits = lambda x, t: clf(x, t) + 3.0 * x.sum(1, keepdim=True)  # noqa: E731
    with torch.no_grad():
        out = classifier_guided_score_fn(s, logits, y, 1.0)(x, t)
    assert not out.requires_grad
    ref = gm.label_score_fn(sde, CLASSES)(x, t, y)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10 * float(ref.abs().max()))


def test_classifier_guidance_w0_skips_the_classifier():
    sde, gm = VPSDE(), mixture()
    x, t = random_xt(sde)

    def clf(x, t):
        raise AssertionError("the classifier must not be called at w = 0")

    assert torch.equal(classifier_guided_score_fn(gm.score_fn(sde), clf, 1, 0)(x, t), gm.score(x, t, sde))


_CG_FAST = [("vp", "dpm_solver"), ("subvp", "ode"), ("ve", "ode")]  # PC (1001 autograd NFE) only in the slow grid


@pytest.mark.parametrize("sde_name,method", [pytest.param(*c, marks=() if c in _CG_FAST else pytest.mark.slow) for c in CASES])
def test_classifier_guided_samplers_reach_class_floor(sde_name, method):
    sde, gm = make_sde(sde_name), mixture()
    guided = classifier_guided_score_fn(gm.score_fn(sde), gm.class_log_prob_fn(sde, CLASSES), 1, 1.0)
    res = sample(guided, sde, (N, 2), method=method, generator=torch.Generator().manual_seed(5), dtype=F64, **METHODS[method])
    z = floor_z(res.x, gm.subset(CLASSES[1]), "class1")
    assert z < Z_MAX, f"{sde_name} {method}: MMD^2 at {z:.1f} null sd of p_0(x | y = 1)"


# --- errors --------------------------------------------------------------------------------------------
def test_guidance_bad_input():
    sde, gm = VPSDE(), mixture()
    cs, s, clf = gm.label_score_fn(sde, CLASSES), gm.score_fn(sde), gm.class_log_prob_fn(sde, CLASSES)
    for w in (float("nan"), float("inf"), -0.5, True, "1", None):
        with pytest.raises(ValueError, match="w must be a finite number >= 0"):
            cfg_score_fn(cs, 0, w, 2)
        with pytest.raises(ValueError, match="w must be a finite number >= 0"):
            classifier_guided_score_fn(s, clf, 0, w)
    for y in (1.5, True, torch.tensor([0.0, 1.0]), torch.zeros(2, 2, dtype=torch.long), torch.tensor([True, False])):
        with pytest.raises(ValueError, match="y must be an int or an integer tensor"):
            cfg_score_fn(cs, y, 1.0, 2)
    for y in (-1, 2, 3, torch.tensor([0, 2])):
        with pytest.raises(ValueError, match=r"y must lie in \[0, 1\]"):
            cfg_score_fn(cs, y, 1.0, 2)
    with pytest.raises(ValueError, match="y must lie in >= 0"):
        classifier_guided_score_fn(s, clf, -1, 1.0)
    for null in (0, True, 2.0, None):
        with pytest.raises(ValueError, match="null_label must be an integer >= 1"):
            cfg_score_fn(cs, 0, 1.0, null)
    with pytest.raises(TypeError, match="cond_score must be callable"):
        cfg_score_fn(None, 0, 1.0, 2)
    with pytest.raises(TypeError, match="log_prob_fn must be callable"):
        classifier_guided_score_fn(s, None, 0, 1.0)
    x, t = random_xt(sde, n=4)
    with pytest.raises(ValueError, match=r"y must have shape \(B,\) = \(4,\)"):
        cfg_score_fn(cs, torch.tensor([0, 1, 0]), 1.0, 2)(x, t)
    with pytest.raises(ValueError, match=r"y must lie in \[0, 1\] \(the classifier's K = 2"):
        classifier_guided_score_fn(s, clf, 2, 1.0)(x, t)
    with pytest.raises(ValueError, match=r"must return \(B, K\)"):
        classifier_guided_score_fn(s, lambda x, t: clf(x, t)[:, 0], 0, 1.0)(x, t)
    # a 0-d integer tensor is an int label
    torch.testing.assert_close(cfg_score_fn(cs, torch.tensor(1), 1.0, 2)(x, t), cfg_score_fn(cs, 1, 1.0, 2)(x, t))
