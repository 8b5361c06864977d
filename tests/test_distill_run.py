"""Distillation of a trained run (scoresde.distill with teacher='run'): loading the teacher, its data on the model's
scale, the student's network started from the teacher's weights, validation of the new options, evaluation on image
data (FD / precision / recall with floors over several sets), exact resume and the workdir's run-defining options.
The teacher is a tiny ConvScoreNet trained for a few steps on the embedded digits (seconds)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import scoresde
from scoresde.build import build_model, model_spec
from scoresde.distill import (
    DistillOptions, ProgressiveOptions, Student, load_teacher_run, progressive_distillation, run_distill, sample_student, student_network,
    teacher_training_data,
)
from scoresde.losses import get_loss_fn
from scoresde.runs import DataOptions
from scoresde.sde import VESDE, VPSDE
from scoresde.train import train
from scoresde.train_options import TrainOptions

TINY_CONV = {"ch": 8, "ch_mult": [1], "num_res_blocks": 1, "dropout": 0.0, "num_groups": 4}


def _make_run(workdir, sde=None, n_steps=2, parameterization=None, continuous=True):
    """A scoresde-train-like run directory: a checkpoint carrying the model's spec with the digits data entry."""
    from scoresde.data import load_dataset

    sde = sde or VPSDE()
    spec = model_spec(sde, "convnet", dict(TINY_CONV, time_embedding="fourier" if isinstance(sde, VESDE) else "sinusoidal"),
                      (1, 8, 8), parameterization=parameterization, continuous=continuous, seed=0)
    spec["data"] = {"options": dataclasses.asdict(DataOptions(name="digits")), "centered": True, "levels": 17}
    model = build_model(spec)
    ds = load_dataset("digits", "train")
    x = (ds.x.float() + 0.5) / 17 * 2 - 1
    train(model, get_loss_fn(sde, continuous=continuous), x, TrainOptions(n_steps=n_steps, batch_size=32, warmup=0, log_every=1),
          workdir, progress=False)
    return workdir


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return _make_run(tmp_path_factory.mktemp("teacher") / "run")


def test_load_teacher_run_and_its_data(teacher_dir):
    t = load_teacher_run(teacher_dir)
    model, _ = scoresde.load(teacher_dir)
    assert t.shape == (1, 8, 8) and t.levels == 17 and t.data.name == "digits" and t.step == 2 and t.run_hash
    x = torch.randn(4, 1, 8, 8)
    tt = torch.full((4,), 0.3)
    torch.testing.assert_close(t.model.denoise_fn(x, tt), model.denoise_fn(x, tt), rtol=0, atol=0)
    assert not any(p.requires_grad for p in t.model.parameters())
    raw, prepare = teacher_training_data(t)
    assert raw.shape[1:] == (1, 8, 8) and not raw.dtype.is_floating_point
    y = prepare(raw[:64], torch.Generator().manual_seed(0))
    assert y.dtype == torch.float32 and y.shape == (64, 1, 8, 8) and -1 <= float(y.min()) and float(y.max()) <= 1
    centres = (raw[:64].float() + 0.5) / 17 * 2 - 1  # uniform dequantisation: within half a grey level of the centre
    assert float((y - centres).abs().max()) <= 1 / 17 + 1e-6


def test_student_network_starts_from_the_teacher(teacher_dir):
    t = load_teacher_run(teacher_dir)
    net = student_network(t, "teacher")
    assert type(net) is type(t.model.net)
    for (k, a), (_, b) in zip(net.state_dict().items(), t.model.net.state_dict().items()):
        assert torch.equal(a, b), k
    assert all(p.requires_grad for p in net.parameters())
    with torch.no_grad():
        next(net.parameters()).add_(1.0)  # a copy: the teacher is untouched
    assert not torch.equal(next(net.parameters()), next(t.model.net.parameters()))
    fresh = student_network(t, "random", seed=5)
    assert type(fresh) is type(t.model.net)
    assert not torch.equal(next(fresh.parameters()), next(t.model.net.parameters()))
    with pytest.raises(ValueError, match="student_init"):
        student_network(t, "copy")


