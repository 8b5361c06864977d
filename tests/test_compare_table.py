"""The comparison table carries FD with its floor and k-NN precision / recall per sampler for image data."""

from __future__ import annotations

from scoresde.compare import _compare_row, _write_compare_table


def _metrics(fd, p, r):
    s = {"method": "dpm_solver", "nfe_mean": 20, "fd": fd, "precision": p, "recall": r, "nonfinite": 0,
         "fd_floor": 51.84, "precision_floor": 0.81, "recall_floor": 0.79, "n_floor": 300}
    return {"train": {"steps": 2000, "seconds": 300.0}, "nll": {"test": {"bpd": 2.05, "bpd_stderr": 0.014}},
            "samplers": {"fast": s}}


def test_image_table_has_fd_precision_recall_and_floors(tmp_path):
    rows = [_compare_row("vp", _metrics(60.5, 0.72, 0.64), ["fast"]), _compare_row("ve", _metrics(70.25, 0.6, 0.5), ["fast"])]
    _write_compare_table(rows, ["fast"], tmp_path)
    md = (tmp_path / "comparison.md").read_text()
    assert "| variant | train min | test NLL (ODE) bits/dim | test DDPM ELBO bits/dim | fast: method, NFE, FD, precision / recall |" in md
    assert "| vp | 5.0 | 2.050 ± 0.014 | n/a | dpm_solver, 20, 60.5, 0.72 / 0.64 |" in md
    assert "the floor): 51.84; precision / recall of those training images: 0.81 / 0.79 (k-NN, N = 300)" in md
    csv = (tmp_path / "comparison.csv").read_text().splitlines()
    assert "fast_precision" in csv[0] and "recall_floor" in csv[0]
