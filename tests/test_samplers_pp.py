"""The few-step samplers (DPM-Solver++, UniPC, adaptive DPM-Solver, EDM's stochastic sampler) against exact answers:
convergence order to a tight probability-flow solution of the Gaussian-mixture oracle, identities with the existing
solvers (DPM-Solver++-1 = DDIM, EDM with S_churn = 0 = Heun bitwise, DPM-Solver++ -> DPM-Solver), MMD^2 at the
data-vs-data noise floor, NFE by counting, per-sample seeding, validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_samplers import F64, assert_at_noise_floor, draw, make_sde, mixture, pf_reference

from scoresde import VESDE, VPSDE, GaussianMixture
from scoresde.samplers import METHOD_OPTIONS, SAMPLERS, check_sample_options, sample
from scoresde.samplers.dpm_solver_pp import dynamic_threshold

NEW = ("dpm_solver_pp", "dpm_solver_adaptive", "unipc", "edm")
ALL_SDES = ("vp", "subvp", "ve")


def _slope(steps, errs):
    return -np.polyfit(np.log(steps), np.log(errs), 1)[0]


# --- convergence order to the PF-ODE solution (rtol = atol = 1e-11) --------------------------------------------
CONVERGENCE = [
    # (method, options, steps, order)
    ("dpm_solver_pp", {"order": 1}, [80, 160, 320], 1),
    ("dpm_solver_pp", {"order": 2}, [16, 32, 64, 128], 2),
    ("dpm_solver_pp", {"order": 3}, [32, 64, 128], 3),
    ("dpm_solver_pp", {"order": 2, "multistep": False}, [16, 32, 64, 128], 2),
    ("dpm_solver_pp", {"order": 3, "multistep": False}, [32, 64, 128], 3),
    ("unipc", {"order": 1}, [16, 32, 64, 128], 2),  # UniC raises UniP-p to order p + 1
    ("unipc", {"order": 2}, [16, 32, 64, 128], 3),
    ("unipc", {"order": 2, "variant": "bh2"}, [32, 64, 128, 256], 3),
    ("unipc", {"order": 2, "prediction": "noise"}, [32, 64, 128, 256], 3),
    ("unipc", {"order": 2, "corrector": False}, [32, 64, 128], 2),
    ("unipc", {"order": 3, "corrector": False}, [32, 64, 128], 3),
]


# the longest cases (many steps, 3 calls a step) run with the slow suite; order 1 is also DDIM (tested exactly below)
_SLOW_CONVERGENCE = {("dpm_solver_pp", "{'order': 1}"), ("dpm_solver_pp", "{'order': 3, 'multistep': False}")}
_CONV = [pytest.param(*c, id=f"{c[0]}-{c[1]}", marks=[pytest.mark.slow] if (c[0], str(c[1])) in _SLOW_CONVERGENCE else [])
         for c in CONVERGENCE]


@pytest.mark.parametrize("method,kw,steps,order", _CONV)
def test_convergence_order(method, kw, steps, order):
    for name in ALL_SDES:
        sde, sf, xT, ref = pf_reference(name)
        errs = [float((sample(sf, sde, xT.shape, method=method, steps=s, x_T=xT, **kw).x - ref).abs().max()) for s in steps]
        assert abs(_slope(steps, errs) - order) <= 0.35, f"{name} {method} {kw}: order {_slope(steps, errs):.2f}, expected {order} ({errs})"


def test_unipc3_beats_third_order():
    """UniPC-3 (UniP-3 + UniC-3) is of order 4 in the bulk of the steps; its lower-order warm-up steps cap the
    asymptotic order at 3, so: fitted order above 3.3 over 24..96 steps and smaller errors than DPM-Solver++(3M)."""
    for name in ALL_SDES:
        sde, sf, xT, ref = pf_reference(name)
        steps = [24, 48, 96]
        errs = [float((sample(sf, sde, xT.shape, method="unipc", steps=s, x_T=xT, order=3).x - ref).abs().max()) for s in steps]
        pp = [float((sample(sf, sde, xT.shape, method="dpm_solver_pp", steps=s, x_T=xT, order=3).x - ref).abs().max()) for s in steps]
        assert _slope(steps, errs) >= 3.3, f"{name}: UniPC-3 order {_slope(steps, errs):.2f} ({errs})"
        assert all(e < p for e, p in zip(errs, pp)), f"{name}: UniPC-3 {errs} vs DPM-Solver++(3M) {pp}"


@pytest.mark.parametrize("order,prediction", [(3, "noise"), pytest.param(3, "data", marks=pytest.mark.slow),
                                              pytest.param(2, "noise", marks=pytest.mark.slow),
                                              pytest.param(2, "data", marks=pytest.mark.slow)])
def test_adaptive_error_follows_the_tolerance(order, prediction):
    """Global error within a few tolerances of the PF-ODE solution; a tighter tolerance costs more calls."""
    for name in ALL_SDES:
        sde, sf, xT, ref = pf_reference(name)
        nfes = []
        for tol in (1e-3, 1e-4):
            r = sample(sf, sde, xT.shape, method="dpm_solver_adaptive", x_T=xT, order=order, prediction=prediction, rtol=tol, atol=tol)
            err = float((r.x - ref).abs().max())
            assert err < 5 * tol, f"{name} order {order} {prediction} tol {tol}: error {err:.1e}"
            assert r.nfe == order * (r.info["accepted"] + r.info["rejected"])
            nfes.append(r.nfe)
        assert nfes[1] > nfes[0]


# --- identities ----------------------------------------------------------------------------------------------
def test_dpm_solver_pp_1_equals_ddim():
    """Order 1 of the data-prediction solver is DDIM (eta = 0) in exact arithmetic; here to float64 rounding."""
    for name in ("vp", "subvp"):
        sde, sf, xT, _ = pf_reference(name)
        for schedule in ("time_uniform", "logSNR", "karras"):
            a = sample(sf, sde, xT.shape, method="ddim", steps=25, schedule=schedule, x_T=xT).x
            for ms in (False, True):
                b = sample(sf, sde, xT.shape, method="dpm_solver_pp", steps=25, order=1, multistep=ms, schedule=schedule, x_T=xT).x
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("order", [2, 3])
def test_dpm_solver_pp_and_dpm_solver_agree_in_the_limit(order):
    """Data and noise prediction solve the same ODE: their difference vanishes at the solvers' order."""
    for name in ("vp", "subvp"):
        sde, sf, xT, ref = pf_reference(name)
        steps = [32, 64, 128, 256]
        diffs = []
        for s in steps:
            a = sample(sf, sde, xT.shape, method="dpm_solver_pp", steps=s, order=order, x_T=xT).x
            b = sample(sf, sde, xT.shape, method="dpm_solver", steps=s, order=order, x_T=xT).x
            diffs.append(float((a - b).abs().max()))
        assert _slope(steps[-2:], diffs[-2:]) >= order - 0.35, f"{name}: difference {diffs}"
        assert diffs[-1] < 1e-3 * float(ref.abs().max())