def test_teacher_must_be_a_continuous_vp_model(tmp_path):
    _make_run(tmp_path / "ve", sde=VESDE(), n_steps=1)
    with pytest.raises(ValueError, match="teacher_run"):
        load_teacher_run(tmp_path / "ve")
    _make_run(tmp_path / "ddpm", n_steps=1, continuous=False)
    with pytest.raises(ValueError, match="continuous"):
        load_teacher_run(tmp_path / "ddpm")


@pytest.mark.parametrize("kw,match", [
    ({"teacher": "run"}, "teacher_run"),
    ({"teacher": "run", "teacher_run": "/no/such/run"}, "teacher_run"),
    ({"teacher_run": "."}, "teacher_run"),
    ({"student_init": "teacher"}, "student_init"),
    ({"student_init": "zeros"}, "student_init"),
    ({"eval_sets": 0}, "eval_sets"),
    ({"checkpoint_every": -1}, "checkpoint_every"),
    ({"teacher": "model"}, "teacher"),
])
def test_new_options_validate(kw, match):
    with pytest.raises(ValueError, match=match):
        DistillOptions(**kw)


def _opts(teacher_dir, workdir, **kw):
    base = dict(teacher="run", teacher_run=str(teacher_dir), start_steps=2, final_steps=1, n_steps=3, batch_size=16, lr=1e-4,
                ema_rate=0.9, n_eval=16, eval_sets=2, workdir=str(workdir), progress=False)
    return DistillOptions(**{**base, **kw})


def test_run_teacher_distillation_reports_fd_with_floors(teacher_dir, tmp_path):
    recs = run_distill(_opts(teacher_dir, tmp_path / "d"))
    assert [(r["steps"], r["teacher_per_step"], r["train_steps"], r["nfe"]) for r in recs] == [(2, 1, 3, 2), (1, 2, 3, 1)]
    for r in recs:
        for k in ("fd", "fd_floor", "precision", "recall", "precision_floor", "recall_floor", "fd_sd"):
            assert k in r and r[k] == r[k], (k, r)
        assert len(r["fd_sets"]) == 2 and r["fd"] == pytest.approx(sum(r["fd_sets"]) / 2)
        assert r["n_floor"] == 16 and r["fd_floor"] >= 0
    saved = [json.loads(line) for line in (tmp_path / "d" / "rounds.jsonl").read_text().splitlines()]
    assert [r["steps"] for r in saved] == [2, 1]
    rec = json.loads((tmp_path / "d" / "options.json").read_text())
    assert rec["teacher"] == {"step": 2, "run_hash": load_teacher_run(teacher_dir).run_hash}


