"""Samplers against the Gaussian-mixture oracle: distribution (MMD^2 vs the data-vs-data noise floor),
convergence order to a tight probability-flow solution, NFE by counting, per-sample seeding, validation.

Heavy grids (every predictor x corrector, D = 64 PC/Langevin) are marked slow.
"""

from __future__ import annotations

import functools
import inspect
import typing

import numpy as np
import pytest
import torch

from scoresde import GaussianMixture, SubVPSDE, VESDE, VPSDE
from scoresde.metrics import median_bandwidth, mmd2_unbiased
from scoresde.samplers import (
    CORRECTORS,
    DEFAULT_DENOISE,
    DEFAULT_STEPS,
    METHOD_OPTIONS,
    PREDICTORS,
    SAMPLERS,
    VP_ONLY_METHODS,
    CountingScore,
    check_method_options,
    check_sample_options,
    option_types,
    sample,
    sample_langevin,
    sample_pc,
)

F64 = torch.float64
N_SAMPLES = {2: 1000, 64: 500}
Z_MAX = 5.0  # a sampler "reaches the noise floor" when MMD^2 < Z_MAX standard deviations of the data-vs-data statistic


def make_sde(name):
    return {"vp": VPSDE(), "subvp": SubVPSDE(), "ve": VESDE(sigma_min=0.01, sigma_max=20.0)}[name]


@functools.lru_cache(maxsize=None)
def mixture(D: int) -> GaussianMixture:
    g = torch.Generator().manual_seed(1)
    means = torch.randn(4, D, generator=g, dtype=F64) * (2.0 if D == 2 else 1.0)
    return GaussianMixture(means, torch.tensor([0.15, 0.3, 0.2, 0.25], dtype=F64), torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=F64))


@functools.lru_cache(maxsize=None)
def reference(D: int):
    """A data sample, fixed kernel bandwidths, and the std of MMD^2 between independent data samples of size n."""
    n, gm = N_SAMPLES[D], mixture(D)
    data = [gm.sample(n, torch.Generator().manual_seed(100 + i), dtype=F64) for i in range(11)]
    bw = [median_bandwidth(data[0], data[1]) * c for c in (0.25, 0.5, 1.0, 2.0, 4.0)]
    null = torch.stack([mmd2_unbiased(data[0], data[i], bw) for i in range(1, 11)])
    return data[0], bw, float(null.std())


def assert_at_noise_floor(x: torch.Tensor, D: int, what: str):
    data, bw, sd = reference(D)
    assert torch.isfinite(x).all(), f"{what}: non-finite samples"
    z = float(mmd2_unbiased(x, data, bw)) / sd
    assert z < Z_MAX, f"{what}: MMD^2 is {z:.1f} null standard deviations above 0 (limit {Z_MAX})"


def draw(sde_name, D, method, seed=5, **kw):
    sde = make_sde(sde_name)
    return sample(mixture(D).score_fn(sde), sde, (N_SAMPLES[D], D), method=method, generator=torch.Generator().manual_seed(seed), dtype=F64, **kw)


# documented step counts at which each sampler reaches the noise floor on the oracle
FAST_CONFIGS = [
    ("ode", {}),  # dopri5, rtol = atol = 1e-5
    ("ode", {"ode_method": "rk4", "steps": 50}),
    ("heun", {"steps": 18}),
    ("dpm_solver", {"steps": 20}),
    ("dpm_solver", {"steps": 20, "order": 2, "multistep": False}),
    ("ddim", {"steps": 50}),
]
STOCHASTIC_CONFIGS = [
    ("pc", {"steps": 500}),  # reverse diffusion + Langevin (batch norms), snr 0.16
    ("pc", {"steps": 500, "predictor": "ancestral", "corrector": "none"}),
    ("ddim", {"steps": 200, "eta": 1.0}),
]
SLOW_STOCHASTIC_CONFIGS = [
    ("pc", {"steps": 500, "predictor": "euler_maruyama", "corrector": "annealed_langevin"}),
    ("pc", {"steps": 500, "predictor": "reverse_diffusion", "corrector": "none", "probability_flow": True}),
    ("langevin", {"steps": 100, "n_steps": 30}),  # 3000 NFE: annealed Langevin alone needs many steps per level
]


