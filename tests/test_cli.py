"""Entry points end to end on tiny settings: train -> sample -> nll, compare, score_sde config files,
multirun sweeps with collation (basic launcher; joblib and submitit_local marked slow), and bad
overrides failing before any work."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scoresde.cli import nll_main, report_main, sample_main, train_main
from scoresde.report import collate_runs

ROOT = Path(__file__).resolve().parents[1]
TINY = ["train=tiny", "eval=tiny", "progress=false"]
TINY_MLP = TINY + ["model.hidden=16", "model.depth=1", "data.n_train=200", "data.n_eval=40"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG_MAGIC


@pytest.fixture(scope="module")
def oracle_run(tmp_path_factory):
    """A ``scoresde-train`` run with the exact GMM score (nothing to train): the NLL has an analytic answer."""
    d = tmp_path_factory.mktemp("oracle") / "run"
    train_main(TINY + ["model=oracle", "data=gmm", "data.n_eval=40", "sde=vp", "eval.divergence=exact",
                       "eval.rtol=1e-6", "eval.atol=1e-6", "eval.n_samples=400", "eval.batch_size=400",
                       "sampler=dpm_solver", "sampler.steps=20", f"hydra.run.dir={d}"])
    return d


@pytest.fixture(scope="module")
def mlp_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("mlp") / "run"
    train_main(TINY_MLP + ["sde=subvp", f"hydra.run.dir={d}"])
    return d


def test_train_writes_config_checkpoint_metrics_and_figure(mlp_run):
    for name in ("config.yaml", "spec.json", "checkpoint.pt", "metrics.json", "metrics.jsonl", "samples.png", ".hydra/overrides.yaml"):
        assert (mlp_run / name).exists(), name
    assert is_png(mlp_run / "samples.png")
    m = metrics(mlp_run)
    assert m["train"]["steps"] == 20 and math.isfinite(m["train"]["final_loss"])
    assert m["config"]["sde"]["name"] == "subvp" and m["config"]["model"]["hidden"] == 16
    s = m["samples"]
    assert s["method"] == "ode" and s["n"] == 16 and s["nfe"] >= 1
    assert {"mmd2", "swd", "mmd2_floor"} <= set(s)
    t = m["nll"]["test"]
    assert t["n"] == 40 and math.isfinite(t["bpd"]) and t["bpd_stderr"] > 0
    assert torch.load(mlp_run / "samples.pt").shape == (16, 2)
    # the apps log through ``logging``: Hydra's log file holds what the console showed
    log = (mlp_run / "cli.log").read_text()
    assert "test bits/dim (PF-ODE)" in log and "run directory" in log


def test_oracle_run_nll_equals_the_exact_density(oracle_run):
    """PF-ODE NLL of the exact score (exact trace, rtol 1e-6) matches the mixture's NLL per dimension."""
    t = metrics(oracle_run)["nll"]["test"]
    # p_eps (eps = 1e-5) differs from p_0 by O(eps); the ODE error is set by rtol
    assert abs(t["nll_nats"] - t["nll_nats_true"]) < 1e-3
    assert t["bpd"] == pytest.approx(t["nll_nats"] / math.log(2))


def test_oracle_samples_reach_the_noise_floor(oracle_run):
    """400 DPM-Solver samples of the exact score vs 40 test points: MMD^2 within the data-vs-data spread."""
    s = metrics(oracle_run)["samples"]
    assert s["nfe"] == 20 and s["nonfinite"] == 0
    # the floor is one draw of the same statistic between two data halves; allow its scale (n=20 vs 20)
    assert s["mmd2"] < 0.05


def test_sample_from_run_dir(mlp_run, tmp_path):
    out = tmp_path / "s"
    sample_main(["ckpt=" + str(mlp_run), "sampler=dpm_solver", "sampler.steps=3", "eval=tiny", "eval.n_samples=10",
                 "eval.batch_size=4", "progress=false", f"hydra.run.dir={out}"])
    m = metrics(out)
    assert m["samples"]["method"] == "dpm_solver" and m["samples"]["nfe"] == 3  # 3 batches (4, 4, 2), 3 calls each
    assert torch.load(out / "samples.pt").shape == (10, 2)
    assert is_png(out / "samples.png")
    assert "nll" not in m and m["checkpoint"].endswith("checkpoint.pt")


