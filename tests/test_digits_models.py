"""experiments/digits_models.py end to end on tiny settings: train with the noise-mixture augmentation and an lr
decay, validation selection, test scoring, checkpoint export that ``load_trained`` rebuilds, and collation."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("digits_models", ROOT / "experiments" / "digits_models.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_digits_models_tiny_run_exports_and_collates(tmp_path):
    dm = _script()
    dm.REG_COVARS = (1e-6, 3e-4)  # the baselines' grid, cut short (both fits still chosen on val)
    out, ckpt = tmp_path / "run", tmp_path / "ckpt"
    dm.main(["--models", "ddpm", "ve", "--steps", "6", "--eval-every", "3", "--patience", "2", "--hidden", "16",
             "--depth", "1", "--batch", "32", "--warmup", "2", "--lr-schedule", "cosine", "--lr-final-ratio", "0.1",
             "--aug-prob", "0.5", "--aug-std-min", "0.05", "--aug-std-max", "0.4", "--rtol", "1e-2", "--test-probes", "1",
             "--workdir", str(tmp_path / "w"), "--ckpt-root", str(ckpt), "--out", str(out)])
    run = json.loads(out.with_suffix(".json").read_text())
    rows = {r["model"]: r for r in run["rows"]}
    assert set(rows) == {"ddpm", "ve"}
    for kind, r in rows.items():
        assert r["steps"] == 6 and r["best_step"] in (3, 6)
        assert [s for s, _ in r["val_curve"]] == [3, 6]
        assert r["recipe"]["aug_prob"] == 0.5 and r["recipe"]["aug_std_max"] == 0.4 and r["recipe"]["lr_schedule"] == "cosine"
        assert torch.isfinite(torch.tensor([r["test_bpd"], r["test_se"], r["test_max"]])).all() and r["test_se"] > 0
        # the exported checkpoint is the selected one: load_trained rebuilds the same EMA model the run scored
        spec = json.loads((ckpt / kind / "model.json").read_text())
        assert spec["best_step"] == r["best_step"] and spec["test_bpd"] == r["test_bpd"]
        model = dm.load_trained(ckpt / kind)
        ref = torch.load(ckpt / kind / "best.pt", map_location="cpu", weights_only=False)
        assert ref["step"] == r["best_step"] and not model.training
        ema = ref["ema"]["module"]
        assert all(torch.equal(v, ema[k]) for k, v in model.state_dict().items())
    assert "test_elbo_bpd" in rows["ddpm"] and "test_elbo_bpd" not in rows["ve"]
    assert len(run["baselines"]) == 2 and all(b["test_se"] > 0 for b in run["baselines"])
    # collation writes one table with the baselines and every model row
    dm.main(["--collate", str(out.with_suffix(".json")), "--out", str(tmp_path / "table")])
    md = (tmp_path / "table.md").read_text()
    assert "| ddpm | " in md and "| ve | " in md and "GMM full cov" in md and "aug_prob 0.5" in md
    assert (tmp_path / "table.csv").read_text().count("\n") == 5  # header + 2 baselines + 2 models
