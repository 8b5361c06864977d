"""The DDPM-vs-SDE comparison: discrete DDPM vs continuous VP, sub-VP and VE on one data set, one network and
one optimiser setting; every variant is sampled with every configured sampler and scored by PF-ODE NLL and
the DDPM ELBO. ``run_compare`` writes ``comparison.md``, ``comparison.csv``, ``comparison.png`` and
``metrics.json``; each variant is a complete train run in ``<outdir>/<variant>/``.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from . import build
from .evaluate import evaluate_run, print_summary
from .plots import plot_compare
from .runs import (METRICS_NAME, RunConfig, RunLock, RunOptions, _last_logged_loss, _setup, _write_config, check_run_dir, load_run,
                   remove_orphans, train_model, write_json)
from .train import TrainOptions

__all__ = ["VARIANTS", "VARIANT_SDE", "CompareOptions", "CompareConfig", "variant_config", "samplers_for", "run_compare"]

log = logging.getLogger("scoresde")

VARIANTS = ("ddpm", "vp", "subvp", "ve")
# the SDE of each variant (``ddpm`` is the VP SDE trained on its discrete chain)
VARIANT_SDE = {"ddpm": "vp", "vp": "vp", "subvp": "subvp", "ve": "ve"}


@dataclass
class CompareOptions:
    """Which variants to train and which samplers evaluate each.

    ``samplers``: label -> ``{"method": ..., **options of scoresde.sample}``, used for every variant;
    ``samplers_ve``: label -> replacement for the VE variant (VE has no DDIM / DPM-Solver); a sampler a
    variant cannot use is reported as n/a. ``sde_overrides``: variant -> SDE constructor arguments (e.g.
    ``{ve: {sigma_max: 12.0}}``); ``ema_rate_ve``: the VE EMA rate (the paper uses 0.999 for VE, 0.9999 for VP).
    """

    variants: List[str] = field(default_factory=lambda: list(VARIANTS))
    samplers: Dict[str, Any] = field(default_factory=dict)
    samplers_ve: Dict[str, Any] = field(default_factory=dict)
    sde_overrides: Dict[str, Any] = field(default_factory=dict)
    ema_rate_ve: Optional[float] = None
    nll: bool = True
    elbo: bool = True

    def check(self) -> "CompareOptions":
        """``ValueError`` naming the field: variants, sampler labels, SDE overrides (built), ``ema_rate_ve``."""
        from ._validate import check_choice
        from .samplers import check_method_options

        if not self.variants:
            raise ValueError(f"variants must name at least one of {list(VARIANTS)}")
        for v in self.variants:
            check_choice("variants[i]", v, VARIANTS)
        if not self.samplers:
            raise ValueError("samplers must define at least one sampler (label -> {method: ..., ...})")
        for label, s in list(self.samplers.items()) + list(self.samplers_ve.items()):
            opts = {k: x for k, x in dict(s).items() if k != "method"}
            check_method_options(dict(s).get("method"), opts)
        for label in self.samplers_ve:
            if label not in self.samplers:
                raise ValueError(f"samplers_ve.{label}: no sampler {label!r} in samplers to replace; labels: {list(self.samplers)}")
        for v, over in self.sde_overrides.items():
            check_choice("sde_overrides keys", v, VARIANTS)
            build.build_sde(VARIANT_SDE[v], **dict(over or {}))
        if self.ema_rate_ve is not None:
            TrainOptions(ema_rate=self.ema_rate_ve)
        return self


@dataclass(kw_only=True)
class CompareConfig(RunOptions):
    """Everything ``run_compare`` needs: ``runs.RunOptions`` (shared by every variant) plus ``compare``."""

    compare: CompareOptions


def variant_config(c: CompareConfig, variant: str) -> RunConfig:
    """The ``RunConfig`` of one variant: ``ddpm`` = VP SDE with the discrete loss (``continuous=False``), the
    others continuous DSM; SDE arguments from ``compare.sde_overrides[variant]``; VE's EMA rate ``ema_rate_ve``."""
    over = dict(c.compare.sde_overrides.get(variant, {}) or {})
    train = c.train
    if variant == "ve" and c.compare.ema_rate_ve is not None:
        train = dataclasses.replace(train, ema_rate=c.compare.ema_rate_ve)
    loss = {**c.loss, "continuous": variant != "ddpm"}
    return RunConfig(sde={"name": VARIANT_SDE[variant], "kwargs": over}, net=c.net, data=c.data, sampler={"method": "pc"},
                     train=train, loss=loss, eval=c.eval, parameterization=c.parameterization, seed=c.seed, device=c.device,
                     dtype=c.dtype, progress=c.progress)