def test_sample_is_reproducible_by_seed(mlp_run, tmp_path):
    runs = []
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        sample_main(["ckpt=" + str(mlp_run / "checkpoint.pt"), "sampler=ddim", "sampler.steps=2", "eval=tiny", "eval.quality=false",
                     f"seed={seed}", "progress=false", f"hydra.run.dir={tmp_path / name}"])
        runs.append(torch.load(tmp_path / name / "samples.pt"))
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_nll_per_split_with_standard_errors(oracle_run, tmp_path):
    out = tmp_path / "n"
    nll_main(["ckpt=" + str(oracle_run), "eval=tiny", "eval.splits=[val,test]", "eval.divergence=hutchinson", "eval.probes=2",
              "progress=false", f"hydra.run.dir={out}"])
    m = metrics(out)
    assert set(m["nll"]) == {"val", "test"}
    for split in ("val", "test"):
        r = m["nll"][split]
        assert r["n"] == 40 and r["bpd_stderr"] > 0
        # Hutchinson estimate within 4 standard errors (plus ODE tolerance) of the exact NLL
        assert abs(r["nll_nats"] - r["nll_nats_true"]) < 4 * r["nll_nats_stderr"] + 0.02


def test_digits_discrete_bpd_and_elbo(tmp_path):
    """Discrete data: bits/dim of the 17-level digits via dequantisation, and the DDPM ELBO (VP)."""
    d = tmp_path / "digits"
    train_main(TINY + ["data=digits", "data.n_train=64", "data.n_eval=6", "model.hidden=16", "model.depth=1", "sde.N=50",
                       "eval.elbo=true", "eval.n_samples=4", "eval.rtol=1e-2", "eval.atol=1e-2", "eval.fd=true",
                       f"eval.feature_cache={tmp_path / 'features'}", f"hydra.run.dir={d}"])
    m = metrics(d)
    s = m["samples"]
    assert s["fd_classifier_test_accuracy"] > 0.9 and s["fd"] > s["fd_floor"] >= 0  # 20 training steps: far from the data
    nll, elbo = m["nll"]["test"], m["elbo"]["test"]
    assert nll["n"] == 6 and elbo["n"] == 6 and math.isfinite(nll["bpd"]) and math.isfinite(elbo["bpd"])
    assert elbo["nfe"] == 50  # all N terms of the ELBO, one network call each
    assert is_png(d / "samples.png")


def test_bad_override_fails_before_any_work(tmp_path, capsys):
    d = tmp_path / "bad"
    with pytest.raises(SystemExit) as e:
        train_main(TINY_MLP + ["train.lr=-0.1", f"hydra.run.dir={d}"])
    assert e.value.code == 2
    assert "train.lr must be a finite number > 0; got -0.1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        train_main(TINY_MLP + ["train.n_iters=5", f"hydra.run.dir={d}"])  # an old name: the new one is named
    assert e.value.code == 2 and "train.n_steps" in capsys.readouterr().err
    assert not (d / "checkpoint.pt").exists() and not (d / "metrics.json").exists()
    with pytest.raises(SystemExit):
        train_main(TINY_MLP + ["sde.sigma_max=3", f"hydra.run.dir={tmp_path / 'bad2'}"])
    assert "sde.sigma_max" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sample_main(["ckpt=" + str(tmp_path / "nowhere"), f"hydra.run.dir={tmp_path / 'bad3'}"])
    assert "no such file or directory" in capsys.readouterr().err.lower()


def test_sampler_the_trained_sde_cannot_use_fails_before_sampling(mlp_run, tmp_path, capsys):
    out = tmp_path / "anc"
    with pytest.raises(SystemExit) as e:
        sample_main(["ckpt=" + str(mlp_run), "sampler=pc", "sampler.eps=1.5", f"hydra.run.dir={out}"])  # eps must be < T
    assert e.value.code == 2
    assert "sampler.eps" in capsys.readouterr().err
    assert not (out / "samples.pt").exists()


