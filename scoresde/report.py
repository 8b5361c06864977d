"""Collation of run and sweep directories into one table (``scoresde-report``, the multirun callback).

Rows: every directory holding a ``metrics.json``; columns: the Hydra overrides that vary across runs
(read from ``.hydra/overrides.yaml`` as plain YAML) and chosen metrics (dotted keys of ``metrics.json``).
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from .plots import plot_report
from .runs import METRICS_NAME

__all__ = ["collate_runs", "find_runs", "DEFAULT_REPORT_METRICS"]


def _flatten_metrics(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k == "config":
            continue
        if isinstance(v, dict):
            out.update(_flatten_metrics(v, key))
        elif isinstance(v, bool) or v is None:
            continue
        elif isinstance(v, (int, float)):
            out[key] = v
        elif isinstance(v, str) and k in ("method",):
            out[key] = v
    return out


def find_runs(paths) -> list[Path]:
    """Every directory holding a ``metrics.json`` under ``paths`` (recursively), sorted."""
    found = set()
    for p in paths:
        p = Path(p)
        if p.is_file() and p.name == METRICS_NAME:
            found.add(p.parent)
        elif p.is_dir():
            found.update(q.parent for q in p.rglob(METRICS_NAME))
    return sorted(found, key=lambda q: (str(q.parent), _natural(q.name)))


def _natural(s: str):
    return (0, int(s)) if s.isdigit() else (1, s)


DEFAULT_REPORT_METRICS = (
    "nll.test.bpd", "nll.test.bpd_stderr", "elbo.test.bpd", "elbo.test.bpd_stderr",
    "samples.nfe_mean", "samples.mmd2", "samples.mmd2_floor", "samples.swd", "train.final_loss", "train.seconds",
)


def collate_runs(paths, out_dir=None, metrics=None, name: str = "report") -> dict:
    """Collate run directories into one table.

    Rows: every run with a ``metrics.json`` under ``paths``. Columns: the run (path relative to the
    common root), the run's Hydra overrides that vary across runs (from ``.hydra/overrides.yaml``),
    then ``metrics`` (dotted keys of ``metrics.json``; default: NLL/ELBO bits/dim, NFE, MMD², loss,
    time -- those present). Writes ``<name>.md``, ``<name>.csv`` and ``<name>.png`` (one bar chart per
    plotted metric) into ``out_dir`` (default: the common root). Returns ``{"rows", "columns", "md", "csv", "png"}``.
    """
    import yaml

    runs = find_runs(paths)
    if not runs:
        raise FileNotFoundError(f"no {METRICS_NAME} found under {[str(p) for p in paths]}")
    root = Path(os.path.commonpath([str(r.resolve()) for r in runs]))
    if len(runs) == 1:
        root = runs[0].resolve().parent
    rows, override_keys = [], []
    for r in runs:
        m = json.loads((r / METRICS_NAME).read_text())
        flat = _flatten_metrics(m)
        ov = {}
        ov_path = r / ".hydra" / "overrides.yaml"
        if ov_path.is_file():
            for o in yaml.safe_load(ov_path.read_text()) or []:
                if "=" in o and not o.startswith("hydra"):
                    k, v = o.split("=", 1)
                    ov[k.lstrip("+~")] = v
        for k in ov:
            if k not in override_keys:
                override_keys.append(k)
        rows.append({"run": str(r.resolve().relative_to(root)) or ".", "_overrides": ov, "_metrics": flat})
    varying = [k for k in override_keys if len({row["_overrides"].get(k) for row in rows}) > 1] or override_keys
    if metrics is None:
        present = set().union(*(row["_metrics"] for row in rows))
        metrics = [k for k in DEFAULT_REPORT_METRICS if k in present]
        if not metrics:
            metrics = sorted(k for k in present if isinstance(rows[0]["_metrics"].get(k), (int, float)))[:8]
    columns = ["run"] + varying + list(metrics)
    table = []
    for row in rows:
        t = {"run": row["run"]}
        t.update({k: row["_overrides"].get(k, "") for k in varying})
        t.update({k: row["_metrics"].get(k, "") for k in metrics})
        table.append(t)
    out_dir = Path(out_dir) if out_dir is not None else root
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path, png_path = out_dir / f"{name}.csv", out_dir / f"{name}.md", out_dir / f"{name}.png"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows(table)

    def cell(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = [f"Runs under `{root}`", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(t[k]) for k in columns) + " |" for t in table]
    md_path.write_text("\n".join(lines) + "\n")
    plotted = [k for k in metrics if not k.endswith("_stderr") and any(isinstance(t[k], (int, float)) for t in table)][:4]
    if plotted:
        plot_report(table, varying, plotted, png_path)
    return {"rows": table, "columns": columns, "md": md_path, "csv": csv_path, "png": png_path if plotted else None, "root": root}