def samplers_for(c: CompareConfig, variant: str) -> dict:
    """``label -> sampler dict`` for one variant; a sampler the variant's SDE cannot use maps to ``None`` (n/a)."""
    from .samplers import check_sample_options

    sde = build.build_sde(VARIANT_SDE[variant], **dict(c.compare.sde_overrides.get(variant, {}) or {}))
    out = {}
    for label, node in c.compare.samplers.items():
        s = dict(c.compare.samplers_ve.get(label, node) if variant == "ve" else node)
        try:
            check_sample_options(sde, s["method"], **{k: v for k, v in s.items() if k != "method"})
            out[label] = s
        except ValueError:
            out[label] = None
    return out


def run_compare(c: CompareConfig, outdir, progress: Optional[bool] = None) -> dict:
    """Train every variant (``compare.variants``), evaluate each with every sampler and with the ODE NLL and
    DDPM ELBO, and write ``comparison.md``, ``comparison.csv``, ``comparison.png`` and ``metrics.json``.

    Each variant trains in ``outdir/<variant>/`` (a complete train run: ``scoresde-sample``/``-nll``
    accept it); an interrupted comparison resumes from the variants' checkpoints.
    """
    outdir = Path(outdir)
    progress = c.progress if progress is None else progress
    device, dtype = _setup(c)
    variants = {v: variant_config(c, v) for v in c.compare.variants}
    with RunLock(outdir):  # one writer; each variant directory must hold its own run (checked before any write)
        for v, tc in variants.items():
            check_run_dir(tc, outdir / v)
        remove_orphans(outdir)
        for v in variants:
            if (outdir / v).is_dir():
                remove_orphans(outdir / v)
        return _run_variants(c, variants, outdir, device, dtype, progress)


def _run_variants(c: CompareConfig, variants: dict, outdir: Path, device, dtype, progress: bool) -> dict:
    if c.config:
        _write_config(c.config, outdir)
    plans = {v: samplers_for(c, v) for v in c.compare.variants}
    all_metrics: dict = {"config": c.config, "variants": {}}
    rows = []
    for v, tc in variants.items():
        vdir = outdir / v
        vdir.mkdir(exist_ok=True)
        log.info("=== variant %s", v)
        result, secs = train_model(tc, vdir, device, dtype, progress)
        run = load_run(str(vdir), device, dtype, use_ema=c.eval.use_ema)
        loss = float(result.loss)
        if not result.history and not math.isfinite(loss):  # resumed at its last step: the loss it logged then
            loss = _last_logged_loss(vdir / "metrics.jsonl")
        m: dict = {"train": {"steps": int(result.step), "final_loss": loss, "seconds": secs}, "samplers": {}}
        for label, s in plans[v].items():
            if s is None:
                m["samplers"][label] = None
                continue
            r = evaluate_run(run, s, c.eval, vdir, c.seed, device, dtype, progress, label=label, do_nll=False)
            m["samplers"][label] = r["samples"]
            print_summary(r, prefix=f"{v}/{label} ")
        ev = dataclasses.replace(c.eval, elbo=c.compare.elbo)
        lk = evaluate_run(run, None, ev, vdir, c.seed, device, dtype, progress, do_samples=False, do_nll=c.compare.nll)
        m.update({k: lk[k] for k in ("nll", "elbo") if k in lk})
        print_summary(lk, prefix=f"{v} ")
        write_json(vdir / METRICS_NAME, m)
        all_metrics["variants"][v] = m
        rows.append(_compare_row(v, m, list(c.compare.samplers)))
        write_json(outdir / METRICS_NAME, all_metrics)
        _write_compare_table(rows, list(c.compare.samplers), outdir)
    plot_compare(all_metrics, list(c.compare.samplers), outdir / "comparison.png")
    log.info("comparison table: %s", outdir / "comparison.md")
    return all_metrics


