"""Fault injection (issue 16): each test repeats a failure reproduced on the code before the fix and asserts the
new behaviour. A refused command must leave every byte of the existing run as it was (``tree_hash`` before and
after); a rerun of a finished run is a no-op; one writer per run directory; stale ``best.pt`` is not evaluated;
sweeps fail before any work; user errors are one line and exit 2; no silent NaN or broadcast.

The kill -9 / resume and two-writer tests start subprocesses and are marked slow.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from scoresde.cli import sample_main, train_main
from scoresde.runs import LOCK_NAME, RunLock, RunDirError, remove_orphans, select_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY = ["train=tiny", "eval=tiny", "progress=false", "model.hidden=16", "model.depth=1", "data.n_train=200",
        "data.n_eval=40", "eval.nll=false", "eval.n_samples=8", "eval.batch_size=8", "sampler=ddim", "sampler.steps=5"]


# ------------------------------------------------------------------------------------------------- helpers
def tree_hash(d: Path) -> dict:
    """``relative path -> sha256`` of every file under ``d`` (hidden ones and Hydra's ``.hydra/`` and log too)."""
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()}


def metrics(d: Path) -> dict:
    return json.loads((d / "metrics.json").read_text())


def fails_with_one_line(main, args, capsys) -> str:
    """``main(args)`` exits 2 and prints exactly one line on stderr; returns it."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1, err
    return err[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny run (gmm, vp, 20 steps) to copy: tests that change a run work on a copy."""
    d = tmp_path_factory.mktemp("finished") / "run"
    train_main(TINY + [f"hydra.run.dir={d}"])
    return d


@pytest.fixture
def run_dir(finished, tmp_path):
    import shutil

    d = tmp_path / "run"
    shutil.copytree(finished, d)
    return d


# ------------------------------------------------------------------------------------------------- 1. contract
def test_other_run_into_a_run_directory_is_refused_naming_each_field_and_nothing_changes(run_dir, capsys):
    """Before: exit 0, steps 21-40 trained on moons with sub-VP into the gmm/VP run."""
    before = tree_hash(run_dir)
    line = fails_with_one_line(train_main, TINY + ["data=moons", "sde=subvp", "train.n_steps=40", f"hydra.run.dir={run_dir}"], capsys)
    assert "data.name was 'gmm', now 'moons'" in line and "sde.name was 'vp', now 'subvp'" in line
    assert "resume=false overwrite=true" in line
    assert tree_hash(run_dir) == before


@pytest.mark.parametrize("override", ["train.weighting=likelihood", "seed=3", "sde.beta_max=10", "data.n_train=100",
                                      "model.parameterization=score", "dtype=float64"])
def test_every_run_defining_field_is_checked(run_dir, capsys, override):
    before = tree_hash(run_dir)
    line = fails_with_one_line(train_main, TINY + [override, f"hydra.run.dir={run_dir}"], capsys)
    assert override.split("=")[0] + " was" in line
    assert tree_hash(run_dir) == before


def test_resume_false_needs_overwrite_then_starts_over(run_dir, capsys):
    before = tree_hash(run_dir)
    line = fails_with_one_line(train_main, TINY + ["resume=false", "data=moons", f"hydra.run.dir={run_dir}"], capsys)
    assert "overwrite=true" in line and tree_hash(run_dir) == before
    train_main(TINY + ["resume=false", "overwrite=true", "data=moons", f"hydra.run.dir={run_dir}"])
    m = metrics(run_dir)
    assert m["config"]["data"]["name"] == "moons" and m["train"]["steps"] == 20
    # the log holds the new run only (20 steps logged every 10)
    assert [json.loads(ln)["step"] for ln in (run_dir / "metrics.jsonl").read_text().splitlines()] == [10, 20]
    assert not (run_dir / LOCK_NAME).exists()


def test_overwrite_without_resume_false_is_a_config_error(tmp_path, capsys):
    line = fails_with_one_line(train_main, TINY + ["overwrite=true", f"hydra.run.dir={tmp_path / 'r'}"], capsys)
    assert line.startswith("Config error") and "resume=false" in line
    assert not (tmp_path / "r").exists()


def test_continuing_a_run_with_more_steps_is_allowed(run_dir):
    train_main(TINY + ["train.n_steps=30", f"hydra.run.dir={run_dir}"])
    m = metrics(run_dir)
    assert m["train"]["steps"] == 30 and math.isfinite(m["train"]["final_loss"]) and m["checkpoint_step"] == 30