def test_score_sde_config_file_runs(tmp_path):
    d = tmp_path / "bridge"
    cfg = ROOT / "experiments" / "score_sde_configs" / "ddpm_digits_tiny.py"
    train_main([f"score_sde_config={cfg}", "progress=false", f"hydra.run.dir={d}"])
    m = metrics(d)
    c = m["config"]
    assert c["score_sde_config"] == str(cfg)
    assert c["train"]["continuous"] is False and c["sde"]["N"] == 50 and c["model"]["nf"] == 32 and c["model"]["name"] == "ddpm"
    assert m["samples"]["method"] == "pc" and m["samples"]["nfe"] == 51  # 50 ancestral steps + the denoising step
    assert m["train"]["steps"] == 10


def test_compare_tiny(tmp_path):
    d = tmp_path / "cmp"
    # through experiments/ddpm_vs_sde.py (experiment=ddpm_vs_sde by default; --publish copies the table);
    # the experiment's own train.* values win over the train=tiny group, so set them explicitly
    import importlib.util

    spec = importlib.util.spec_from_file_location("ddpm_vs_sde", ROOT / "experiments" / "ddpm_vs_sde.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main(["--publish", str(tmp_path / "pub")] + TINY + ["train.n_steps=10", "train.eval_every=0", "train.warmup=2",
                         "train.batch_size=16", "data.n_train=64", "data.n_eval=6",
                         "model.hidden=16", "model.depth=1", "eval.n_samples=6",
                         "compare.variants=[ddpm,subvp,ve]",
                         "compare.sde_overrides.ddpm.N=50", "compare.sde_overrides.subvp.N=10", "compare.sde_overrides.ve.N=10",
                         "compare.samplers.ode.rtol=1e-2", "compare.samplers.ode.atol=1e-2",
                         "compare.samplers.fast.steps=3", "compare.samplers_ve.fast.steps=2",
                         "eval.rtol=1e-3", "eval.atol=1e-3", "progress=false", f"hydra.run.dir={d}"])
    rows = list(csv.DictReader(open(d / "comparison.csv")))
    assert [r["variant"] for r in rows] == ["ddpm", "subvp", "ve"]
    by = {r["variant"]: r for r in rows}
    assert by["subvp"]["fast_method"] == "dpm_solver" and by["ve"]["fast_nfe"] != ""
    assert float(by["ddpm"]["ancestral_nfe"]) == 51  # N = 50 steps + denoising
    assert by["ve"]["fast_method"] == "heun" and by["ddpm"]["fast_method"] == "dpm_solver"
    assert by["ddpm"]["elbo_bpd"] != "" and by["ve"]["elbo_bpd"] == ""  # ELBO for the VP chain only
    assert all(r["ode_nll_bpd"] != "" and float(r["ode_nll_bpd_se"]) > 0 for r in rows)
    md = (d / "comparison.md").read_text()
    assert "| ddpm |" in md and "n/a" in md
    assert is_png(d / "comparison.png")
    pub = (tmp_path / "pub" / "ddpm_vs_sde.md").read_text()
    assert "- commit: `" in pub and "- machine: " in pub and "| ddpm |" in pub
    assert (tmp_path / "pub" / "ddpm_vs_sde.csv").read_text() == (d / "comparison.csv").read_text()
    for v in ("ddpm", "subvp", "ve"):  # each variant dir is a complete train run
        assert (d / v / "spec.json").is_file() and (d / v / "checkpoint.pt").is_file()
        assert is_png(d / v / "samples_fast.png")


