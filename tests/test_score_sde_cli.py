"""The paper's checkpoints from the command line: ``scoresde-sample`` / ``scoresde-nll`` with
``score_sde_ckpt=<file.pth> score_sde_config=<config.py>`` run every sampler family and bits/dim end to end on the
reference fixtures (score_sde_pytorch networks with random weights, 16x16x3), on a user's own images."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from scoresde.cli import nll_main, sample_main

FIXTURES = Path(os.environ.get("SCORESDE_FIXTURES") or Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "score_sde")
pytestmark = pytest.mark.skipif(not (FIXTURES / "ddpmpp_vp.pth").is_file(),
                                reason=f"score_sde reference fixtures not found at {FIXTURES} (set SCORESDE_FIXTURES)")


def _config_file(tmp_path: Path, name: str) -> Path:
    """A score_sde config .py file for a fixture, from its golden 'config'."""
    c = torch.load(FIXTURES / f"{name}.golden.pt", weights_only=False)["config"]
    model = {k: v for k, v in c.items() if k not in ("image_size", "num_channels", "sde", "continuous")}
    data = dict(dataset="CIFAR10", image_size=c["image_size"], num_channels=c["num_channels"], centered=c["sde"] != "vesde")
    path = tmp_path / f"{name}_config.py"
    path.write_text(
        "import ml_collections\n\n\ndef get_config():\n    c = ml_collections.ConfigDict()\n"
        f"    c.model = {model!r}\n    c.data = {data!r}\n"
        f"    c.training = {dict(sde=c['sde'], continuous=c['continuous'])!r}\n    return c\n")
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    path = tmp_path_factory.mktemp("imgs") / "imgs.npz"
    np.savez(path, x=np.random.default_rng(0).integers(0, 256, size=(20, 3, 16, 16)).astype(np.uint8))
    return path


@pytest.mark.parametrize("name, sampler", [("ddpmpp_vp", ["sampler=pc", "sampler.steps=3"]),
                                           ("ddpmpp_vp", ["sampler=ode", "sampler.rtol=1e-2", "sampler.atol=1e-2"]),
                                           ("ddpmpp_vp", ["sampler=dpm_solver", "sampler.steps=4"]),
                                           ("ncsnpp_ve", ["sampler=pc", "sampler.steps=3"])])
def test_sample_from_a_score_sde_checkpoint(tmp_path, images, name, sampler):
    out = tmp_path / "s"
    sample_main([f"score_sde_ckpt={FIXTURES / (name + '.pth')}", f"score_sde_config={_config_file(tmp_path, name)}",
                 *sampler, "eval.n_samples=2", "eval.batch_size=2", "+data=tensor_file", f"data.path={images}",
                 "data.tensor_file.levels=256", "progress=false", f"hydra.run.dir={out}"])
    m = json.loads((out / "metrics.json").read_text())
    x = torch.load(out / "samples.pt")
    assert x.shape == (2, 3, 16, 16) and torch.isfinite(x).all() and m["samples"]["nfe"] >= 3


def test_bits_per_dim_of_a_score_sde_checkpoint(tmp_path, images):
    out = tmp_path / "n"
    nll_main([f"score_sde_ckpt={FIXTURES / 'ddpmpp_vp.pth'}", f"score_sde_config={_config_file(tmp_path, 'ddpmpp_vp')}",
              "eval.rtol=1e-2", "eval.atol=1e-2", "eval.batch_size=2", "+data=tensor_file", f"data.path={images}",
              "data.tensor_file.levels=256", "progress=false", f"hydra.run.dir={out}"])
    r = json.loads((out / "metrics.json").read_text())["nll"]["test"]
    assert r["n"] == 2 and math.isfinite(r["bpd"]) and r["bpd"] > 0  # 10 % of 20 images carved as test


def test_score_sde_ckpt_needs_its_config(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        nll_main([f"score_sde_ckpt={FIXTURES / 'ddpmpp_vp.pth'}", f"hydra.run.dir={tmp_path / 'x'}"])
    assert e.value.code == 2 and "score_sde_config" in capsys.readouterr().err