# ------------------------------------------------------------------------------------------------- 2. no write before checks
def test_refused_architecture_change_leaves_the_finished_run_usable(run_dir, capsys, tmp_path):
    """Before: config.yaml was rewritten (hidden 128) before the resume check failed; the run no longer loaded."""
    before = tree_hash(run_dir)
    line = fails_with_one_line(train_main, TINY + ["model.hidden=128", f"hydra.run.dir={run_dir}"], capsys)
    assert "model.hidden was 16, now 128" in line
    assert tree_hash(run_dir) == before
    sample_main(["progress=false", f"ckpt={run_dir}", "sampler=ddim", "sampler.steps=3", "eval.n_samples=4",
                 "eval.batch_size=4", "eval.quality=false", f"hydra.run.dir={tmp_path / 's'}"])
    assert torch.isfinite(torch.load(tmp_path / "s" / "samples.pt")).all()


def test_rerunning_a_finished_run_is_a_no_op(run_dir):
    """Before: metrics.json's train.final_loss became "nan" and the run was evaluated again."""
    files = ("config.yaml", "spec.json", "checkpoint.pt", "metrics.json", "metrics.jsonl", "samples.pt", "samples.png")
    before = {k: v for k, v in tree_hash(run_dir).items() if k in files}
    train_main(TINY + [f"hydra.run.dir={run_dir}"])
    assert {k: v for k, v in tree_hash(run_dir).items() if k in files} == before
    assert math.isfinite(metrics(run_dir)["train"]["final_loss"])


def test_rerun_with_other_evaluation_keeps_the_training_figures(run_dir):
    old = metrics(run_dir)["train"]
    train_main(TINY + ["sampler.steps=7", f"hydra.run.dir={run_dir}"])
    m = metrics(run_dir)
    assert m["train"] == old and m["samples"]["nfe_mean"] == 7 and m["config"]["sampler"]["steps"] == 7


# ------------------------------------------------------------------------------------------------- 3. best.pt
def test_stale_best_checkpoint_is_not_evaluated(tmp_path, caplog):
    """Before: after continuing a run to 40 steps with evaluation off, metrics.json reported best.pt of step 20."""
    d = tmp_path / "run"
    train_main(TINY + ["train.eval_every=10", f"hydra.run.dir={d}"])
    m = metrics(d)
    assert m["checkpoint"] == "best.pt" and m["checkpoint_step"] == m["train"]["best_step"]
    assert select_checkpoint(d) == d / "best.pt"
    train_main(TINY + ["train.n_steps=40", f"hydra.run.dir={d}"])
    m = metrics(d)
    assert m["checkpoint"] == "checkpoint.pt" and m["checkpoint_step"] == 40
    assert select_checkpoint(d) == d / "checkpoint.pt"
    b = torch.load(d / "best.pt", weights_only=True)
    c = torch.load(d / "checkpoint.pt", weights_only=True)
    assert b["step"] in (10, 20) and b["run_hash"] == c["run_hash"]
    # the Python API follows the same rule: scoresde.load(run_dir) rebuilds the step-40 weights, not the stale best
    from scoresde import load
    from scoresde.build import find_checkpoint

    assert find_checkpoint(d) == d / "checkpoint.pt"
    model, _ = load(d)
    ema = c["ema"]["module"]
    assert set(model.state_dict()) == set(ema)
    assert all(torch.equal(v, ema[k]) for k, v in model.state_dict().items())


def test_best_checkpoint_of_another_run_is_stale(tmp_path):
    from scoresde.checkpoint import save_checkpoint

    d = tmp_path / "run"
    train_main(TINY + ["train.eval_every=10", f"hydra.run.dir={d}"])
    b = torch.load(d / "best.pt", weights_only=True)
    save_checkpoint(d / "best.pt", {**b, "run_hash": "0" * 16})
    assert select_checkpoint(d) == d / "checkpoint.pt"


# ------------------------------------------------------------------------------------------------- 4. one writer
def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_live_lock_refuses_a_second_writer(run_dir, capsys):
    before = tree_hash(run_dir)
    with RunLock(run_dir):
        locked = tree_hash(run_dir)
        line = fails_with_one_line(train_main, TINY + [f"hydra.run.dir={run_dir}"], capsys)
        assert f"in use by process {os.getpid()}" in line and tree_hash(run_dir) == locked
        with pytest.raises(RunDirError, match="in use"):
            RunLock(run_dir).acquire()
    assert tree_hash(run_dir) == before