def _fmt_pm(m, se, digits=3):
    if m is None:
        return "n/a"
    return f"{m:.{digits}f} ± {se:.{digits}f}" if se is not None else f"{m:.{digits}f}"


def _compare_row(variant: str, m: dict, labels: list) -> dict:
    row = {"variant": variant, "train_steps": m["train"]["steps"], "train_seconds": round(m["train"]["seconds"], 1)}
    nll = (m.get("nll") or {}).get("test")
    row["ode_nll_bpd"] = nll["bpd"] if nll else None
    row["ode_nll_bpd_se"] = nll["bpd_stderr"] if nll else None
    el = (m.get("elbo") or {}).get("test")
    row["elbo_bpd"] = el["bpd"] if el else None
    row["elbo_bpd_se"] = el["bpd_stderr"] if el else None
    for label in labels:
        s = m["samplers"].get(label)
        row[f"{label}_method"] = f"{s['method']}" if s else None
        row[f"{label}_nfe"] = s["nfe_mean"] if s else None
        row[f"{label}_mmd2"] = s.get("mmd2") if s else None
        row[f"{label}_swd"] = s.get("swd") if s else None
        row[f"{label}_fd"] = s.get("fd") if s else None
        row[f"{label}_precision"] = s.get("precision") if s else None
        row[f"{label}_recall"] = s.get("recall") if s else None
        row[f"{label}_nonfinite"] = s.get("nonfinite") if s else None
        for k in ("fd_floor", "precision_floor", "recall_floor", "n_floor"):
            if s and s.get(k) is not None:
                row[k] = s[k]
        if s and s.get("mmd2_floor") is not None:
            row["mmd2_floor"] = s["mmd2_floor"]
    return row


def _write_compare_table(rows: list, labels: list, outdir: Path) -> None:
    keys = list(rows[0].keys())
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(outdir / "comparison.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in keys})
    use_fd = any(r.get(f"{l}_fd") is not None for r in rows for l in labels)
    q = "FD" if use_fd else "MMD²"
    use_pr = any(r.get(f"{l}_precision") is not None for r in rows for l in labels)
    q += ", precision / recall" if use_pr else ""
    head = (["variant", "train min", "test NLL (ODE) bits/dim", "test DDPM ELBO bits/dim"]
            + [f"{l}: method, NFE, {q}" for l in labels])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["variant"], f"{r['train_seconds'] / 60:.1f}", _fmt_pm(r["ode_nll_bpd"], r["ode_nll_bpd_se"]),
                 _fmt_pm(r["elbo_bpd"], r["elbo_bpd_se"])]
        for l in labels:
            if r.get(f"{l}_nfe") is None:
                cells.append("n/a")
                continue
            v = r.get(f"{l}_fd") if use_fd else r.get(f"{l}_mmd2")
            bad = r.get(f"{l}_nonfinite") or 0
            pr = (f", {r[f'{l}_precision']:.2f} / {r[f'{l}_recall']:.2f}" if r.get(f"{l}_precision") is not None else "")
            cells.append(f"{r[f'{l}_method']}, {r[f'{l}_nfe']:.0f}, " + (f"{v:.4g}" if v is not None else "–") + pr
                         + (f" ({bad} non-finite)" if bad else ""))
        lines.append("| " + " | ".join(cells) + " |")
    floor = next((r.get("fd_floor" if use_fd else "mmd2_floor") for r in rows if r.get("fd_floor" if use_fd else "mmd2_floor") is not None), None)
    if floor is not None:
        q0 = "FD" if use_fd else "MMD²"
        lines += ["", f"{q0} between training and test images of the same count (the floor): {floor:.4g}"]
        pr0 = next((r for r in rows if r.get("precision_floor") is not None), None)
        if pr0 is not None:
            lines[-1] += (f"; precision / recall of those training images: {pr0['precision_floor']:.2f} / "
                          f"{pr0['recall_floor']:.2f} (k-NN, N = {pr0.get('n_floor', '?')})")
        lines[-1] += ". Train min: wall-clock minutes of training."
    (outdir / "comparison.md").write_text("\n".join(lines) + "\n")
