"""experiments/digits_models.py end to end on tiny settings: train with the noise-mixture augmentation and an lr
decay, validation selection, test scoring, checkpoint export that ``scoresde.build.load`` rebuilds from the
checkpoint's own spec, --reevaluate on it, and collation."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

from scoresde.build import load

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
        # the exported checkpoint is the selected one: scoresde.build.load rebuilds, from the spec the checkpoint
        # carries, the same EMA model the run scored; metrics.json beside it records the selection and the scores
        metrics = json.loads((ckpt / kind / "metrics.json").read_text())
        assert metrics["best_step"] == r["best_step"] and metrics["test_bpd"] == r["test_bpd"]
        assert not (ckpt / kind / "model.json").exists()
        model, sde = load(ckpt / kind / "best.pt")
        ref = torch.load(ckpt / kind / "best.pt", map_location="cpu", weights_only=False)
        assert ref["step"] == r["best_step"] and not model.training and sde is model.sde
        assert ref["spec"]["net"]["name"] == "mlp" and ref["spec"]["data_shape"] == [64] and ref["spec"]["seed"] == 0
        assert ref["spec"]["continuous"] == (kind != "ddpm") and ref["spec"]["data"]["levels"] == 17
        assert ref["spec"]["data"]["options"]["noise_mixture_prob"] == 0.5
        ema = ref["ema"]["module"]
        assert all(torch.equal(v, ema[k]) for k, v in model.state_dict().items())
    assert "test_elbo_bpd" in rows["ddpm"] and "test_elbo_bpd" not in rows["ve"]
    assert len(run["baselines"]) == 2 and all(b["test_se"] > 0 for b in run["baselines"])
    # --reevaluate reloads the exported checkpoint with load(): at eps = 1e-5 it reproduces the run's selected val bpd
    dm.main(["--reevaluate", str(out.with_suffix(".json")), "--models", "ve", "--ckpt-root", str(ckpt), "--eval-stds", "0.02",
             "--rtol", "1e-2", "--test-probes", "1", "--out", str(tmp_path / "re")])
    re_rows = {r["model"]: r for r in json.loads((tmp_path / "re.json").read_text())["rows"]}
    assert re_rows["ddpm"] == rows["ddpm"] and re_rows["ve"]["test_bpd_eps1e-5"] == rows["ve"]["test_bpd"]
    assert [c["eps"] for c in re_rows["ve"]["val_bpd_eps"]][0] == 1e-5 and len(re_rows["ve"]["val_bpd_eps"]) == 2
    assert abs(re_rows["ve"]["val_bpd_eps"][0]["val_bpd"] - rows["ve"]["val_bpd"]) < 1e-9
    # collation writes one table with the baselines and every model row
    dm.main(["--collate", str(out.with_suffix(".json")), "--out", str(tmp_path / "table")])
    md = (tmp_path / "table.md").read_text()
    assert "| ddpm | " in md and "| ve | " in md and "GMM full cov" in md and "aug_prob 0.5" in md
    assert (tmp_path / "table.csv").read_text().count("\n") == 5  # header + 2 baselines + 2 models