def _ids(cfgs):
    return [m + "-" + "-".join(f"{k}={v}" for k, v in kw.items()) for m, kw in cfgs]


@pytest.mark.parametrize("sde_name", ["vp", "subvp", "ve"])
@pytest.mark.parametrize("method,kw", FAST_CONFIGS, ids=_ids(FAST_CONFIGS))
@pytest.mark.parametrize("D", [2, 64])
def test_fast_solvers_reach_noise_floor(sde_name, method, kw, D):
    if sde_name == "ve" and method in ("ddim", "dpm_solver"):
        pytest.skip("DDIM / DPM-Solver are for VP and sub-VP")
    assert_at_noise_floor(draw(sde_name, D, method, **kw).x, D, f"{sde_name} {method} {kw}")


_STOCH = [pytest.param(m, kw, id=i) for (m, kw), i in zip(STOCHASTIC_CONFIGS, _ids(STOCHASTIC_CONFIGS))] + [
    pytest.param(m, kw, id=i, marks=pytest.mark.slow) for (m, kw), i in zip(SLOW_STOCHASTIC_CONFIGS, _ids(SLOW_STOCHASTIC_CONFIGS))]


@pytest.mark.parametrize("sde_name", ["vp", "subvp", "ve"])
@pytest.mark.parametrize("method,kw", _STOCH)
@pytest.mark.parametrize("D", [2, pytest.param(64, marks=pytest.mark.slow)])
def test_stochastic_samplers_reach_noise_floor(sde_name, method, kw, D):
    if sde_name == "ve" and method == "ddim":
        pytest.skip("DDIM is for VP and sub-VP")
    assert_at_noise_floor(draw(sde_name, D, method, **kw).x, D, f"{sde_name} {method} {kw}")


@pytest.mark.slow
@pytest.mark.parametrize("sde_name", ["vp", "subvp", "ve"])
@pytest.mark.parametrize("predictor", list(PREDICTORS))
@pytest.mark.parametrize("corrector", list(CORRECTORS))
def test_every_predictor_corrector_reaches_noise_floor(sde_name, predictor, corrector):
    if predictor == "none" and corrector == "none":
        pytest.skip("nothing to run")
    kw = {"steps": 500, "predictor": predictor, "corrector": corrector}
    if predictor == "none":  # corrector alone = method "langevin": more steps per level, levels uniform in log-SNR
        kw.update(steps=100, n_steps=30, snr=0.3, schedule="logSNR")
    assert_at_noise_floor(draw(sde_name, 2, "pc", **kw).x, 2, f"{sde_name} pc {kw}")


@pytest.mark.slow
@pytest.mark.parametrize("sde_name", ["vp", "subvp", "ve"])
def test_langevin_per_sample_norms_in_high_dimension(sde_name):
    """Per-sample Langevin step sizes (batch-independent) are fine where the norms concentrate (D = 64)."""
    assert_at_noise_floor(draw(sde_name, 64, "pc", steps=500, langevin_norm="sample").x, 64, f"{sde_name} langevin_norm=sample")


def test_ddim_eta1_and_ancestral_same_distribution():
    """Two-sample test between the two stochastic samplers (not against data)."""
    data, bw, sd = reference(2)
    for name in ("vp", "subvp"):
        a = draw(name, 2, "ddim", seed=7, steps=100, eta=1.0).x
        b = draw(name, 2, "pc", seed=8, steps=100, predictor="ancestral", corrector="none", denoise=False).x
        z = float(mmd2_unbiased(a, b, bw)) / sd
        assert z < Z_MAX, f"{name}: DDIM(eta=1) vs ancestral MMD^2 at {z:.1f} null sd"