def test_stale_lock_and_orphaned_temporary_files_are_removed(run_dir, caplog):
    (run_dir / LOCK_NAME).write_text(json.dumps({"pid": _dead_pid(), "host": os.uname().nodename}))
    orphan = run_dir / ".checkpoint.pt.k9x2.tmp"
    orphan.write_bytes(b"\0" * 4096)
    (run_dir / "metrics.json.tmp").write_text("{")
    train_main(TINY + ["train.n_steps=30", f"hydra.run.dir={run_dir}"])
    assert not orphan.exists() and not (run_dir / "metrics.json.tmp").exists() and not (run_dir / LOCK_NAME).exists()
    assert metrics(run_dir)["train"]["steps"] == 30


def test_remove_orphans_keeps_the_run_files(run_dir):
    (run_dir / ".best.pt.a1.tmp").write_bytes(b"x")
    before = {k for k in tree_hash(run_dir) if not k.endswith(".tmp")}
    assert [p.name for p in remove_orphans(run_dir)] == [".best.pt.a1.tmp"]
    assert set(tree_hash(run_dir)) == before


# ------------------------------------------------------------------------------------------------- 7. sweeps
def test_a_sweep_with_one_bad_job_fails_before_the_first_job(tmp_path, capsys):
    """Before: job 0 trained in full, then job 1 failed with no report."""
    sweep = tmp_path / "sweep"
    line = fails_with_one_line(train_main, ["-m"] + TINY + ["train.lr=1e-3,-1", f"hydra.sweep.dir={sweep}"], capsys)
    assert "job 1: train.lr=-1" in line and "train.lr must be" in line
    assert not sweep.exists()


def test_unknown_key_added_with_plus_is_rejected(tmp_path, capsys):
    """Before: ``+train.n_step=50`` (Hydra's own hint after a typo) was silently ignored."""
    line = fails_with_one_line(train_main, TINY + ["+train.n_step=50", f"hydra.run.dir={tmp_path / 'r'}"], capsys)
    assert "train.n_step" in line and "did you mean train.n_steps" in line
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------------------------------------- 8. one line, exit 2
SAMPLE = ["progress=false", "sampler=ddim", "sampler.steps=3", "eval.n_samples=4", "eval.batch_size=4", "eval.quality=false"]


def test_missing_and_wrong_ckpt_are_one_line(finished, tmp_path, capsys):
    assert "exactly one of ckpt" in fails_with_one_line(sample_main, SAMPLE + [f"hydra.run.dir={tmp_path / 'a'}"], capsys)
    assert "no such file" in fails_with_one_line(sample_main, SAMPLE + ["ckpt=nowhere", f"hydra.run.dir={tmp_path / 'b'}"], capsys)
    sample_main(SAMPLE + [f"ckpt={finished}", f"hydra.run.dir={tmp_path / 's'}"])
    # a scoresde-sample output directory given as ckpt (before: "Missing key sde")
    line = fails_with_one_line(sample_main, SAMPLE + [f"ckpt={tmp_path / 's'}", f"hydra.run.dir={tmp_path / 'c'}"], capsys)
    assert "not a sample or nll output directory" in line


