"""README's main job, `scoresde-train experiment=quickstart`, trained for its full budget: it must reach the
sample quality and likelihood README quotes (seeded: deterministic on a given machine and thread count)."""

from __future__ import annotations

import json

import pytest
import torch


@pytest.mark.slow
def test_quickstart_draws_digits_near_the_floor_with_a_good_likelihood(tmp_path):
    from scoresde.cli import train_main
    from scoresde.features import FeatureExtractor

    run, cache = tmp_path / "quickstart", tmp_path / "features"
    train_main(["experiment=quickstart", "progress=false", f"eval.feature_cache={cache}", f"hydra.run.dir={run}"])
    m = json.loads((run / "metrics.json").read_text())
    s, nll = m["samples"], m["nll"]["test"]
    assert s["n"] == 300 and s["n_floor"] == 300 and s["nonfinite"] == 0
    # Fréchet distance within 1.5x of the train-vs-test floor at the same sample count
    assert s["fd"] <= 1.5 * s["fd_floor"], (s["fd"], s["fd_floor"])
    assert s["precision"] >= 0.8 * s["precision_floor"] and s["recall"] >= 0.8 * s["recall_floor"], s
    # test bits/dim no worse than the MLP quickstart's 2.974 +- 0.022
    assert nll["bpd"] <= 2.98 and nll["n"] == 300
    # recognisable digits of every class: the feature classifier finds each digit among the 300 samples
    ext = FeatureExtractor.load_or_train("digits", cache_dir=cache, seed=0)
    x = torch.load(run / "samples.pt")
    with torch.no_grad():
        counts = torch.bincount(ext.classifier(x.float()).argmax(1), minlength=10)
    assert int(counts.min()) >= 10, counts.tolist()
    assert (run / "samples.png").is_file()