@pytest.mark.parametrize("name", ALL_SDES)
@pytest.mark.parametrize("schedule", ["karras", "logSNR", "time_uniform"])
def test_edm_without_churn_is_heun_bitwise(name, schedule):
    sde, sf, xT, _ = pf_reference(name)
    for dtype in (torch.float64, torch.float32):
        x = xT.to(dtype)
        a = sample(sf, sde, x.shape, method="heun", steps=11, schedule=schedule, x_T=x, denoise=True)
        for kw in ({}, {"S_churn": 0.0, "S_noise": 1.007}, {"S_churn": 40.0, "S_tmin": 1e6}, {"S_churn": 40.0, "S_tmax": 1e-6}):
            b = sample(sf, sde, x.shape, method="edm", steps=11, schedule=schedule, x_T=x, denoise=True,
                       generator=torch.Generator().manual_seed(0), **kw)
            assert torch.equal(a.x, b.x) and a.nfe == b.nfe, f"{name} {schedule} {dtype} {kw}"


def test_edm_churn_changes_the_path_and_is_batch_independent():
    sde = VPSDE()
    sf = mixture(2).score_fn(sde)
    xT = sde.prior_sampling((6, 2), torch.Generator().manual_seed(0), dtype=F64)
    kw = dict(method="edm", steps=10, S_churn=20.0, x_T=xT)
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    full = sample(sf, sde, xT.shape, generator=gens(range(6)), **kw).x
    half = sample(sf, sde, (3, 2), generator=gens(range(3, 6)), **{**kw, "x_T": xT[3:]}).x
    torch.testing.assert_close(full[3:], half, rtol=1e-12, atol=1e-12)
    heun = sample(sf, sde, xT.shape, method="heun", steps=10, x_T=xT).x
    assert (full - heun).abs().max() > 1e-3