# --- deterministic solvers: convergence order to a tight PF-ODE solution ------------------------------
CONVERGENCE = [
    # (sdes, method, options, steps, order)
    (("vp", "subvp", "ve"), "ode", {"ode_method": "euler"}, [400, 800, 1600], 1),
    (("vp", "subvp", "ve"), "ode", {"ode_method": "midpoint"}, [50, 100, 200], 2),
    (("vp", "ve"), "ode", {"ode_method": "rk4"}, [20, 40, 80], 4),  # torchdiffeq's rk4 is 4th order
    (("vp", "subvp", "ve"), "heun", {}, [20, 40, 80], 2),
    (("vp", "subvp"), "ddim", {"schedule": "logSNR"}, [80, 160, 320], 1),
    (("vp", "subvp"), "dpm_solver", {"order": 1, "multistep": False}, [80, 160, 320], 1),
    (("vp", "subvp"), "dpm_solver", {"order": 2, "multistep": False}, [16, 32, 64, 128], 2),
    (("vp", "subvp"), "dpm_solver", {"order": 3, "multistep": False}, [32, 64, 128], 3),
    (("vp", "subvp"), "dpm_solver", {"order": 2, "multistep": True}, [16, 32, 64, 128], 2),
    (("vp", "subvp"), "dpm_solver", {"order": 3, "multistep": True}, [64, 128, 256], 3),
]


@functools.lru_cache(maxsize=None)
def pf_reference(sde_name):
    sde, gm = make_sde(sde_name), mixture(2)
    xT = sde.prior_sampling((8, 2), torch.Generator().manual_seed(3), dtype=F64)
    ref = sample(gm.score_fn(sde), sde, (8, 2), method="ode", rtol=1e-11, atol=1e-11, x_T=xT)
    return sde, gm.score_fn(sde), xT, ref.x


@pytest.mark.parametrize("sdes,method,kw,steps,order", CONVERGENCE, ids=[f"{c[1]}-{c[2]}" for c in CONVERGENCE])
def test_convergence_order(sdes, method, kw, steps, order):
    for name in sdes:
        sde, sf, xT, ref = pf_reference(name)
        errs = [float((sample(sf, sde, xT.shape, method=method, steps=s, x_T=xT, **kw).x - ref).abs().max()) for s in steps]
        slope = -np.polyfit(np.log(steps), np.log(errs), 1)[0]
        assert abs(slope - order) <= 0.3, f"{name} {method} {kw}: fitted order {slope:.2f}, expected {order} (errors {errs})"


def test_ddim_eta0_equals_dpm_solver_1():
    for name in ("vp", "subvp"):
        sde, sf, xT, _ = pf_reference(name)
        for schedule in ("time_uniform", "logSNR", "karras"):
            a = sample(sf, sde, xT.shape, method="ddim", steps=25, eta=0.0, schedule=schedule, x_T=xT).x
            for ms in (False, True):
                b = sample(sf, sde, xT.shape, method="dpm_solver", steps=25, order=1, multistep=ms, schedule=schedule, x_T=xT).x
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# --- NFE ------------------------------------------------------------------------------------------
NFE_CASES = [
    ("pc", {"steps": 7}, 7 * 2 + 1),
    ("pc", {"steps": 7, "corrector": "annealed_langevin", "n_steps": 3}, 7 * 4 + 1),
    ("pc", {"steps": 7, "predictor": "none", "corrector": "langevin", "n_steps": 2, "denoise": False}, 14),
    ("langevin", {"steps": 5, "n_steps": 4}, 21),
    ("ddim", {"steps": 9}, 9),
    ("dpm_solver", {"steps": 9, "order": 3, "multistep": True}, 9),
    ("dpm_solver", {"steps": 9, "order": 3, "multistep": False}, 27),
    ("dpm_solver", {"steps": 9, "order": 2, "multistep": False}, 18),
    ("heun", {"steps": 9}, 18),
    ("ode", {"ode_method": "euler", "steps": 9}, 9),
    ("ode", {"ode_method": "rk4", "steps": 9}, 36),
    ("ode", {}, None),  # adaptive: only the count is known
    ("ode", {"ode_method": "scipy_rk45"}, None),
]


@pytest.mark.parametrize("method,kw,expected", NFE_CASES, ids=[f"{m}-{kw}" for m, kw, _ in NFE_CASES])
def test_nfe_is_counted(method, kw, expected):
    sde, gm = VPSDE(), mixture(2)
    counter = CountingScore(gm.score_fn(sde))
    r = sample(counter, sde, (16, 2), method=method, generator=torch.Generator().manual_seed(0), dtype=F64, **kw)
    assert r.nfe == counter.calls
    if expected is not None:
        assert r.nfe == expected
    if kw.get("ode_method") == "scipy_rk45":
        assert r.nfe == r.info["scipy_nfev"]


