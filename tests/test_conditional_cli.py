"""Class-conditional models and guided sampling from the command line: ``model.num_classes``, ``train.p_uncond``,
``scoresde-sample guidance=... class_label=...``, and the refusals of options that do not fit the model or the data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import re

from scoresde.cli import sample_main, train_main

TINY = ["train=tiny", "eval=tiny", "progress=false", "eval.nll=false"]
GMM_COND = TINY + ["data=gmm", "model=mlp", "model.hidden=16", "model.depth=1", "model.num_classes=5",
                   "data.n_train=200", "data.n_eval=40", "sampler=dpm_solver", "sampler.steps=4"]


def metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def fails(main, args, match, capsys):
    """The app exits 2 with one line on stderr that matches ``match``."""
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and re.search(match, err), err


@pytest.fixture(scope="module")
def cond_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("cond") / "run"
    train_main(GMM_COND + ["train.p_uncond=0.2", f"hydra.run.dir={d}"])
    return d


def test_conditional_training_records_labels_and_samples_balanced_classes(cond_run):
    m = metrics(cond_run)
    assert m["config"]["model"]["num_classes"] == 5 and m["config"]["train"]["p_uncond"] == 0.2
    s = m["samples"]
    assert s["guidance"] == 0 and s["class_label"] is None and s["network_rows_per_nfe"] == 1 and s["nfe"] == 4
    labels = torch.load(cond_run / "labels.pt")
    assert torch.equal(labels, torch.arange(labels.numel()) % 5)
    spec = json.loads((cond_run / "spec.json").read_text())
    assert spec["net"]["kwargs"]["num_classes"] == 5


def test_sample_with_classifier_free_guidance(cond_run, tmp_path):
    out = tmp_path / "g"
    sample_main([f"ckpt={cond_run}", "sampler=dpm_solver", "sampler.steps=4", "eval=tiny", "eval.n_samples=12",
                 "guidance=2", "class_label=3", "progress=false", f"hydra.run.dir={out}"])
    s = metrics(out)["samples"]
    assert s["guidance"] == 2 and s["class_label"] == 3 and s["nfe"] == 4 and s["network_rows_per_nfe"] == 2
    assert torch.equal(torch.load(out / "labels.pt"), torch.full((12,), 3))


def test_guidance_zero_reproduces_the_conditional_model(cond_run, tmp_path):
    """``guidance=0 class_label=c`` and ``guidance=0`` with balanced labels draw the same sample for the same label."""
    a, b = tmp_path / "a", tmp_path / "b"
    common = [f"ckpt={cond_run}", "sampler=ode", "sampler.ode_method=euler", "sampler.steps=3", "eval=tiny",
              "eval.n_samples=5", "eval.quality=false", "progress=false"]
    sample_main(common + ["class_label=0", f"hydra.run.dir={a}"])
    sample_main(common + [f"hydra.run.dir={b}"])
    xa, xb = torch.load(a / "samples.pt"), torch.load(b / "samples.pt")
    assert torch.equal(xa[0], xb[0])  # sample 0 has label 0 in both; the ODE from the same x_T
    assert not torch.equal(xa[1], xb[1])  # sample 1: label 0 vs label 1


def test_null_label_samples_the_unconditional_branch(cond_run, tmp_path):
    """``class_label=K`` (the null label) draws from s(x, t, null) with one network row per NFE."""
    out = tmp_path / "null"
    sample_main([f"ckpt={cond_run}", "sampler=dpm_solver", "sampler.steps=4", "eval=tiny", "eval.n_samples=6",
                 "class_label=5", "progress=false", f"hydra.run.dir={out}"])
    s = metrics(out)["samples"]
    assert s["class_label"] == 5 and s["network_rows_per_nfe"] == 1 and s["nfe"] == 4 and "class_accuracy" not in s
    assert torch.equal(torch.load(out / "labels.pt"), torch.full((6,), 5))


@pytest.mark.parametrize("args, match", [
    (["guidance=-1"], "guidance must be a finite number >= 0"),
    (["class_label=-2"], "class_label must be null"),
    (["class_label=6"], r"class_label must be null \(balanced\), in \[0, 4\], or 5"),
    (["class_label=5", "guidance=1"], "null label"),
    (["classifier=/no/such/dir"], "classifier: no such file"),
])
def test_bad_guidance_options_are_refused(cond_run, tmp_path, args, match, capsys):
    out = tmp_path / "bad"
    fails(sample_main, [f"ckpt={cond_run}", "eval=tiny", "progress=false", f"hydra.run.dir={out}"] + args, match, capsys)
    assert not (out / "metrics.json").exists()


def test_guidance_on_an_unconditional_model_is_refused(tmp_path, capsys):
    d = tmp_path / "u"
    train_main(TINY + ["data=gmm", "model=mlp", "model.hidden=8", "model.depth=1", "data.n_train=100", "data.n_eval=20",
                       "eval.n_samples=0", f"hydra.run.dir={d}"])
    fails(sample_main, [f"ckpt={d}", "eval=tiny", "guidance=1", "class_label=1", "progress=false",
                        f"hydra.run.dir={tmp_path / 's'}"], "need a class-conditional model", capsys)


@pytest.mark.parametrize("args, match", [
    (["data=moons", "model.num_classes=5"], "needs labelled data: data.name must be one of"),
    (["data=gmm", "model.num_classes=4"], "model.num_classes must equal the number of classes of data='gmm', 5"),
    (["data=gmm", "model.num_classes=5", "train.p_uncond=1.0"], r"train.p_uncond .*must lie in \[0, 1\)"),
])
def test_bad_conditional_training_options_fail_before_work(tmp_path, args, match, capsys):
    d = tmp_path / "r"
    fails(train_main, TINY + ["model=mlp", "model.hidden=8", "model.depth=1"] + args + [f"hydra.run.dir={d}"], match, capsys)
    assert not d.exists() or not any(d.iterdir())
