"""Progressive distillation (scoresde.distill): the DDIM target identity, nested grids, the loss of a perfect
student, the student's parameterisations, exact resume through scoresde.train's checkpoints, validation; the
2-step student at the noise floor of the 2-D mixture (slow)."""

from __future__ import annotations

import copy

import pytest
import torch

from scoresde import SubVPSDE, VESDE, VPSDE
from scoresde.build import build_net
from scoresde.distill import (
    DistillOptions, ProgressiveOptions, Student, _ddim, distill_grid, mixture_2d, one_step_target, progressive_distillation,
    progressive_loss, run_distill, sample_student, teacher_from_score, teacher_solve,
)
from scoresde.train_options import TrainOptions

F64 = torch.float64


@pytest.mark.parametrize("sde", [VPSDE(), SubVPSDE()], ids=["vp", "subvp"])
def test_one_step_target_lands_on_the_two_step_endpoint(sde):
    g = torch.Generator().manual_seed(0)
    gm = mixture_2d()
    x0 = teacher_from_score(gm.score_fn(sde), sde)
    grid = distill_grid(sde, 8)
    m, s = sde.marginal_coef(grid)
    z = torch.randn(16, 2, generator=g, dtype=F64)
    for i in (0, 2, 6):  # the last student step (6 -> 8) ends at t = 0
        zz = z
        for k in (i, i + 1):
            zz = _ddim(x0(zz, grid[k].expand(16)), zz, m[k], s[k], m[k + 1], s[k + 1])
        xt = one_step_target(z, zz, m[i], s[i], m[i + 2], s[i + 2])
        torch.testing.assert_close(_ddim(xt, z, m[i], s[i], m[i + 2], s[i + 2]), zz, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("schedule", ["logSNR", "time_uniform"])
def test_grids_are_nested_and_end_at_zero(schedule):
    sde = VPSDE()
    for n in (1, 2, 4, 32):
        fine, coarse = distill_grid(sde, 2 * n, schedule=schedule), distill_grid(sde, n, schedule=schedule)
        torch.testing.assert_close(fine[::2], coarse, rtol=1e-12, atol=1e-12)
        assert coarse[0] == sde.T and coarse[-1] == 0.0 and (coarse[1:] < coarse[:-1]).all()


def test_a_student_equal_to_the_teacher_has_zero_round0_loss():
    sde, gm = VPSDE(), mixture_2d()
    teacher = teacher_from_score(gm.score_fn(sde), sde)

    class Perfect(torch.nn.Module):
        def x0(self, z, t):
            return teacher(z, t)

    x = gm.sample(64, torch.Generator().manual_seed(0), dtype=F64)
    loss = progressive_loss(teacher, sde, 16, teacher_per_step=1)(Perfect(), x, torch.Generator().manual_seed(1))
    assert float(loss) < 1e-20  # x_tilde is the teacher's own prediction, to rounding
    loss2 = progressive_loss(teacher, sde, 16, teacher_per_step=2)(Perfect(), x, torch.Generator().manual_seed(1))
    assert float(loss2) > 1e-6  # one teacher step is not two


@pytest.mark.parametrize("par", ["v", "x"])
def test_student_parameterisations_and_score(par):
    sde = VPSDE()
    net = build_net("mlp", (2,), hidden=16, depth=1).double()
    st = Student(net, sde, par)
    z, t = torch.randn(5, 2, dtype=F64), torch.rand(5, dtype=F64) * 0.9 + 0.05
    f = net(z, 999.0 * t)
    m, s = sde.marginal_coef(t)
    m, s = m[:, None], s[:, None]
    want = f if par == "x" else m * z - s * f  # VP: alpha = m, sigma = s
    torch.testing.assert_close(st.x0(z, t), want)
    torch.testing.assert_close(st.score_fn(z, t), (m * want - z) / s**2)
    x, nfe = sample_student(st.x0, sde, 4, (7, 2), torch.Generator().manual_seed(0), dtype=F64)
    assert nfe == 4 and x.shape == (7, 2) and torch.isfinite(x).all()


@pytest.mark.parametrize("name", ["vp", "subvp"])
@pytest.mark.parametrize("schedule", ["logSNR", "time_uniform"])
def test_teacher_solvers_converge_at_their_orders(name, schedule):
    """``teacher_solve`` from ``T`` to ``eps`` against the PF-ODE solution (rtol = atol = 1e-11) of the oracle: DDIM of
    order 1, the midpoint solver (DPM-Solver++(2S)) of order 2, also on a time-uniform grid, where the intermediate
    point is not the log-SNR midpoint and the ``1 / (2r)`` weighting is needed for the second order."""
    import numpy as np
    from test_samplers import pf_reference

    from scoresde.samplers._common import end_time, time_grid

    sde, sf, xT, ref = pf_reference(name)
    x0 = teacher_from_score(sf, sde)
    i = torch.zeros(xT.shape[0], dtype=torch.long)
    for solver, steps, order in (("ddim", [40, 80, 160], 1), ("midpoint", [20, 40, 80], 2)):
        errs = []
        for n in steps:
            p = 2 if solver == "midpoint" else 1
            grid = time_grid(sde, n * p, end_time(sde, None), schedule)
            m, s = sde.marginal_coef(grid)
            errs.append(float((teacher_solve(x0, xT, grid, m, s, i, n, solver) - ref).abs().max()))
        slope = -np.polyfit(np.log(steps), np.log(errs), 1)[0]
        assert abs(slope - order) <= 0.3, f"{name} {schedule} {solver}: fitted order {slope:.2f}, expected {order} ({errs})"


def test_substeps_are_the_finer_grid():
    """``sample_student`` with ``substeps`` k of DDIM is DDIM on the k-times finer nested grid, bitwise; the midpoint
    solver's trajectory depends only on the number of solver steps in all (4 x 8 = 8 x 4), and the NFE are counted."""
    sde, gm = VPSDE(), mixture_2d()
    x0 = teacher_from_score(gm.score_fn(sde), sde)
    xT = torch.randn(9, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    a, na = sample_student(x0, sde, 4, (9, 2), x_T=xT, substeps=8)
    b, nb = sample_student(x0, sde, 32, (9, 2), x_T=xT)
    assert torch.equal(a, b) and na == nb == 32
    c, nc = sample_student(x0, sde, 4, (9, 2), x_T=xT, substeps=8, solver="midpoint")
    d, nd = sample_student(x0, sde, 8, (9, 2), x_T=xT, substeps=4, solver="midpoint")
    torch.testing.assert_close(c, d, rtol=1e-12, atol=1e-12)
    assert nc == nd == 64
    with pytest.raises(ValueError, match="solver"):
        sample_student(x0, sde, 4, (9, 2), x_T=xT, solver="rk4")


def test_round0_with_substeps_fits_the_solver_trajectory(tmp_path):
    """Round 0 with ``first_round_substeps`` / ``first_round_solver``: a student equal to the one-step target of the
    teacher's substeps has zero loss; the record names the round's teacher steps and solver; the later rounds keep
    2 DDIM steps."""
    sde, gm = VPSDE(), mixture_2d()
    teacher = teacher_from_score(gm.score_fn(sde), sde)
    x = gm.sample(64, torch.Generator().manual_seed(0), dtype=F64)
    fine = distill_grid(sde, 4 * 3 * 2)
    m, s = sde.marginal_coef(fine)

    class Perfect(torch.nn.Module):  # the one-step target of 3 midpoint steps, from an independent loop over the rows
        def x0(self, z, t):
            out = torch.empty_like(z)
            for r in range(z.shape[0]):
                k = int(torch.nonzero(torch.isclose(fine, t[r].double()))[0])
                zz = teacher_solve(teacher, z[r:r + 1], fine, m, s, torch.tensor([k]), 3, "midpoint")
                out[r] = one_step_target(z[r], zz[0], m[k], s[k], m[k + 6], s[k + 6])
            return out

    loss = progressive_loss(teacher, sde, 4, 3, solver="midpoint")(Perfect(), x, torch.Generator().manual_seed(1))
    assert float(loss) < 1e-18
    data = gm.sample(256, torch.Generator().manual_seed(0), dtype=torch.float32)
    st = Student(build_net("mlp", (2,), hidden=16, depth=1, seed=3), sde, "v")
    tr = TrainOptions(n_steps=3, batch_size=16, lr=1e-3, warmup=0, ema_rate=0.9, log_every=5)
    opts = ProgressiveOptions(start_steps=4, final_steps=2, train=tr, first_round_substeps=3, first_round_solver="midpoint")
    recs = progressive_distillation(teacher, sde, st, data, opts, tmp_path)
    assert [(r["steps"], r["teacher_per_step"], r["teacher_solver"]) for r in recs] == [(4, 3, "midpoint"), (2, 2, "ddim")]


def _tiny(final_steps, n_steps, workdir, checkpoint_every=0, first_round_steps=None):
    sde, gm = VPSDE(), mixture_2d()
    data = gm.sample(512, torch.Generator().manual_seed(0), dtype=torch.float32)
    st = Student(build_net("mlp", (2,), hidden=16, depth=1, seed=3), sde, "v")
    tr = TrainOptions(n_steps=n_steps, batch_size=32, lr=1e-3, warmup=0, ema_rate=0.9, log_every=5, checkpoint_every=checkpoint_every)
    opts = ProgressiveOptions(start_steps=4, final_steps=final_steps, train=tr, first_round_steps=first_round_steps)
    recs = progressive_distillation(teacher_from_score(gm.score_fn(sde), sde), sde, st, data, opts, workdir)
    return st, recs


def test_distillation_resumes_exactly(tmp_path):
    """A run stopped inside round 0 and resumed (same options, longer n_steps) ends bitwise equal to one
    uninterrupted run; a finished round is reloaded, not retrained."""
    full, recs = _tiny(2, 12, tmp_path / "a")
    assert [(r["steps"], r["teacher_per_step"], r["train_steps"]) for r in recs] == [(4, 1, 12), (2, 2, 12)]
    _tiny(4, 6, tmp_path / "b", checkpoint_every=3)  # stopped after 6 of round 0's 12 steps
    resumed, recs_b = _tiny(2, 12, tmp_path / "b")
    for (k, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k
    again, recs_c = _tiny(2, 12, tmp_path / "b")  # everything finished: reloaded, same weights, no training time
    for (k, a), (_, b) in zip(full.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k


def test_first_round_steps_lengthens_round_0_only(tmp_path):
    """``first_round_steps`` trains round 0 for that many steps and the later rounds for ``n_steps``; a round 0 of 6
    steps continued to 12 (``first_round_steps=12``) ends bitwise equal to an uninterrupted one, and the records of
    finished rounds are in rounds.jsonl after each round."""
    import json

    full, recs = _tiny(2, 6, tmp_path / "a", first_round_steps=12)
    assert [(r["steps"], r["train_steps"]) for r in recs] == [(4, 12), (2, 6)]
    _tiny(4, 6, tmp_path / "b")  # a finished round 0 of 6 steps ...
    rows = [json.loads(line) for line in (tmp_path / "b" / "rounds.jsonl").read_text().splitlines()]
    assert [(r["steps"], r["train_steps"]) for r in rows] == [(4, 6)]
    resumed, _ = _tiny(2, 6, tmp_path / "b", first_round_steps=12)  # ... continued to 12, then round 1
    for (k, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("kw,match", [
    ({"first_round_steps": 0}, "first_round_steps"), ({"first_round_steps": 2.5}, "first_round_steps"),
    ({"first_round_substeps": 0}, "first_round_substeps"), ({"first_round_solver": "heun"}, "first_round_solver"),
    ({"start_steps": 6}, "start_steps"),
    ({"final_steps": 8, "start_steps": 4}, "final_steps"),
    ({"schedule": "karras"}, "schedule"),
    ({"eps": -1.0}, "eps"),
])
def test_progressive_options_validate(kw, match):
    with pytest.raises(ValueError, match=match):
        ProgressiveOptions(**kw)


@pytest.mark.parametrize("kw,match", [
    ({"method": "magic"}, "method"), ({"parameterization": "eps"}, "parameterization"), ({"sde": "ve"}, "sde"),
    ({"mixture": "moons"}, "mixture"), ({"first_round_steps": 0}, "first_round_steps"),
    ({"first_round_steps": True}, "first_round_steps"),
    ({"first_round_steps": 10, "method": "consistency_training"}, "first_round_steps"),
    ({"first_round_substeps": True}, "first_round_substeps"), ({"first_round_solver": "rk4"}, "first_round_solver"),
    ({"first_round_solver": "midpoint", "method": "consistency_distillation"}, "first_round_solver"),
])
def test_distill_options_validate(kw, match):
    with pytest.raises(ValueError, match=match):
        DistillOptions(**kw)


def test_student_rejects_ve_and_bad_parameterisation():
    net = build_net("mlp", (2,), hidden=8, depth=1)
    with pytest.raises(ValueError, match="sde"):
        Student(net, VESDE(), "v")
    with pytest.raises(ValueError, match="parameterization"):
        Student(net, VPSDE(), "eps")


@pytest.mark.slow
def test_one_and_two_step_students_at_the_noise_floor(tmp_path):
    """Issue 15's goal on the 2-D mixture (teacher = the exact oracle score): students at the floor with <= 2 steps
    (measured z = -1.2 at 1 and 2 steps with these settings, experiments/results/few_step.md; about 8 minutes)."""
    recs = run_distill(DistillOptions(start_steps=64, final_steps=1, hidden=128, depth=3, n_steps=1500, n_data=50_000,
                                      workdir=str(tmp_path), progress=False))
    by_steps = {r["steps"]: r["z"] for r in recs}
    assert by_steps[2] < 5 and by_steps[1] < 5, recs


def test_config_file_is_the_options_defaults():
    """configs/distill.yaml holds exactly DistillOptions' fields and defaults (the library is the schema)."""
    import dataclasses
    from pathlib import Path

    import yaml

    import scoresde

    cfg = yaml.safe_load((Path(scoresde.__file__).parent / "configs" / "distill.yaml").read_text())
    assert cfg.pop("defaults") == ["schema_distill", "_self_"]
    assert cfg.pop("hydra")["run"]["dir"] == "${workdir}"  # Hydra's own log goes into the distillation's workdir
    assert cfg == {f.name: f.default for f in dataclasses.fields(DistillOptions)}
    DistillOptions(**cfg)


# --- consistency models ----------------------------------------------------------------------------------------
def _cm(sigma_data=0.5, seed=0):
    from scoresde.distill import ConsistencyModel

    return ConsistencyModel(build_net("mlp", (2,), hidden=16, depth=1, seed=seed).double(), VPSDE(), sigma_data=sigma_data)


def test_consistency_boundary_condition_is_exact():
    """f(x_hat, eps) = x_hat for any network (c_skip(sigma_min) = 1, c_out(sigma_min) = 0)."""
    cm = _cm()
    with torch.no_grad():
        for p in cm.net.parameters():
            p.normal_()
    x = torch.randn(9, 2, dtype=F64)
    t = torch.full((9,), cm.eps, dtype=F64)
    torch.testing.assert_close(cm(x, t), x, rtol=0, atol=1e-12)
    assert (cm(x, t.fill_(0.5)) - x).abs().max() > 1e-3


def test_ct_schedule_endpoints():
    from scoresde.distill import ct_schedule

    assert ct_schedule(0, 100) == (2, pytest.approx(0.9))  # N(0) = s0, mu(0) = mu0^(s0/N) = mu0
    N, mu = ct_schedule(100, 100)
    assert N == 151 and mu == pytest.approx(0.9 ** (2 / 151))
    assert [ct_schedule(k, 100)[0] for k in range(0, 101, 10)] == sorted(ct_schedule(k, 100)[0] for k in range(0, 101, 10))


@pytest.mark.parametrize("method", ["cd", "ct"])
def test_consistency_loss_updates_the_target_by_ema(method):
    from scoresde.distill import consistency_loss, teacher_eps_from_score

    sde, gm = VPSDE(), mixture_2d()
    cm = _cm()
    teacher = teacher_eps_from_score(gm.score_fn(sde), sde) if method == "cd" else None
    lf = consistency_loss(cm, teacher, N=10, mu=0.9) if method == "cd" else consistency_loss(cm, None, ct=(50, 2, 150, 0.9))
    x = gm.sample(32, torch.Generator().manual_seed(0), dtype=F64)
    g = torch.Generator().manual_seed(0)
    loss = lf(cm, x, g)
    assert torch.isfinite(loss) and float(loss.detach()) >= 0 and int(cm.k) == 1
    loss.backward()
    with torch.no_grad():
        for p in cm.net.parameters():
            p.sub_(0.1 * p.grad)  # a made-up optimiser step
    before = [p.clone() for p in cm.target.parameters()]
    lf(cm, x, g)  # the second call first moves the target towards the stepped network
    mu = 0.9 if method == "cd" else __import__("scoresde.distill", fromlist=["ct_schedule"]).ct_schedule(0, 50)[1]
    for b, pt, p in zip(before, cm.target.parameters(), cm.net.parameters()):
        torch.testing.assert_close(pt, mu * b + (1 - mu) * p)


def test_consistency_sampling_counts_and_validates():
    from scoresde.distill import consistency_times, sample_consistency

    cm = _cm()
    times = consistency_times(VPSDE(), 4, 18)
    assert len(times) == 3 and all(a > b for a, b in zip(times, times[1:]))
    x, nfe = sample_consistency(cm, (5, 2), torch.Generator().manual_seed(0), times, dtype=F64)
    assert nfe == 4 and x.shape == (5, 2) and torch.isfinite(x).all()
    with pytest.raises(ValueError, match="times"):
        sample_consistency(cm, (5, 2), None, [1.5], dtype=F64)


def test_consistency_distillation_resumes_exactly(tmp_path):
    from scoresde.distill import consistency_loss, teacher_eps_from_score
    from scoresde.train import train

    sde, gm = VPSDE(), mixture_2d()
    data = gm.sample(256, torch.Generator().manual_seed(0), dtype=F64)

    def run(n_steps, workdir, ckpt=0):
        cm = _cm(seed=4)
        lf = consistency_loss(cm, teacher_eps_from_score(gm.score_fn(sde), sde), N=10, mu=0.9)
        tr = TrainOptions(n_steps=n_steps, batch_size=32, lr=1e-3, warmup=0, ema_rate=0.9, log_every=5, checkpoint_every=ckpt)
        train(cm, lf, data, tr, workdir, progress=False)
        return cm

    full = run(10, tmp_path / "a")
    run(5, tmp_path / "b", ckpt=5)
    resumed = run(10, tmp_path / "b")
    assert int(resumed.k) == 10
    for (k, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k


# --- improved consistency training (Song & Dhariwal 2023) -------------------------------------------------------
def test_ict_schedule_doubles_from_s0_to_s1():
    from scoresde.distill import ict_schedule

    K = 800  # K' = floor(800 / (log2(128) + 1)) = 100
    assert [ict_schedule(k, K) for k in (0, 99, 100, 250, 699, 700, 799, 800)] == [11, 11, 21, 41, 641, 1281, 1281, 1281]
    assert ict_schedule(0, 10, s0=2, s1=2) == 3


def test_lognormal_interval_probs_match_the_lognormal_mass():
    from scoresde.distill import lognormal_interval_probs

    sig = torch.logspace(4, -6, 1001, dtype=F64)  # decreasing, covering the lognormal's mass (> 5 sd of log sigma each side)
    p = lognormal_interval_probs(sig, -1.1, 2.0)
    assert p.shape == (1000,) and float(p.sum()) == pytest.approx(1.0) and (p >= 0).all()
    mid = torch.sqrt(sig[:-1] * sig[1:])
    assert float((p * torch.log(mid)).sum()) == pytest.approx(-1.1, abs=0.05)  # the mean of log sigma


def test_improved_ct_loss_targets_the_online_network_without_gradient():
    from scoresde.distill import improved_ct_loss

    gm = mixture_2d()
    cm = _cm(sigma_data=1.0)
    x = gm.sample(64, torch.Generator().manual_seed(0), dtype=F64)
    lf = improved_ct_loss(cm, K=100)
    loss = lf(cm, x, torch.Generator().manual_seed(1))
    assert torch.isfinite(loss) and float(loss.detach()) > 0 and int(cm.k) == 1
    loss.backward()
    assert all(p.grad is not None for p in cm.net.parameters())
    assert all(p.grad is None for p in cm.target.parameters())  # no EMA target network in the loss


@pytest.mark.parametrize("kw,match", [({"ict_s0": 0}, "ict_s0"), ({"ict_s0": 20, "ict_s1": 10}, "ict_s1"),
                                      ({"ict_p_std": 0.0}, "ict_p_std"), ({"ict_p_mean": float("nan")}, "ict_p_mean")])
def test_ict_options_validate(kw, match):
    with pytest.raises(ValueError, match=match):
        DistillOptions(**kw)


def test_improved_consistency_training_runs_from_run_distill(tmp_path):
    recs = run_distill(DistillOptions(method="improved_consistency_training", hidden=16, depth=1, n_data=512, n_eval=64, n_steps=8,
                                      batch_size=32, sigma_data=1.0, cm_eval_nfe="1,2", progress=False, workdir=str(tmp_path)))
    assert [r["nfe"] for r in recs] == [1, 2] and all(r["train_steps"] == 8 and r["z"] == r["z"] for r in recs)


def test_improved_consistency_training_resumes_exactly(tmp_path):
    from scoresde.distill import improved_ct_loss
    from scoresde.train import train

    data = mixture_2d().sample(256, torch.Generator().manual_seed(0), dtype=F64)

    def run(n_steps, workdir, ckpt=0):
        cm = _cm(seed=4, sigma_data=1.0)
        tr = TrainOptions(n_steps=n_steps, batch_size=32, lr=1e-3, warmup=0, ema_rate=0.9, log_every=5, checkpoint_every=ckpt)
        train(cm, improved_ct_loss(cm, K=10, s0=2, s1=8), data, tr, workdir, progress=False)
        return cm

    full = run(10, tmp_path / "a")
    run(5, tmp_path / "b", ckpt=5)
    resumed = run(10, tmp_path / "b")
    assert int(resumed.k) == 10
    for (k, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k