# --- robustness -------------------------------------------------------------------------------------
@pytest.mark.parametrize("sde_name", ["vp", "subvp", "ve"])
def test_reverse_diffusion_10_steps_is_finite(sde_name):
    """Regression: score_sde's reverse-diffusion predictor takes beta_i from an N-step chain (beta_max / N > 1 for
    N = 10) and returns NaN at 10 steps; ours uses the exact kernel of each step."""
    sde = make_sde(sde_name)
    for N in (10, 1000):
        sde.N = N
        r = sample(mixture(2).score_fn(sde), sde, (500, 2), method="pc", steps=10, predictor="reverse_diffusion",
                   generator=torch.Generator().manual_seed(0), dtype=F64)
        assert torch.isfinite(r.x).all()
        assert float(r.x.abs().max()) < 50.0


ALL_METHOD_CONFIGS = [
    ("pc", {"predictor": p, "corrector": c}) for p in PREDICTORS for c in CORRECTORS if not (p == "none" and c == "none")
] + [("pc", {"predictor": p, "probability_flow": True}) for p in ("euler_maruyama", "reverse_diffusion")] + [
    ("langevin", {}), ("ode", {"ode_method": "euler"}), ("ode", {"ode_method": "midpoint"}), ("ode", {"ode_method": "rk4"}),
    ("ddim", {}), ("ddim", {"eta": 1.0}), ("heun", {}), ("heun", {"schedule": "logSNR"}),
] + [("dpm_solver", {"order": o, "multistep": m, "schedule": s}) for o in (1, 2, 3) for m in (False, True) for s in ("time_uniform", "logSNR", "karras")]


@pytest.mark.parametrize("sde_name", ["vp", "subvp", "ve"])
@pytest.mark.parametrize("method,kw", ALL_METHOD_CONFIGS, ids=_ids(ALL_METHOD_CONFIGS))
def test_every_sampler_finite_for_few_steps_float32_images(sde_name, method, kw):
    if sde_name == "ve" and method in ("ddim", "dpm_solver"):
        pytest.skip("VP and sub-VP only")
    sde = make_sde(sde_name)
    gm = GaussianMixture(mixture(64).means[:, :16].float(), mixture(64).stds.float(), mixture(64).weights.float())
    for steps in (1, 2, 3, 5):
        r = sample(gm.score_fn(sde), sde, (6, 1, 4, 4), method=method, steps=steps, generator=torch.Generator().manual_seed(1), **kw)
        assert r.x.shape == (6, 1, 4, 4) and r.x.dtype == torch.float32
        assert torch.isfinite(r.x).all(), f"{method} {kw} steps={steps}"


def test_adaptive_ode_finite_float32_and_trajectory():
    for name in ("vp", "subvp", "ve"):
        sde = make_sde(name)
        for ode_method in ("dopri5", "scipy_rk45"):
            r = sample(mixture(2).score_fn(sde), sde, (32, 2), method="ode", ode_method=ode_method, return_trajectory=True,
                       trajectory_points=6, generator=torch.Generator().manual_seed(0))
            assert r.x.dtype == torch.float32 and torch.isfinite(r.x).all()
            assert r.trajectory.shape == (6, 32, 2) and r.times.shape == (6,)
            assert float(r.times[0]) == sde.T and float(r.times[-1]) == pytest.approx(1e-5 if name == "ve" else 1e-3)
            torch.testing.assert_close(r.trajectory[-1], r.x)


@pytest.mark.parametrize("method,kw,K", [("pc", {"steps": 4}, 6), ("dpm_solver", {"steps": 4}, 5), ("heun", {"steps": 4}, 5)])
def test_trajectory(method, kw, K):
    sde = VPSDE()
    r = sample(mixture(2).score_fn(sde), sde, (3, 2), method=method, return_trajectory=True, generator=torch.Generator().manual_seed(0), **kw)
    assert r.trajectory.shape == (K, 3, 2) and r.times.shape == (K,)
    assert bool((r.times[1:] < r.times[:-1]).all())
    torch.testing.assert_close(r.trajectory[-1], r.x)