@pytest.mark.parametrize("name", ["checkpoint.pt", "best.pt"])
def test_corrupt_or_truncated_checkpoint_names_the_file_and_the_other_one(tmp_path, capsys, name):
    d = tmp_path / "run"
    train_main(TINY + ["train.eval_every=10", f"hydra.run.dir={d}"])
    data = (d / name).read_bytes()
    (d / name).write_bytes(data[: len(data) // 3])
    line = fails_with_one_line(sample_main, SAMPLE + [f"ckpt={d / name}", f"hydra.run.dir={tmp_path / 's'}"], capsys)
    other = "best.pt" if name == "checkpoint.pt" else "checkpoint.pt"
    assert f"{name}' is corrupt or truncated" in line and f"{other}' may still be good" in line
    assert len(line) < 400


def test_unwritable_output_directory_is_one_line(finished, tmp_path, capsys):
    (tmp_path / "file").write_text("not a directory")
    line = fails_with_one_line(sample_main, SAMPLE + [f"ckpt={finished}", f"hydra.run.dir={tmp_path / 'file' / 'out'}"], capsys)
    assert "cannot be written" in line
    line = fails_with_one_line(train_main, TINY + [f"hydra.run.dir={tmp_path / 'file' / 'run'}"], capsys)
    assert "cannot be written" in line


def test_missing_image_archive_names_the_config_key(tmp_path, capsys):
    line = fails_with_one_line(train_main, ["train=tiny", "progress=false", "data=mnist", f"data.root={tmp_path / 'none'}",
                                            "model=unet_tiny", f"hydra.run.dir={tmp_path / 'r'}"], capsys)
    assert "data.download=true" in line


def test_score_sde_config_whose_get_config_returns_the_wrong_type(tmp_path, capsys):
    f = tmp_path / "cfg.py"
    f.write_text("def get_config():\n    return 42\n")
    line = fails_with_one_line(train_main, [f"score_sde_config={f}"], capsys)
    assert "returned a int" in line and "ConfigDict" in line


def test_debug_flag_gives_the_traceback(tmp_path, monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(Exception, match="no such file"):
        sample_main(SAMPLE + ["--debug", "ckpt=nowhere", f"hydra.run.dir={tmp_path / 'b'}"])
    assert "HYDRA_FULL_ERROR" not in os.environ  # the flag does not outlive the command


# ------------------------------------------------------------------------------------------------- 5. no silent NaN / broadcast
def _gm_setup(dtype=torch.float64):
    from scoresde.data import default_gmm
    from scoresde.sde import VPSDE

    sde = VPSDE()
    gm = default_gmm(2)
    return sde, gm, gm.score_fn(sde)


@pytest.mark.parametrize("bad", ["column", "scalar", "dtype"])
def test_a_score_of_the_wrong_shape_or_dtype_is_refused_on_the_first_call(bad):
    """Before: a (B, 1) or scalar score broadcast silently (finite, wrong: logp 6 nats off)."""
    from scoresde import sample
    from scoresde.likelihood import log_likelihood

    sde, gm, score = _gm_setup()
    wrong = {"column": lambda x, t: score(x, t)[:, :1], "scalar": lambda x, t: score(x, t).sum(),
             "dtype": lambda x, t: score(x, t).float()}[bad]
    err = TypeError if bad == "dtype" else ValueError
    x = gm.sample(16, generator=torch.Generator().manual_seed(0)).double()
    with pytest.raises(err, match="score_fn"):
        sample(wrong, sde, (16, 2), method="ddim", steps=5, dtype=torch.float64)
    with pytest.raises(err, match="score_fn"):
        log_likelihood(wrong, sde, x, divergence="exact")


def test_one_nan_sample_does_not_poison_the_pc_batch():
    """Before: the batch-averaged Langevin step size turned one NaN row into 8 NaN rows."""
    from scoresde import sample

    sde, gm, score = _gm_setup()
    g = torch.Generator().manual_seed(1)
    x_T = torch.randn(8, 2, generator=g, dtype=torch.float64)
    x_T[3] = float("nan")
    r = sample(score, sde, (8, 2), method="pc", steps=20, generator=torch.Generator().manual_seed(2), x_T=x_T)
    finite = torch.isfinite(r.x).all(dim=1)
    assert finite.tolist() == [True, True, True, False, True, True, True, True]


def test_log_likelihood_isolates_non_finite_rows():
    """Before: torchdiffeq stopped with "underflow in dt 0.0" for the whole batch."""
    from scoresde.likelihood import log_likelihood

    sde, gm, score = _gm_setup()
    x = gm.sample(6, generator=torch.Generator().manual_seed(3)).double()
    keep = [0, 1, 3, 4, 5]
    good = log_likelihood(score, sde, x[keep], divergence="exact", rtol=1e-6, atol=1e-6).logp
    xb = x.clone()
    xb[2, 0] = float("inf")
    with pytest.warns(RuntimeWarning, match="1 of 6 samples are non-finite"):
        res = log_likelihood(score, sde, xb, divergence="exact", rtol=1e-6, atol=1e-6)
    assert math.isnan(res.logp[2])
    # the frozen row adds no error to the per-sample norm: the same steps as the five rows solved alone
    torch.testing.assert_close(res.logp[keep], good, rtol=0, atol=1e-9)


def test_log_likelihood_refuses_half_precision_and_a_wrong_generator():
    from scoresde.likelihood import log_likelihood

    sde, gm, score = _gm_setup()
    x = gm.sample(4, generator=torch.Generator().manual_seed(0))
    with pytest.raises(TypeError, match="float16"):
        log_likelihood(score, sde, x.half())
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        log_likelihood(score, sde, x.double(), generator=3)


def _poisoned_copy(finished: Path, tmp_path: Path) -> Path:
    """A copy of a run whose EMA weights make every sample NaN (an output bias set to NaN)."""
    import shutil

    d = tmp_path / "nan_run"
    shutil.copytree(finished, d)
    state = torch.load(d / "checkpoint.pt", weights_only=True)
    last_bias = [k for k in state["ema"]["module"] if k.endswith("bias")][-1]
    state["ema"]["module"][last_bias].fill_(float("nan"))
    torch.save(state, d / "checkpoint.pt")
    return d


def test_non_finite_samples_fail_the_app_unless_allowed(finished, tmp_path, capsys):
    d = _poisoned_copy(finished, tmp_path)
    line = fails_with_one_line(sample_main, SAMPLE + [f"ckpt={d}", f"hydra.run.dir={tmp_path / 's'}"], capsys)
    assert "4 of 4 samples have NaN/inf" in line and "allow_nonfinite=true" in line
    sample_main(SAMPLE + [f"ckpt={d}", "allow_nonfinite=true", f"hydra.run.dir={tmp_path / 't'}"])
    assert metrics(tmp_path / "t")["samples"]["n_nonfinite"] == 4


# ------------------------------------------------------------------------------------------------- 9. small API checks
def test_time_is_checked_by_marginal_prob_marginal_coef_and_log_snr():
    from scoresde.sde import VESDE, SubVPSDE, VPSDE

    for sde in (VPSDE(), SubVPSDE(), VESDE()):
        with pytest.raises(ValueError, match="t must lie in"):
            sde.marginal_prob(torch.zeros(2, 2), torch.tensor([float("nan"), 0.5]))
        for t in (torch.tensor([float("nan")]), torch.tensor([1.5]), torch.tensor([-0.1])):
            with pytest.raises(ValueError, match="t must lie in"):
                sde.marginal_coef(t)
            with pytest.raises(ValueError, match="t must lie in"):
                sde.log_snr(t)
        m, s = sde.marginal_coef(torch.tensor([0.0, 0.5, 1.0]))
        assert torch.isfinite(m).all() and torch.isfinite(s).all()


def test_numpy_integer_steps_are_accepted():
    from scoresde import sample

    sde, gm, score = _gm_setup()
    for method in ("ddim", "dpm_solver", "heun", "pc"):
        r = sample(score, sde, (4, 2), method=method, steps=np.int64(4), generator=torch.Generator().manual_seed(0),
                   dtype=torch.float64)
        assert r.info["steps"] == 4


# ------------------------------------------------------------------------------------------------- 6. unsafe schedules
@pytest.mark.parametrize("method", ["ddim", "dpm_solver", "heun"])
def test_fast_samplers_refuse_a_schedule_they_cannot_compute(method):
    """Before: VPSDE(beta_max=999) passed validation and DDIM / DPM-Solver / Heun returned all-NaN samples (float32);
    beta_max=100 gave Heun samples of mean 45.8."""
    from scoresde import sample
    from scoresde.data import default_gmm
    from scoresde.sde import VPSDE

    gm = default_gmm(2)
    calls = []

    for bm in (999.0, 100.0):
        sde = VPSDE(beta_max=bm)
        score = gm.score_fn(sde)
        if method == "ddim" and bm == 100.0:  # DDIM's x0 stays finite here: it samples, and soundly
            r = sample(score, sde, (2000, 2), method=method, generator=torch.Generator().manual_seed(0))
            ref = gm.sample(20000, generator=torch.Generator().manual_seed(1))
            assert abs(float(r.x.std() - ref.std())) < 0.1
            continue
        with pytest.raises(ValueError, match="cannot sample .* soundly"):
            sample(lambda x, t: calls.append(1) or score(x, t), sde, (16, 2), method=method)
    assert not calls  # refused before any score call


def test_the_paper_schedules_are_accepted_by_every_fast_sampler():
    from scoresde.samplers.fast import check_schedule
    from scoresde.sde import SubVPSDE, VESDE, VPSDE

    for dtype in (torch.float32, torch.float64):
        for sde in (VPSDE(), VPSDE(schedule="cosine"), SubVPSDE()):
            for method in ("ddim", "dpm_solver", "heun"):
                check_schedule(sde, method, dtype)
        check_schedule(VESDE(), "heun", dtype)
        check_schedule(VESDE(sigma_max=1348.0), "heun", dtype)


def test_a_schedule_that_never_reaches_its_prior_warns():
    """Before: VPSDE(beta_min=1e-12, beta_max=2e-12) sampled from N(0, I) without a word."""
    from scoresde.sde import SubVPSDE, VESDE, VPSDE

    with pytest.warns(UserWarning, match="far from the prior"):
        sde = VPSDE(beta_min=1e-12, beta_max=2e-12)
    assert sde.prior_kl_per_dim() > 10
    with pytest.warns(UserWarning, match="far from the prior"):
        VESDE(sigma_min=0.01, sigma_max=1.0)  # 0.5 nats per dimension for unit-scale data
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        VESDE(sigma_max=7.0)  # a small data set's largest pairwise distance (Song & Ermon 2020): 0.01, no warning
        for sde in (VPSDE(), SubVPSDE(), VESDE(), VPSDE(schedule="cosine")):
            assert sde.prior_kl_per_dim() < 1e-3


def test_the_train_app_refuses_an_unsafe_sampler_before_training(tmp_path, capsys):
    line = fails_with_one_line(train_main, TINY + ["sde.beta_max=999", "sampler=dpm_solver", f"hydra.run.dir={tmp_path / 'r'}"], capsys)
    assert "cannot sample" in line and not (tmp_path / "r").exists()


# ------------------------------------------------------------------------------------------------- 9. progress
@pytest.mark.parametrize("ode_method", ["dopri5", "rk4"])
def test_the_ode_sampler_shows_progress_and_the_samples_do_not_change(ode_method, capsys):
    """Before: the adaptive ODE sampler ran silent (95 s for 2000 samples)."""
    from scoresde import sample

    sde, gm, score = _gm_setup()
    kw = dict(method="ode", ode_method=ode_method, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    quiet = sample(score, sde, (8, 2), **kw).x
    capsys.readouterr()
    kw["generator"] = torch.Generator().manual_seed(0)
    shown = sample(score, sde, (8, 2), progress=True, **kw).x
    assert f"ode ({ode_method})" in capsys.readouterr().err
    assert torch.equal(quiet, shown)


# ------------------------------------------------------------------------------------------------- slow: real processes
def _cli(args, cwd) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.Popen([sys.executable, "-m", "scoresde.cli", "train", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() - t0 < timeout
        time.sleep(0.05)


@pytest.mark.slow
def test_two_trainings_into_one_directory_one_is_refused_and_a_killed_owner_leaves_a_stale_lock(tmp_path):
    """Before: both exited 0; config.yaml said seed 7, the checkpoint seed 8, metrics.jsonl interleaved."""
    d = tmp_path / "run"
    args = TINY + ["train.n_steps=100000", "train.checkpoint_every=50", f"hydra.run.dir={d}"]
    first = _cli(args + ["seed=7"], tmp_path)
    try:
        _wait_for(d / "checkpoint.pt", first)
        second = _cli(args + ["seed=7"], tmp_path)
        out, err = second.communicate(timeout=120)
        assert second.returncode == 2 and f"in use by process {first.pid}" in err, err[-2000:]
        assert len([ln for ln in err.splitlines() if ln.strip()]) == 1
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert (d / LOCK_NAME).exists()  # the killed owner's lock: stale now
    n = int(torch.load(d / "checkpoint.pt", weights_only=True)["step"]) + 10
    third = _cli(TINY + ["seed=7", f"train.n_steps={n}", "train.checkpoint_every=50", f"hydra.run.dir={d}"], tmp_path)
    out, err = third.communicate(timeout=300)
    assert third.returncode == 0, err[-2000:]
    assert "stale lock" in out + err and not (d / LOCK_NAME).exists()
    m = metrics(d)
    assert m["config"]["seed"] == 7 and m["train"]["steps"] == n


def _final_state(d: Path) -> dict:
    s = torch.load(d / "checkpoint.pt", weights_only=True)
    return {"model": s["model"], "ema": s["ema"]["module"], "step": s["step"]}


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kill_9_at_random_points_then_resume_is_bitwise_exact(tmp_path, seed):
    """kill -9 at random times (a checkpoint is written every step, so many kills land in a write), rerun the same
    command until it finishes: the final weights equal an uninterrupted run's bit for bit, and no temporary file
    or lock is left."""
    args = TINY + ["train.n_steps=60", "train.checkpoint_every=1", "train.log_every=5"]
    ref = tmp_path / "ref"
    p = _cli(args + [f"hydra.run.dir={ref}"], tmp_path)
    assert p.wait(timeout=300) == 0
    d = tmp_path / "killed"
    rng = np.random.default_rng(seed)
    kills = 0
    for attempt in range(12):
        p = _cli(args + [f"hydra.run.dir={d}"], tmp_path)
        if attempt < 4:
            _wait_for(d / LOCK_NAME, p)  # started training (imports done, lock taken)
            time.sleep(float(rng.uniform(0.05, 1.0)))
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                kills += 1
            p.wait()
            continue
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
        break
    assert kills >= 2
    a, b = _final_state(ref), _final_state(d)
    assert a["step"] == b["step"] == 60
    for k in ("model", "ema"):
        assert a[k].keys() == b[k].keys() and all(torch.equal(a[k][n], b[k][n]) for n in a[k]), k
    assert not list(d.glob("*.tmp")) and not list(d.glob(".*.tmp")) and not (d / LOCK_NAME).exists()
    steps = [json.loads(ln)["step"] for ln in (d / "metrics.jsonl").read_text().splitlines()]
    assert steps == [json.loads(ln)["step"] for ln in (ref / "metrics.jsonl").read_text().splitlines()]


FIXTURES = Path(os.environ.get("SCORESDE_FIXTURES") or ROOT.parent / "shared" / "fixtures" / "score_sde")


@pytest.mark.skipif(not (FIXTURES / "ddpmpp_vp.pth").is_file(), reason="score_sde reference fixtures not found")
def test_score_sde_sampling_eps_is_applied_by_scoresde_sample(tmp_path):
    """Before: ``sampling.sampling_eps`` of a score_sde config was silently ignored by ``scoresde-sample``."""
    c = torch.load(FIXTURES / "ddpmpp_vp.golden.pt", weights_only=False)["config"]
    model = {k: v for k, v in c.items() if k not in ("image_size", "num_channels", "sde", "continuous")}
    data = dict(dataset="CIFAR10", image_size=c["image_size"], num_channels=c["num_channels"], centered=True)
    imgs = tmp_path / "imgs.npz"
    np.savez(imgs, x=np.random.default_rng(0).integers(0, 256, size=(8, 3, 16, 16)).astype(np.uint8))

    def run(name, sampling, extra):
        cfg = tmp_path / f"{name}.py"
        cfg.write_text("import ml_collections\n\n\ndef get_config():\n    c = ml_collections.ConfigDict()\n"
                       f"    c.model = {model!r}\n    c.data = {data!r}\n    c.sampling = {sampling!r}\n"
                       f"    c.training = {dict(sde=c['sde'], continuous=c['continuous'])!r}\n    return c\n")
        sample_main([f"score_sde_ckpt={FIXTURES / 'ddpmpp_vp.pth'}", f"score_sde_config={cfg}", "sampler=ddim",
                     "sampler.steps=2", "eval.n_samples=2", "eval.batch_size=2", "eval.fd=false", "+data=tensor_file",
                     f"data.path={imgs}", "data.tensor_file.levels=256", "progress=false", *extra, f"hydra.run.dir={tmp_path / name}"])
        return torch.load(tmp_path / name / "samples.pt")

    from_config = run("cfg", {"sampling_eps": 0.3}, [])
    given = run("given", {}, ["sampler.eps=0.3"])
    default = run("default", {}, [])
    assert torch.equal(from_config, given) and not torch.equal(from_config, default)


def test_sample_says_where_its_output_goes_before_and_after(finished, tmp_path, capsys):
    out = tmp_path / "s"
    sample_main(SAMPLE + [f"ckpt={finished}", f"hydra.run.dir={out}"])
    log = (out / "cli.log").read_text()
    assert log.count(f"output directory: {out}") == 2


_KILL_IN_WRITE = """
import os, signal, sys, torch
real, calls, K = torch.save, [0], int(sys.argv[1])
def save(obj, f, *a, **kw):  # the K-th checkpoint write dies half-way: a torn temporary file is left behind
    calls[0] += 1
    if calls[0] == K:
        real(obj, f, *a, **kw)
        f.flush()
        f.truncate(f.tell() // 2)
        os.kill(os.getpid(), signal.SIGKILL)
    return real(obj, f, *a, **kw)
torch.save = save
from scoresde.cli import train_main
train_main(sys.argv[2:])
"""


@pytest.mark.slow
def test_kill_9_inside_a_checkpoint_write_leaves_the_old_checkpoint_and_resumes_bitwise(tmp_path):
    args = TINY + ["train.n_steps=40", "train.checkpoint_every=1", "train.log_every=5"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    ref, d = tmp_path / "ref", tmp_path / "killed"
    assert subprocess.run([sys.executable, "-m", "scoresde.cli", "train", *args, f"hydra.run.dir={ref}"], cwd=tmp_path,
                          env=env, capture_output=True).returncode == 0
    p = subprocess.run([sys.executable, "-c", _KILL_IN_WRITE, "17", *args, f"hydra.run.dir={d}"], cwd=tmp_path, env=env,
                       capture_output=True, text=True)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    torn = list(d.glob(".checkpoint.pt.*.tmp"))
    assert len(torn) == 1 and torn[0].stat().st_size > 0
    assert torch.load(d / "checkpoint.pt", weights_only=True)["step"] == 16  # the previous write, intact
    p = subprocess.run([sys.executable, "-m", "scoresde.cli", "train", *args, f"hydra.run.dir={d}"], cwd=tmp_path, env=env,
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "left by an interrupted write" in p.stdout + p.stderr and not torn[0].exists()
    a, b = _final_state(ref), _final_state(d)
    for k in ("model", "ema"):
        assert all(torch.equal(a[k][n], b[k][n]) for n in a[k]), k


def test_compare_refuses_a_variant_directory_of_another_run(tmp_path, capsys):
    from scoresde.cli import compare_main

    d = tmp_path / "cmp"
    args = ["experiment=ddpm_vs_sde", "train=tiny", "eval=tiny", "progress=false", "model=mlp", "model.hidden=16", "model.depth=1", "data.n_train=200",
            "data.n_eval=40", "eval.nll=false", "eval.n_samples=8", "eval.batch_size=8", "compare.variants=[ddpm]",
            "compare.elbo=false", "compare.nll=false", f"hydra.run.dir={d}"]
    (d / "ddpm").mkdir(parents=True)
    train_main(TINY + ["data=moons", f"hydra.run.dir={d / 'ddpm'}"])  # another run where the variant would train
    before = tree_hash(d / "ddpm")
    line = fails_with_one_line(compare_main, args, capsys)
    assert "holds another run: data.name was 'moons', now 'digits'" in line
    assert tree_hash(d / "ddpm") == before and not (d / LOCK_NAME).exists()


def test_a_sweep_into_a_sweep_directory_of_other_runs_fails_before_the_first_job(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    train_main(["-m"] + TINY + ["seed=1,2", f"hydra.sweep.dir={sweep}"])
    before = tree_hash(sweep)
    line = fails_with_one_line(train_main, ["-m"] + TINY + ["seed=1,3", f"hydra.sweep.dir={sweep}"], capsys)
    assert "(job 1: seed=3)" in line and "seed was 2, now 3" in line
    assert tree_hash(sweep) == before


def test_sample_rejects_a_float_in_shape_and_counts_non_finite_rows(caplog):
    """Before: shape (4.5, 2) was silently truncated to (4, 2); a non-finite sample was only counted by the CLI."""
    import logging

    from scoresde.samplers import sample
    from scoresde.sde import VPSDE

    with pytest.raises(TypeError, match="shape must be a sequence of ints"):
        sample(lambda x, t: -x, VPSDE(), (4.5, 2), method="ddim", steps=2)
    import numpy as np

    assert sample(lambda x, t: -x, VPSDE(), (np.int64(3), 2), method="ddim", steps=2).x.shape == (3, 2)

    def score(x, t):  # row 1 blows up
        out = -x.clone()
        out[1] = float("nan")
        return out

    with caplog.at_level(logging.WARNING, logger="scoresde"):
        res = sample(score, VPSDE(), (4, 2), method="ddim", steps=2, generator=torch.Generator().manual_seed(0))
    assert res.info["n_nonfinite"] == 1 and "1 of 4 samples are not finite" in caplog.text
    assert torch.isfinite(res.x[[0, 2, 3]]).all()
