"""scoresde-export, scoresde-distill and scoresde-train-classifier: the library's options as Hydra apps (one line
then exit 2 on bad input)."""

from __future__ import annotations

import json

import pytest
import torch

from scoresde.cli import distill_main, export_main, train_main


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "tiny"
    train_main(["train=tiny", "eval=tiny", "progress=false", "model.hidden=16", "model.depth=1", "data.n_train=200",
                "data.n_eval=40", "eval.nll=false", f"hydra.run.dir={run}"])
    return run


def test_export_safetensors_from_the_command_line_loads_back(tiny_run, tmp_path):
    import scoresde

    out = tmp_path / "st"
    export_main([f"ckpt={tiny_run}", "format=safetensors", f"out={out}", f"hydra.run.dir={tmp_path / 'h'}"])
    assert {p.name for p in out.iterdir()} >= {"model.safetensors", "config.json", "README.md"}
    exported, _ = scoresde.load(out)
    trained, _ = scoresde.load(tiny_run)
    x, t = torch.randn(3, 2), torch.full((3,), 0.5)
    assert torch.equal(exported.score_fn(x, t), trained.score_fn(x, t))


def test_export_onnx_from_the_command_line(tiny_run, tmp_path):
    onnx = pytest.importorskip("onnx")
    out = tmp_path / "onnx"
    export_main([f"ckpt={tiny_run}", "format=onnx", "output=score", f"out={out}", f"hydra.run.dir={tmp_path / 'h'}"])
    model = onnx.load(str(out / "model.onnx"))
    assert [i.name for i in model.graph.input] == ["x", "t"]
    assert json.loads((out / "config.json").read_text())["net"]["name"] == "mlp"


def test_bad_options_are_one_line_and_exit_2(tiny_run, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        export_main([f"ckpt={tiny_run}", "format=tflite", f"hydra.run.dir={tmp_path / 'e'}"])
    assert e.value.code == 2 and "format must be one of" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        export_main(["format=onnx", f"hydra.run.dir={tmp_path / 'e2'}"])
    assert e.value.code == 2 and "ckpt must be given" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        distill_main(["final_steps=3", f"workdir={tmp_path / 'd'}"])
    assert e.value.code == 2 and "final_steps must be a power of 2" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_distill_runs_from_the_command_line(tmp_path):
    work = tmp_path / "distill"
    distill_main(["start_steps=4", "final_steps=2", "n_steps=20", "n_data=512", "n_eval=64", "hidden=16", "depth=1",
                  "batch_size=64", "progress=false", f"workdir={work}"])
    rounds = [json.loads(line) for line in (work / "rounds.jsonl").read_text().splitlines()]
    assert [r["steps"] for r in rounds] == [4, 2]


def test_train_classifier_yaml_lists_every_option_with_its_default():
    """``configs/train_classifier.yaml`` is ClassifierOptions' fields with their defaults, nothing else."""
    import dataclasses
    from pathlib import Path

    import yaml

    from scoresde.classifier import ClassifierOptions

    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "scoresde/configs/train_classifier.yaml").read_text())
    cfg = {k: v for k, v in cfg.items() if k not in ("defaults", "hydra")}
    lib = {f.name: (list(f.default) if isinstance(f.default, tuple) else f.default)
           for f in dataclasses.fields(ClassifierOptions)}
    assert cfg == lib


def test_classifier_guidance_from_the_command_line(tiny_run, tmp_path, capsys):
    """scoresde-train-classifier on the gmm, then classifier-guided sampling of the unconditional tiny run."""
    from scoresde.cli import sample_main, train_classifier_main

    clf = tmp_path / "clf"
    train_classifier_main(["dataset=gmm", "n_steps=20", "batch_size=32", "n_train=200", "n_eval=50", "hidden=16",
                           "depth=1", "progress=false", f"workdir={clf}"])
    m = json.loads((clf / "metrics.json").read_text())
    assert m["dataset"] == "gmm" and m["train_steps"] == 20 and m["n_test"] == 50
    assert set(m["accuracy"]) == {"0.01", "0.1", "0.3", "0.5", "0.8"} and (clf / "checkpoint.pt").is_file()
    out = tmp_path / "s"
    sample_main([f"ckpt={tiny_run}", f"classifier={clf}", "guidance=1", "class_label=2", "sampler=dpm_solver",
                 "sampler.steps=4", "eval=tiny", "eval.n_samples=8", "progress=false", f"hydra.run.dir={out}"])
    s = json.loads((out / "metrics.json").read_text())["samples"]
    assert s["classifier"] == str(clf) and s["guidance"] == 1 and s["class_label"] == 2 and s["nfe"] == 4
    assert torch.equal(torch.load(out / "labels.pt"), torch.full((8,), 2))
    with pytest.raises(SystemExit) as e:  # 5 gmm classes: label 5 does not exist
        sample_main([f"ckpt={tiny_run}", f"classifier={clf}", "guidance=1", "class_label=5", "eval=tiny",
                     "progress=false", f"hydra.run.dir={tmp_path / 'bad'}"])
    assert e.value.code == 2 and "class_label must lie in [0, 4]" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        train_classifier_main(["dataset=moons", f"workdir={tmp_path / 'c2'}"])
    assert e.value.code == 2 and "dataset" in capsys.readouterr().err


