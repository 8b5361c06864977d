"""scoresde-export and scoresde-distill: the library's options as Hydra apps (one line then exit 2 on bad input)."""

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