# --- distribution: MMD^2 at the data-vs-data noise floor (D = 2, n = 1000) -----------------------------------
FLOOR_CONFIGS = [
    ("dpm_solver_pp", {"steps": 20}),
    ("dpm_solver_pp", {"steps": 20, "order": 3}),
    ("dpm_solver_pp", {"steps": 7, "order": 3, "multistep": False}),
    ("unipc", {"steps": 20}),
    ("unipc", {"steps": 20, "variant": "bh2"}),
    ("dpm_solver_adaptive", {}),
    ("dpm_solver_adaptive", {"order": 2, "prediction": "data"}),
    ("edm", {"steps": 100, "S_churn": 40.0}),
]


@pytest.mark.parametrize("sde_name", ["vp", pytest.param("subvp", marks=pytest.mark.slow), "ve"])
@pytest.mark.parametrize("method,kw", FLOOR_CONFIGS, ids=[m + "-" + "-".join(f"{k}={v}" for k, v in kw.items()) for m, kw in FLOOR_CONFIGS])
def test_reach_noise_floor(sde_name, method, kw):
    assert_at_noise_floor(draw(sde_name, 2, method, **kw).x, 2, f"{sde_name} {method} {kw}")


def test_unipc_noise_prediction_at_the_floor_with_8_nfe():
    """The issue's goal: a training-free solver at the noise floor with <= 8 NFE (VP, the 2-D mixture)."""
    r = draw("vp", 2, "unipc", steps=8, prediction="noise")
    assert r.nfe == 8
    assert_at_noise_floor(r.x, 2, "vp unipc-3 noise prediction, 8 steps")


# --- thresholding -----------------------------------------------------------------------------------------------
def test_dynamic_threshold():
    x0 = torch.tensor([[0.5, -0.2, 0.9, 0.1], [3.0, -4.0, 0.5, 1.0]], dtype=F64)
    y = dynamic_threshold(x0, 1.0, 2.0)
    torch.testing.assert_close(y[0], x0[0])  # quantile below 1: clip to [-1, 1] changes nothing
    torch.testing.assert_close(y[1], torch.tensor([1.0, -1.0, 0.25, 0.5], dtype=F64))  # c = min(4, 2) = 2


def test_thresholding_bounds_samples_and_leaves_bounded_data_alone():
    sde = VPSDE()
    gm = GaussianMixture(torch.tensor([[0.5, 0.5], [-0.5, -0.4]], dtype=F64), torch.tensor([0.08, 0.08], dtype=F64))
    xT = sde.prior_sampling((500, 2), torch.Generator().manual_seed(0), dtype=F64)
    kw = dict(method="dpm_solver_pp", steps=20, x_T=xT, denoise=True)
    plain = sample(gm.score_fn(sde), sde, xT.shape, **kw).x
    thr = sample(gm.score_fn(sde), sde, xT.shape, thresholding=True, **kw).x
    assert thr.abs().max() <= 1.0 and (thr - plain).abs().max() < 1e-6  # data in [-1, 1]: nothing to clip

    far = GaussianMixture(torch.tensor([[2.5, 2.0], [-2.0, -2.5]], dtype=F64), torch.tensor([0.1, 0.1], dtype=F64))
    wild = sample(far.score_fn(sde), sde, xT.shape, **kw).x  # a model whose data leave [-1, 1]
    tamed = sample(far.score_fn(sde), sde, xT.shape, thresholding=True, **kw).x
    assert wild.abs().max() > 2.0 and tamed.abs().max() <= 1.0 and torch.isfinite(tamed).all()