def test_run_teacher_distillation_resumes_exactly_inside_a_round(teacher_dir, tmp_path):
    """Stopped after 3 of round 0's 6 steps and resumed: bitwise the uninterrupted student (the dequantisation noise of
    the run's data comes from the checkpointed generators too)."""
    t = load_teacher_run(teacher_dir)
    raw, prepare = teacher_training_data(t)

    def run(n_steps, final, workdir, ckpt=0):
        st = Student(student_network(t, "teacher"), t.sde, "v")
        tr = TrainOptions(n_steps=n_steps, batch_size=16, lr=1e-4, warmup=0, ema_rate=0.9, log_every=3, checkpoint_every=ckpt)
        progressive_distillation(t.model.denoise_fn, t.sde, st, raw, ProgressiveOptions(start_steps=2, final_steps=final, train=tr),
                                 workdir, prepare=prepare)
        return st

    full = run(6, 1, tmp_path / "a")
    run(3, 2, tmp_path / "b", ckpt=3)
    resumed = run(6, 1, tmp_path / "b")
    for (k, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k


def test_run_distill_continues_to_fewer_steps_exactly(teacher_dir, tmp_path):
    """run_distill stopped after round 0 (final_steps = start_steps) then asked for final_steps = 1 ends bitwise equal
    to one uninterrupted run; the finished round is reloaded."""
    full = run_distill(_opts(teacher_dir, tmp_path / "a", eval_sets=1))
    first = run_distill(_opts(teacher_dir, tmp_path / "b", final_steps=2, eval_sets=1))
    assert [r["steps"] for r in first] == [2]
    ckpt0 = tmp_path / "b" / "round_00" / "checkpoint.pt"
    stamp = (ckpt0.stat().st_mtime_ns, ckpt0.read_bytes())
    cont = run_distill(_opts(teacher_dir, tmp_path / "b", eval_sets=1))
    assert (ckpt0.stat().st_mtime_ns, ckpt0.read_bytes()) == stamp  # round 0 reloaded, not trained again
    for name in ("round_00", "round_01"):
        a = torch.load(tmp_path / "a" / name / "checkpoint.pt", weights_only=False)["ema"]["module"]
        b = torch.load(tmp_path / "b" / name / "checkpoint.pt", weights_only=False)["ema"]["module"]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert [r["fd"] for r in cont] == [r["fd"] for r in full]


def test_workdir_with_other_options_or_teacher_is_refused(teacher_dir, tmp_path):
    run_distill(_opts(teacher_dir, tmp_path / "d", final_steps=2, n_steps=1, eval_sets=1))
    before = (tmp_path / "d" / "options.json").read_text()
    with pytest.raises(ValueError, match="lr"):
        run_distill(_opts(teacher_dir, tmp_path / "d", final_steps=2, n_steps=1, eval_sets=1, lr=1e-3))
    other = _make_run(tmp_path / "other", n_steps=3)
    with pytest.raises(ValueError, match="teacher checkpoint"):
        run_distill(_opts(other, tmp_path / "d", final_steps=2, n_steps=1, eval_sets=1))
    assert (tmp_path / "d" / "options.json").read_text() == before


def test_scoresde_distill_command_takes_a_run_teacher(teacher_dir, tmp_path):
    from scoresde.cli import distill_main

    work = tmp_path / "cli"
    distill_main(["teacher=run", f"teacher_run={teacher_dir}", "start_steps=2", "final_steps=1", "n_steps=2", "batch_size=16",
                  "n_eval=16", "progress=false", f"workdir={work}"])
    rounds = [json.loads(line) for line in (work / "rounds.jsonl").read_text().splitlines()]
    assert [r["steps"] for r in rounds] == [2, 1] and all("fd" in r for r in rounds)


def test_clipped_data_predictions(teacher_dir, tmp_path):
    from scoresde.distill import clipped

    t = load_teacher_run(teacher_dir)
    assert t.data_range() == (-1.0, 1.0)
    z, tt = 3 * torch.randn(16, 1, 8, 8), torch.ones(16)
    raw = t.model.denoise_fn(z, tt)
    assert float(raw.abs().max()) > 1  # an eps-teacher's x_hat at t = T leaves the data range
    torch.testing.assert_close(clipped(t.model.denoise_fn, (-1, 1))(z, tt), raw.clamp(-1, 1))
    assert clipped(t.model.denoise_fn, None) == t.model.denoise_fn  # no clip: the function itself
    x, _ = sample_student(t.model.denoise_fn, t.sde, 1, (8, 1, 8, 8), torch.Generator().manual_seed(0), clip=(-1, 1))
    assert float(x.abs().max()) <= 1
    for bad in ((1, -1), (0, float("inf")), (0,)):
        with pytest.raises(ValueError, match="clip"):
            ProgressiveOptions(clip=bad)
    with pytest.raises(ValueError, match="clip_x0"):
        DistillOptions(clip_x0=True)  # the oracle's data are unbounded
    with pytest.raises(ValueError, match="clip_x0"):
        DistillOptions(teacher="run", teacher_run=str(teacher_dir), clip_x0=True, method="consistency_distillation")
    recs = run_distill(_opts(teacher_dir, tmp_path / "c", clip_x0=True, eval_sets=1))
    assert [r["steps"] for r in recs] == [2, 1] and all(r["fd"] == r["fd"] for r in recs)
    with pytest.raises(ValueError, match="clip_x0"):  # the same workdir without clamping is another distillation
        run_distill(_opts(teacher_dir, tmp_path / "c", eval_sets=1))