def test_inpaint_yaml_lists_every_option_with_its_default():
    import dataclasses
    from pathlib import Path

    import yaml

    from scoresde.controllable import InpaintOptions

    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "scoresde/configs/inpaint.yaml").read_text())
    cfg = {k: v for k, v in cfg.items() if k not in ("defaults", "hydra")}
    assert cfg == {f.name: f.default for f in dataclasses.fields(InpaintOptions)}


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "digits"
    train_main(["train=tiny", "eval=tiny", "progress=false", "data=digits", "data.n_train=64", "data.n_eval=8",
                "model=convnet", "model.ch=8", "model.ch_mult=[1,2]", "model.num_res_blocks=1", "model.num_classes=10",
                "eval.nll=false", "eval.n_samples=0", f"hydra.run.dir={run}"])
    return run


def test_inpaint_from_the_command_line_keeps_the_known_pixels(digits_run, tmp_path):
    from scoresde.cli import inpaint_main
    from scoresde.controllable import named_mask

    out = tmp_path / "ip"
    inpaint_main([f"ckpt={digits_run}", "mask=top_half", "n_images=3", "samples_per_image=2", "steps=5", "method=pc",
                  "progress=false", f"hydra.run.dir={out}"])
    m = json.loads((out / "metrics.json").read_text())
    assert m["known_exact"] and m["nfe"] == 5 * 2 + 1 and m["n_images"] == 3  # predictor + corrector, + denoise
    comps, inputs = torch.load(out / "completions.pt"), torch.load(out / "inputs.pt")
    assert comps.shape == (3, 2, 1, 8, 8) and inputs.shape == (3, 1, 8, 8)
    mask = named_mask("top_half", (1, 8, 8))[0]
    assert torch.equal(comps[:, :, mask], inputs[:, None, mask].expand(3, 2, -1))
    assert (out / "inpaint.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    q = m["quality"]  # digits: FD / precision / recall of the 6 completed images against the test split
    assert q["n_floor"] == 6 and q["fd"] > 0 and q["fd_floor"] > 0 and 0 <= q["precision"] <= 1


def test_inpaint_with_a_mask_file_ode_and_a_class_label(digits_run, tmp_path):
    import numpy as np

    from scoresde.cli import inpaint_main

    mask = np.zeros((8, 8), dtype=bool)
    mask[:, :3] = True
    np.save(tmp_path / "mask.npy", mask)
    out = tmp_path / "ip2"
    inpaint_main([f"ckpt={digits_run}", f"mask={tmp_path / 'mask.npy'}", "n_images=2", "samples_per_image=1",
                  "method=ode", "steps=3", "class_label=4", "progress=false", f"hydra.run.dir={out}"])
    m = json.loads((out / "metrics.json").read_text())
    assert m["known_exact"] and m["nfe"] == 3 * 2 + 1  # Heun: 2 calls per step, then Tweedie's denoising
    comps, inputs = torch.load(out / "completions.pt"), torch.load(out / "inputs.pt")
    assert torch.equal(comps[:, 0, 0, :, :3], inputs[:, 0, :, :3])


@pytest.mark.parametrize("args, match", [
    (["mask=diagonal"], "mask must be one of"),
    (["task=colorize"], "task=colorize needs 3-channel images"),
    (["images=holdout"], "images must be one of"),
    (["method=ddim"], "method must be one of"),
    (["class_label=11"], r"class_label must lie in \[0, 9\] or be 10"),
])
def test_inpaint_bad_options_are_one_line_and_exit_2(digits_run, tmp_path, capsys, args, match):
    import re

    from scoresde.cli import inpaint_main

    with pytest.raises(SystemExit) as e:
        inpaint_main([f"ckpt={digits_run}", "progress=false", f"hydra.run.dir={tmp_path / 'bad'}"] + args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and re.search(match, err), err