# --- randomness -----------------------------------------------------------------------------------
SEEDED = [
    ("pc", {"predictor": p, "corrector": c}) for p in ("euler_maruyama", "reverse_diffusion", "ancestral") for c in ("langevin", "annealed_langevin")
] + [("langevin", {"n_steps": 2}), ("ddim", {"eta": 0.5}), ("dpm_solver", {}), ("heun", {}), ("ode", {"ode_method": "midpoint"})]


@pytest.mark.parametrize("method,kw", SEEDED, ids=_ids(SEEDED))
def test_per_sample_generators_make_samples_batch_independent(method, kw):
    sde, gm = VPSDE(), mixture(2)

    def run(seeds):
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        return sample(gm.score_fn(sde), sde, (len(seeds), 2), method=method, steps=12, generator=gens, dtype=F64, **kw).x

    big, small = run([10, 11, 12, 13, 14]), run([12, 10])
    torch.testing.assert_close(small[0], big[2], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(small[1], big[0], rtol=1e-10, atol=1e-10)
    assert not torch.allclose(big[0], big[1])


def test_same_seed_same_numbers():
    sde = VESDE()
    a = sample(mixture(2).score_fn(sde), sde, (8, 2), steps=10, generator=torch.Generator().manual_seed(4)).x
    b = sample(mixture(2).score_fn(sde), sde, (8, 2), steps=10, generator=torch.Generator().manual_seed(4)).x
    c = sample(mixture(2).score_fn(sde), sde, (8, 2), steps=10, generator=torch.Generator().manual_seed(5)).x
    assert torch.equal(a, b) and not torch.equal(a, c)


# --- validation -----------------------------------------------------------------------------------
# a method's own options, rejected without the SDE (``check_method_options``)
BAD_METHOD_OPTIONS = [
    ({"predictor": "heun"}, "predictor"),
    ({"corrector": "mala"}, "corrector"),
    ({"predictor": "none", "corrector": "none"}, "predictor and corrector"),
    ({"predictor": "ancestral", "probability_flow": True}, "probability_flow"),
    ({"steps": 0}, "steps"),
    ({"steps": 2.5}, "steps"),
    ({"snr": -1.0}, "snr"),
    ({"n_steps": 0}, "n_steps"),
    ({"eps": 0.0}, "eps"),
    ({"denoise": 1}, "denoise"),
    ({"method": "dpm_solver", "order": 4}, "order"),
    ({"method": "dpm_solver", "schedule": "cosine"}, "schedule"),
    ({"method": "ddim", "eta": 1.5}, "eta"),
    ({"method": "ode", "ode_method": "rk45"}, "ode_method"),
    ({"method": "ode", "steps": 10}, "steps"),
    ({"method": "ode", "rtol": 0.0}, "rtol"),
    ({"method": "ode", "trajectory_points": 1}, "trajectory_points"),
    ({"method": "heun", "order": 2}, "unknown option"),
]
# rules that need the SDE (``check_sample_options``; the SDE is VPSDE here, T = 1)
BAD_SDE_OPTIONS = [({"eps": 1.5}, "eps"), ({"method": "pc", "eps": 1.0}, "eps")]
# the run's own arguments (``sample`` only)
BAD = BAD_METHOD_OPTIONS + BAD_SDE_OPTIONS + [
    ({"method": "euler"}, "method"),
    ({"shape": (4,)}, "shape"),
    ({"dtype": torch.int64}, "dtype"),
    ({"x_T": torch.zeros(3, 2)}, "x_T"),
    ({"generator": [torch.Generator()] * 3}, "generator"),
]


@pytest.mark.parametrize("kw,match", BAD, ids=[str(k) for k, _ in BAD])
def test_bad_options_raise_before_any_work(kw, match):
    sde = VPSDE()
    counter = CountingScore(mixture(2).score_fn(sde))
    kw = dict(kw)
    shape = kw.pop("shape", (4, 2))
    with pytest.raises(ValueError, match=match):
        sample(counter, sde, shape, **kw)
    assert counter.calls == 0


METHOD_ONLY_BAD = [kw for kw, _ in BAD_METHOD_OPTIONS if set(kw) - {"method"} <= set(METHOD_OPTIONS[kw.get("method", "pc")])]


@pytest.mark.parametrize("kw", METHOD_ONLY_BAD, ids=[str(k) for k in METHOD_ONLY_BAD])
def test_check_method_options_is_the_check_sample_runs(kw):
    """The method-option part of ``sample``'s validation (also used by the config layer) on its own:
    the same rejections with the same messages, and the defaults filled in when the options are good."""
    kw = dict(kw)
    method = kw.pop("method", "pc")
    with pytest.raises(ValueError) as alone:
        check_method_options(method, kw)
    with pytest.raises(ValueError) as with_sde:
        check_sample_options(VPSDE(), method, **kw)
    with pytest.raises(ValueError) as in_sample:
        sample(mixture(2).score_fn(VPSDE()), VPSDE(), (4, 2), method=method, **kw)
    assert str(alone.value) == str(with_sde.value) == str(in_sample.value)
    assert check_method_options(method, {}) == METHOD_OPTIONS[method]


@pytest.mark.parametrize("kw,match", BAD_SDE_OPTIONS, ids=[str(k) for k, _ in BAD_SDE_OPTIONS])
def test_check_sample_options_is_the_check_sample_runs(kw, match):
    """Rules that need the SDE: ``check_method_options`` cannot see them, ``check_sample_options`` and ``sample``
    reject them with the same message."""
    kw = dict(kw)
    method = kw.pop("method", "pc")
    check_method_options(method, kw)
    with pytest.raises(ValueError, match=match) as with_sde:
        check_sample_options(VPSDE(), method, **kw)
    with pytest.raises(ValueError) as in_sample:
        sample(mixture(2).score_fn(VPSDE()), VPSDE(), (4, 2), method=method, **kw)
    assert str(with_sde.value) == str(in_sample.value)


@pytest.mark.parametrize("method", VP_ONLY_METHODS)
def test_check_sample_options_rejects_vp_only_methods_on_ve(method):
    with pytest.raises(ValueError, match="method") as err:
        check_sample_options(VESDE(), method)
    assert "sde" in str(err.value)
    check_method_options(method, {})  # fine without the SDE
    for sde in (VPSDE(), SubVPSDE(), VPSDE(schedule="cosine")):
        assert check_sample_options(sde, method) == METHOD_OPTIONS[method]


def test_check_sample_options_completes_and_rejects():
    o = check_sample_options(VESDE(), "ode", ode_method="euler", steps=7, eps=0.5)
    assert o == {**METHOD_OPTIONS["ode"], "ode_method": "euler", "steps": 7, "eps": 0.5}
    with pytest.raises(ValueError, match="steps"):
        check_sample_options(VESDE(), "ode", steps=7)  # adaptive dopri5 picks its own steps
    with pytest.raises(ValueError, match="unknown option"):
        check_sample_options(VPSDE(), "ddim", order=2)
    with pytest.raises(ValueError, match="method"):
        check_sample_options(VPSDE(), "euler")
    with pytest.raises(TypeError, match="sde"):
        check_sample_options("vp", "pc")


def test_none_means_the_default():
    """An option given as ``None`` whose type is not ``Optional`` takes the signature's default (a config's ``null``);
    ``Optional`` options keep ``None``, which the sampler resolves (pc's ``steps`` to ``sde.N``)."""
    assert check_method_options("ddim", {"steps": None, "denoise": None}) == METHOD_OPTIONS["ddim"]
    assert check_method_options("pc", {"steps": None, "eps": None})["steps"] is None
    sde, sf, xT, _ = pf_reference("vp")
    a = sample(sf, sde, xT.shape, method="ddim", steps=None, denoise=None, x_T=xT)
    b = sample(sf, sde, xT.shape, method="ddim", steps=DEFAULT_STEPS["ddim"], x_T=xT)
    assert torch.equal(a.x, b.x) and a.info["steps"] == 50 and a.info["denoise"] is False
    sde = VESDE(N=12)
    r = sample(sf, sde, xT.shape, method="pc", x_T=xT, dtype=F64)
    assert r.info["steps"] == 12 and r.nfe == 2 * 12 + 1


# --- the table: one dispatch, options read off the signatures ----------------------------------------
OPTION_TYPES = (int, float, bool, str, typing.Optional[int], typing.Optional[float], typing.Optional[str])


@pytest.mark.parametrize("method", list(SAMPLERS))
def test_method_options_are_the_sampler_signature(method):
    """``METHOD_OPTIONS``, ``DEFAULT_STEPS``, ``DEFAULT_DENOISE`` and ``option_types`` are the sampler function's
    keyword-only parameters, defaults and annotations: one source of truth."""
    params = inspect.signature(SAMPLERS[method]).parameters.values()
    kw_only = {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert METHOD_OPTIONS[method] == kw_only
    assert {"steps", "eps", "denoise"} <= set(kw_only)
    assert DEFAULT_STEPS[method] == kw_only["steps"] and DEFAULT_DENOISE[method] == kw_only["denoise"]
    # the rest of the signature is the run, the same for every sampler
    assert [p.name for p in params if p.kind is not inspect.Parameter.KEYWORD_ONLY] == ["score_fn", "sde", "x", "noise", "callback", "progress"]
    types = option_types(method)
    assert set(types) == set(kw_only)
    for name, tp in types.items():
        assert tp in OPTION_TYPES, f"{method}.{name}: {tp}"
        default = kw_only[name]
        base = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
        assert (default is None and type(None) in typing.get_args(tp)) or isinstance(default, base[0]), f"{method}.{name}={default!r} vs {tp}"
        if base[0] is not bool:
            assert not isinstance(default, bool), f"{method}.{name}"


def test_langevin_snr_default_is_the_signature():
    """``sample_langevin``'s signature holds the one ``snr`` default (0.3) and ``sample`` uses it; PC's is 0.16."""
    assert METHOD_OPTIONS["langevin"]["snr"] == inspect.signature(sample_langevin).parameters["snr"].default == 0.3
    assert METHOD_OPTIONS["pc"]["snr"] == inspect.signature(sample_pc).parameters["snr"].default == 0.16
    sde = VPSDE()

    def run(**kw):
        return sample(mixture(2).score_fn(sde), sde, (8, 2), method="langevin", steps=5, n_steps=2,
                      generator=torch.Generator().manual_seed(2), dtype=F64, **kw)

    a, b, c = run(), run(snr=0.3), run(snr=0.16)
    assert torch.equal(a.x, b.x) and not torch.equal(a.x, c.x) and a.info["snr"] == 0.3


def test_sample_dispatches_through_the_table(monkeypatch):
    """``sample`` calls ``SAMPLERS[method]`` with the checked options completed with their defaults."""
    calls = []

    def fake(score_fn, sde, x, noise, callback, progress, **options):
        calls.append(options)
        score_fn(x, torch.full((x.shape[0],), 0.5, dtype=x.dtype))
        if callback is not None:
            callback(x + 1, 0.5)
        return x * 0 + 7, {"steps": 3, "answer": 42}

    monkeypatch.setitem(SAMPLERS, "heun", fake)
    sde = VPSDE()
    r = sample(mixture(2).score_fn(sde), sde, (4, 2), method="heun", rho=3.0, return_trajectory=True, generator=torch.Generator().manual_seed(0))
    assert calls == [{**METHOD_OPTIONS["heun"], "rho": 3.0}]
    assert torch.equal(r.x, torch.full((4, 2), 7.0)) and r.nfe == 1
    assert r.info["answer"] == 42 and r.info["steps"] == 3 and r.info["method"] == "heun"
    assert r.trajectory.shape == (2, 4, 2) and r.times.tolist() == [sde.T, 0.5]
    with pytest.raises(ValueError, match="schedule"):  # still validated before the table entry is called
        sample(mixture(2).score_fn(sde), sde, (4, 2), method="heun", schedule="cosine")
    assert len(calls) == 1


@pytest.mark.parametrize("method", VP_ONLY_METHODS)
def test_ddim_dpm_solver_reject_ve(method):
    with pytest.raises(ValueError, match="VP and sub-VP"):
        sample(mixture(2).score_fn(VESDE()), VESDE(), (4, 2), method=method)


def test_type_errors():
    with pytest.raises(TypeError, match="score_fn"):
        sample(None, VPSDE(), (4, 2))
    with pytest.raises(TypeError, match="sde"):
        sample(mixture(2).score_fn(VPSDE()), "vp", (4, 2))
    with pytest.raises(TypeError, match="generator"):
        sample(mixture(2).score_fn(VPSDE()), VPSDE(), (4, 2), generator=0)