def test_multirun_sweep_is_collated(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    train_main(["-m"] + TINY_MLP + ["eval.nll=false", "sde=vp,ve", "train.weighting=default,likelihood",
                                    f"hydra.sweep.dir={sweep}"])
    runs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert runs == ["0", "1", "2", "3"]
    rows = list(csv.DictReader(open(sweep / "report.csv")))  # written by the multirun-end callback
    assert len(rows) == 4
    assert {(r["sde"], r["train.weighting"]) for r in rows} == {("vp", "default"), ("vp", "likelihood"), ("ve", "default"), ("ve", "likelihood")}
    assert all(r["samples.mmd2"] != "" for r in rows)
    assert is_png(sweep / "report.png")
    # scoresde-report on the same directory, elsewhere, with chosen metrics
    capsys.readouterr()
    report_main([str(sweep), "--out", str(tmp_path / "rep"), "--metrics", "samples.nfe_mean,train.final_loss", "--name", "t"])
    assert "| run | sde | train.weighting | samples.nfe_mean | train.final_loss |" in capsys.readouterr().out
    res = collate_runs([sweep / "0", sweep / "3"], out_dir=tmp_path / "two")
    assert len(res["rows"]) == 2


def test_report_without_runs_errors(tmp_path):
    with pytest.raises(SystemExit):
        report_main([str(tmp_path)])


def _run_script(args, tmp_path, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "scoresde.cli", *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["joblib", "submitit_local"])
def test_launcher_multirun(tmp_path, launcher):
    """Hydra's launcher plugins run a 2-point sweep in parallel processes; the callback collates it."""
    sweep = tmp_path / launcher
    extra = ["hydra.launcher.n_jobs=2"] if launcher == "joblib" else ["hydra.launcher.timeout_min=10"]
    r = _run_script(["train", "-m", f"hydra/launcher={launcher}", *extra, *TINY_MLP, "eval.nll=false", "sde=vp,subvp",
                     f"hydra.sweep.dir={sweep}"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = list(csv.DictReader(open(sweep / "report.csv")))
    assert sorted(r["sde"] for r in rows) == ["subvp", "vp"]


@pytest.mark.slow
def test_torchrun_data_parallel_train(tmp_path):
    """Two-process data-parallel training of one run under torchrun (gloo), launched like a user would."""
    run_dir = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "scoresde.cli", "train",
           *TINY_MLP, "train.batch_size=16", "eval.nll=false", f"hydra.run.dir={run_dir}"]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    m = metrics(run_dir)
    assert m["train"]["world_size"] == 2 and m["train"]["steps"] == 20


def test_make_prepare_applies_the_noise_mixture_after_dequantisation():
    """``data.noise_mixture_prob`` reaches training: the same generator state gives the dequantised batch plus
    ``noise_mixture``'s draw; ``0`` (the default) leaves the dequantised batch alone."""
    from scoresde.runs import DataOptions, make_prepare
    from scoresde.data.transforms import noise_mixture, uniform_dequantize

    k = torch.randint(0, 17, (256, 64), generator=torch.Generator().manual_seed(0))
    cfg = DataOptions(name="digits", noise_mixture_prob=0.5, noise_mixture_std_min=0.05, noise_mixture_std_max=0.2)
    got = make_prepare(cfg, 17, torch.float64)(k, torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    want = noise_mixture(uniform_dequantize(k, 17, centered=True, generator=g, dtype=torch.float64), 0.5, 0.05, 0.2, generator=g)
    assert torch.equal(got, want)
    plain = make_prepare(DataOptions(name="digits"), 17, torch.float64)(k, torch.Generator().manual_seed(1))
    assert torch.equal(plain, uniform_dequantize(k, 17, centered=True, generator=torch.Generator().manual_seed(1), dtype=torch.float64))


def test_load_rebuilds_a_run_bit_exactly_without_hydra(mlp_run, tmp_path):
    """``scoresde.load`` rebuilds a saved run from its checkpoint alone (no YAML, no data) in a process that never
    imports Hydra: the same score on the same input, bit for bit."""
    from scoresde.build import load

    model, sde = load(mlp_run)
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(0))
    t = torch.linspace(0.1, 0.9, 5)
    torch.save({"x": x, "t": t, "score": model.score_fn(x, t).detach()}, tmp_path / "ref.pt")
    code = (
        "import sys, torch, scoresde\n"
        f"model, sde = scoresde.load({str(mlp_run / 'checkpoint.pt')!r})\n"
        f"ref = torch.load({str(tmp_path / 'ref.pt')!r})\n"
        "assert torch.equal(model.score_fn(ref['x'], ref['t']), ref['score'])\n"
        "assert type(sde).__name__ == 'SubVPSDE' and not model.training\n"
        "assert not any(m.split('.')[0] in ('hydra', 'omegaconf') for m in sys.modules), 'hydra imported'\n"
        "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_run_directory_of_the_previous_release_still_loads(tmp_path, caplog):
    """A run written before checkpoints carried their spec (old field names in config.yaml, no spec.json) is read
    through the one translation table, with a note naming the renamed fields."""
    import logging

    import yaml

    from scoresde.build import build_model, model_spec
    from scoresde.runs import load_run
    from scoresde.sde import VPSDE
    from scoresde.train import TrainOptions, train

    run_dir = tmp_path / "old"
    run_dir.mkdir()
    old_cfg = {"seed": 3, "device": "cpu", "dtype": "float32", "progress": False,
               "sde": {"name": "vp", "beta_min": 0.1, "beta_max": 20.0, "N": 1000, "schedule": "linear"},
               "model": {"name": "mlp", "hidden": 16, "depth": 1, "time_embedding": "fourier", "embed_dim": 64,
                         "fourier_scale": 16.0, "dropout": 0.0, "parameterization": "auto"},
               "data": {"name": "moons", "n_train": None, "n_eval": 10, "root": None, "download": False, "centered": True,
                        "random_flip": False, "dequantize": True, "noise_mixture_prob": 0.0, "noise_mixture_std_min": 0.03,
                        "noise_mixture_std_max": 0.3},
               "sampler": {"method": "ode", "steps": None, "ode_method": "dopri5", "rtol": 1e-5, "atol": 1e-5,
                           "error_norm": "per_sample", "denoise": False, "eps": None},
               "train": {"n_iters": 2, "batch_size": 8, "lr": 1e-3, "grad_clip": 0.0, "ema_rate": 0.9, "continuous": True,
                         "likelihood_weighting": False, "reduce_mean": True, "eps": 1e-5, "ckpt_every": 1},
               "eval": {"n_samples": 4}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(old_cfg))
    model = build_model(model_spec(VPSDE(), "mlp", {"hidden": 16, "depth": 1}, (2,), seed=3))
    del model.spec  # the old release's checkpoints carried no spec
    train(model, lambda m, x, g: (m.score_fn(x, torch.full((x.shape[0],), 0.5)) ** 2).mean(), torch.randn(32, 2),
          TrainOptions(n_steps=2, batch_size=8, lr=1e-3, warmup=0), run_dir, progress=False)
    with caplog.at_level(logging.INFO, logger="scoresde"):
        run = load_run(str(run_dir), "cpu", torch.float32)
    assert "train.n_iters -> train.n_steps" in caplog.text and "train.reduce_mean -> train.reduce" in caplog.text
    assert run.step == 2 and run.data.name == "moons" and run.shape == (2,) and run.seed == 3
    ema = torch.load(run_dir / "checkpoint.pt", weights_only=False)["ema"]["module"]
    assert all(torch.equal(v, ema[k]) for k, v in run.model.state_dict().items())


def test_train_on_the_users_own_array_file(tmp_path, capsys):
    """``data=tensor_file data.path=...``: a user's ``.npz`` of 8-level 4x4 images trains, samples and gets discrete
    bits/dim with no loader written; a bad declaration fails before any work naming the config key."""
    import numpy as np

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "mine.npz", images=rng.integers(0, 8, size=(60, 1, 4, 4)).astype(np.uint8))
    d = tmp_path / "own"
    train_main(TINY + ["data=tensor_file", f"data.path={tmp_path / 'mine.npz'}", "data.tensor_file.levels=8",
                       "model.hidden=16", "model.depth=1", "sde.N=50", "eval.n_samples=4", "eval.rtol=1e-2",
                       "eval.atol=1e-2", f"hydra.run.dir={d}"])
    m = metrics(d)
    assert m["nll"]["test"]["n"] == 6 and math.isfinite(m["nll"]["test"]["bpd"])  # 10 % of 60 carved as test
    assert torch.load(d / "samples.pt").shape == (4, 1, 4, 4)
    with pytest.raises(SystemExit) as e:
        train_main(TINY + ["data=tensor_file", f"data.path={tmp_path / 'mine.npz'}", "data.tensor_file.levels=4",
                           f"hydra.run.dir={tmp_path / 'bad'}"])
    assert e.value.code == 2 and "data.tensor_file.levels" in capsys.readouterr().err
    assert not (tmp_path / "bad" / "checkpoint.pt").exists()