# --- NFE, registration, validation -------------------------------------------------------------------------------
@pytest.mark.parametrize("method,kw,expected", [
    ("dpm_solver_pp", {"steps": 9}, 9),
    ("dpm_solver_pp", {"steps": 9, "denoise": True}, 10),
    ("dpm_solver_pp", {"steps": 4, "order": 3, "multistep": False}, 12),
    ("dpm_solver_pp", {"steps": 4, "order": 2, "multistep": False}, 8),
    ("unipc", {"steps": 9}, 9),
    ("unipc", {"steps": 9, "corrector": False, "denoise": True}, 10),
    ("edm", {"steps": 9, "S_churn": 5.0}, 18),
])
def test_nfe_is_counted(method, kw, expected):
    sde = VPSDE()
    r = sample(mixture(2).score_fn(sde), sde, (4, 2), method=method, generator=torch.Generator().manual_seed(0), dtype=F64, **kw)
    assert r.nfe == expected


def test_registered_with_their_signatures_and_allowed_on_ve():
    for m in NEW:
        assert m in SAMPLERS and set(METHOD_OPTIONS[m]) >= {"steps", "eps", "denoise"}
        check_sample_options(VESDE(), m)  # written against m(t), s(t): VE is fine


@pytest.mark.parametrize("kw,match", [
    ({"method": "dpm_solver_pp", "order": 4}, "order"),
    ({"method": "dpm_solver_pp", "threshold_ratio": 1.5}, "threshold_ratio"),
    ({"method": "dpm_solver_pp", "threshold_max": 0.5}, "threshold_max"),
    ({"method": "dpm_solver_pp", "thresholding": 1}, "thresholding"),
    ({"method": "unipc", "variant": "bh3"}, "variant"),
    ({"method": "unipc", "prediction": "x0"}, "prediction"),
    ({"method": "unipc", "corrector": "yes"}, "corrector"),
    ({"method": "dpm_solver_adaptive", "steps": 10}, "steps"),
    ({"method": "dpm_solver_adaptive", "order": 1}, "order"),
    ({"method": "dpm_solver_adaptive", "theta": 1.0}, "theta"),
    ({"method": "dpm_solver_adaptive", "rtol": 0.0}, "rtol"),
    ({"method": "edm", "S_churn": -1.0}, "S_churn"),
    ({"method": "edm", "S_noise": 0.0}, "S_noise"),
    ({"method": "edm", "S_tmin": 1.0, "S_tmax": 0.5}, "S_tmax"),
    ({"method": "edm", "order": 2}, "unknown option"),
])
def test_bad_options_raise_before_any_work(kw, match):
    calls = []

    def sf(x, t):
        calls.append(1)
        return -x

    with pytest.raises(ValueError, match=match):
        sample(sf, make_sde("vp"), (4, 2), **kw)
    assert calls == []


def test_adaptive_stops_on_a_non_finite_score():
    sde = VPSDE()

    def bad(x, t):
        return torch.full_like(x, float("nan"))

    with pytest.raises(RuntimeError, match="non-finite"):
        sample(bad, sde, (4, 2), method="dpm_solver_adaptive", dtype=F64)


@pytest.mark.parametrize("sde_name", ALL_SDES)
@pytest.mark.parametrize("method,kw", [
    ("dpm_solver_pp", {"order": 3}), ("dpm_solver_pp", {"order": 2, "multistep": False, "thresholding": True, "denoise": True}),
    ("unipc", {}), ("unipc", {"prediction": "noise", "variant": "bh2"}), ("edm", {"S_churn": 10.0}),
    ("dpm_solver_adaptive", {"rtol": 0.1, "atol": 0.1}),
])
def test_image_shaped_float32_few_steps_finite(sde_name, method, kw):
    from scoresde.data import default_gmm

    sde = make_sde(sde_name)
    steps = {} if method == "dpm_solver_adaptive" else {"steps": 4}
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    r = sample(default_gmm(64).score_fn(sde), sde, (3, 1, 8, 8), method=method, generator=gens, dtype=torch.float32, **steps, **kw)
    assert r.x.shape == (3, 1, 8, 8) and r.x.dtype == torch.float32 and torch.isfinite(r.x).all()
