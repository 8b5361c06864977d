"""Quality per NFE of every sampler on the Gaussian-mixture oracle (VP SDE), D = 2 and D = 64.

For each sampler and steps in {5, 10, 20, 50, 100, 1000}: NFE (counted), wall time (median over repeats) and the
unbiased MMD^2 (RBF, 5 bandwidths around the median heuristic) against a fresh data sample, next to the noise
floor: the spread (std) of the same statistic between independent data samples of the same size. ``z`` is
MMD^2 / floor; ``z < 3`` is "at the noise floor". Writes CSV, PNG and a markdown table under benchmarks/results/.

    OMP_NUM_THREADS=1 python benchmarks/sampler_nfe.py [--quick] [--plot-only] [--fewest]

The full run also scans, on the 2-D mixture, every fixed-step sampler at every step count up to ``FEWEST_MAX_NFE``
NFE and every adaptive sampler over the tolerances ``FEWEST_TOLS``, and lists the fewest NFE at the noise floor of every
sampler in sampler_nfe.md (and sampler_nfe_fewest.{csv,md}); ``--fewest`` runs only that scan.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from pathlib import Path

import torch

from scoresde import GaussianMixture, VPSDE
from scoresde.metrics import median_bandwidth, mmd2_unbiased
from scoresde.samplers import check_sample_options, sample

STEPS = [5, 10, 20, 50, 100, 1000]
FIXED_STEP_CONFIGS = [
    # (label, method, options, max steps); run at every ``STEPS`` up to max steps
    ("PC reverse-diffusion + Langevin", "pc", {}, 1000),
    ("PC ancestral (DDPM)", "pc", {"predictor": "ancestral", "corrector": "none"}, 1000),
    ("PC Euler-Maruyama", "pc", {"predictor": "euler_maruyama", "corrector": "none"}, 1000),
    ("annealed Langevin (5/level)", "langevin", {"n_steps": 5}, 100),
    ("ODE Euler", "ode", {"ode_method": "euler"}, 1000),
    ("ODE midpoint", "ode", {"ode_method": "midpoint"}, 1000),
    ("ODE RK4", "ode", {"ode_method": "rk4"}, 1000),
    ("DDIM eta=0", "ddim", {}, 1000),
    ("DDIM eta=1", "ddim", {"eta": 1.0}, 1000),
    ("DPM-Solver-1", "dpm_solver", {"order": 1}, 1000),
    ("DPM-Solver-2 singlestep", "dpm_solver", {"order": 2, "multistep": False}, 1000),
    ("DPM-Solver-3 singlestep", "dpm_solver", {"order": 3, "multistep": False}, 1000),
    ("DPM-Solver-2M", "dpm_solver", {"order": 2}, 1000),
    ("DPM-Solver-3M", "dpm_solver", {"order": 3}, 1000),
    ("Heun (EDM, Karras)", "heun", {}, 1000),
    ("DPM-Solver++(2M)", "dpm_solver_pp", {"order": 2}, 1000),
    ("DPM-Solver++(3M)", "dpm_solver_pp", {"order": 3}, 1000),
    ("DPM-Solver++(2S)", "dpm_solver_pp", {"order": 2, "multistep": False}, 1000),
    ("DPM-Solver++(3S)", "dpm_solver_pp", {"order": 3, "multistep": False}, 1000),
    ("UniPC-2 bh1", "unipc", {"order": 2}, 1000),
    ("UniPC-3 bh1", "unipc", {"order": 3}, 1000),
    ("UniPC-3 bh2", "unipc", {"order": 3, "variant": "bh2"}, 1000),
    ("UniPC-3 bh1 noise-pred.", "unipc", {"order": 3, "prediction": "noise"}, 1000),
    ("UniPC-2 bh1 noise-pred.", "unipc", {"order": 2, "prediction": "noise"}, 1000),
    ("EDM stochastic S_churn=40", "edm", {"S_churn": 40.0}, 1000),
]
ADAPTIVE_CONFIGS = [("ODE dopri5 tol=%g" % tol, "ode", {"rtol": tol, "atol": tol}) for tol in (1e-2, 1e-3, 1e-5)]
ADAPTIVE_CONFIGS += [("ODE scipy RK45 tol=1e-5", "ode", {"ode_method": "scipy_rk45"})]
ADAPTIVE_CONFIGS += [(f"DPM-Solver-{o - 1}{o} adaptive ({p}-pred.)", "dpm_solver_adaptive", {"order": o, "prediction": p})
                     for o in (2, 3) for p in ("noise", "data")]
# the fewest-NFE scan (D = 2): every fixed-step sampler at every step count with NFE <= FEWEST_MAX_NFE, every adaptive
# one (ADAPTIVE_SCAN: label, method, options; rtol = atol = tol) at each of FEWEST_TOLS
FEWEST_MAX_NFE = 120
FEWEST_TOLS = (0.5, 0.2, 0.1, 0.05, 0.02, 0.01, 5e-3, 2e-3, 1e-3, 1e-4, 1e-5)
ADAPTIVE_SCAN = [("ODE dopri5", "ode", {}), ("ODE scipy RK45", "ode", {"ode_method": "scipy_rk45"})]
ADAPTIVE_SCAN += [(f"DPM-Solver-{o - 1}{o} adaptive ({p}-pred.)", "dpm_solver_adaptive", {"order": o, "prediction": p})
                  for o in (2, 3) for p in ("noise", "data")]


def mixture(D: int) -> GaussianMixture:
    g = torch.Generator().manual_seed(1)
    means = torch.randn(4, D, generator=g, dtype=torch.float64) * (2.0 if D == 2 else 1.0)
    return GaussianMixture(means, torch.tensor([0.15, 0.3, 0.2, 0.25]), torch.tensor([0.4, 0.3, 0.2, 0.1]))


def noise_floor(gm, n, R=10):
    data = [gm.sample(n, torch.Generator().manual_seed(100 + i), dtype=torch.float64) for i in range(R + 1)]
    bw = [median_bandwidth(data[0], data[1]) * c for c in (0.25, 0.5, 1.0, 2.0, 4.0)]
    null = torch.stack([mmd2_unbiased(data[0], data[i], bw) for i in range(1, R + 1)])
    return data[0], bw, float(null.mean()), float(null.std())


def run_one(score_fn, sde, n, D, method, steps, opts, repeats):
    times, r = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        r = sample(score_fn, sde, (n, D), method=method, steps=steps, generator=torch.Generator().manual_seed(5), **opts)
        times.append(time.perf_counter() - t0)
    return r, statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="steps up to 100 only, one repeat")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--plot-only", action="store_true", help="redraw the PNG from an existing CSV")
    ap.add_argument("--fewest", action="store_true", help="only the fewest-NFE-at-the-noise-floor scan (D = 2)")
    ap.add_argument("--report-only", action="store_true", help="rewrite the markdown files from the CSVs")
    args = ap.parse_args()
    if args.report_only:
        report_only(Path(args.out))
        return
    if args.fewest:
        torch.set_num_threads(1)
        fewest(Path(args.out))
        return
    if args.plot_only:
        with open(Path(args.out) / "sampler_nfe.csv") as f:
            plot(list(csv.DictReader(f)), Path(args.out) / "sampler_nfe.png")
        return
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sde = VPSDE()
    # every configuration checked by the library's own rules before the first sample is drawn
    for _, method, opts, _ in FIXED_STEP_CONFIGS:
        check_sample_options(sde, method, steps=STEPS[0], **opts)
    for _, method, opts in ADAPTIVE_CONFIGS:
        check_sample_options(sde, method, **opts)
    rows = []
    for D, n in ((2, 1000), (64, 500)):
        gm = mixture(D)
        data, bw, null_mean, null_sd = noise_floor(gm, n)
        print(f"D={D} n={n}: noise floor (std of data-vs-data MMD^2) = {null_sd:.2e} (mean {null_mean:.1e})")
        sf = gm.score_fn(sde)
        jobs = [(lab, m, o, s) for lab, m, o, mx in FIXED_STEP_CONFIGS for s in STEPS if s <= mx and not (args.quick and s > 100)]
        jobs += [(lab, m, o, None) for lab, m, o in ADAPTIVE_CONFIGS]
        for lab, method, opts, steps in jobs:
            repeats = 1 if args.quick or (steps or 0) >= 1000 or method == "langevin" else 3
            r, wall = run_one(sf, sde, n, D, method, steps, {"dtype": torch.float32, **opts}, repeats)
            mmd = float(mmd2_unbiased(r.x.double(), data, bw)) if torch.isfinite(r.x).all() else float("nan")
            row = {"D": D, "n": n, "sampler": lab, "method": method, "steps": steps if steps is not None else "adaptive",
                   "nfe": r.nfe, "wall_s": round(wall, 4), "mmd2": mmd, "z": mmd / null_sd, "noise_floor_sd": null_sd}
            rows.append(row)
            print(f"  {lab:32s} steps={str(row['steps']):>8s} nfe={r.nfe:5d} wall={wall:7.3f}s mmd2={mmd: .2e} z={mmd / null_sd:7.1f}", flush=True)

    with open(out / "sampler_nfe.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    fewest_lines = fewest(out)
    write_markdown(rows, out / "sampler_nfe.md", fewest_lines)
    plot(rows, out / "sampler_nfe.png")
    print(f"wrote {out / 'sampler_nfe.csv'}, .md, .png")


def _z(r, data, bw, null_sd) -> float:
    mmd = float(mmd2_unbiased(r.x.double(), data, bw)) if torch.isfinite(r.x).all() else float("nan")
    return mmd / null_sd


def fewest(out: Path, D: int = 2, n: int = 1000) -> list[str]:
    """For every sampler on the 2-D mixture: z at every step count with NFE <= FEWEST_MAX_NFE (fixed-step samplers) or
    at every tolerance of FEWEST_TOLS (adaptive ones), the fewest NFE with z < 3 ("first hit") and the fewest NFE from
    which z stays < 3 at every larger NFE scanned ("stays"): few-step multistep solvers are not monotone in the step
    count. Writes sampler_nfe_fewest.{csv,md}; returns the markdown table's lines (for sampler_nfe.md)."""
    sde, gm = VPSDE(), mixture(D)
    data, bw, _, null_sd = noise_floor(gm, n)
    sf = gm.score_fn(sde)
    rows = []
    for lab, method, opts, _ in FIXED_STEP_CONFIGS:
        for steps in range(1, FEWEST_MAX_NFE + 1):
            check_sample_options(sde, method, steps=steps, **opts)
            r, wall = run_one(sf, sde, n, D, method, steps, {"dtype": torch.float32, **opts}, 1)
            if r.nfe > FEWEST_MAX_NFE:
                break
            rows.append({"sampler": lab, "method": method, "steps": steps, "tol": "", "nfe": r.nfe, "z": _z(r, data, bw, null_sd)})
        print(f"  {lab:32s} " + " ".join(f"{r['nfe']}:{r['z']:.1f}" for r in rows if r["sampler"] == lab)[:200], flush=True)
    for lab, method, opts in ADAPTIVE_SCAN:
        sub = []
        for tol in FEWEST_TOLS:
            check_sample_options(sde, method, rtol=tol, atol=tol, **opts)
            r, wall = run_one(sf, sde, n, D, method, None, {"dtype": torch.float32, "rtol": tol, "atol": tol, **opts}, 1)
            sub.append({"sampler": lab, "method": method, "steps": "adaptive", "tol": tol, "nfe": r.nfe, "z": _z(r, data, bw, null_sd)})
        rows += sorted(sub, key=lambda r: (r["nfe"], -r["tol"]))
        print(f"  {lab:32s} " + " ".join(f"{r['tol']:g}:{r['nfe']}:{r['z']:.1f}" for r in sub), flush=True)
    with open(out / "sampler_nfe_fewest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return write_fewest(rows, null_sd, n, out)


def write_fewest(rows, null_sd: float, n: int, out: Path) -> list[str]:
    """sampler_nfe_fewest.md from the scan's rows; returns the table's lines (for sampler_nfe.md)."""
    table = [f"z = MMD^2 / {null_sd:.2e} (std of MMD^2 between independent data samples; n = {n}, seed 5); at the floor: z < 3. "
             f"Fixed-step samplers: every step count with NFE <= {FEWEST_MAX_NFE}; adaptive ones: rtol = atol = "
             f"{', '.join(f'{t:g}' for t in FEWEST_TOLS)}. *first hit*: fewest NFE with z < 3; *stays*: fewest NFE from "
             "which z < 3 at every larger NFE scanned.", "",
             "| sampler | first hit: NFE (z) | stays: NFE | z at NFE 5 / 6 / 8 / 10 (fixed step) or at the first hit's tolerance |",
             "|---|---|---|---|"]
    summary = []
    for lab in dict.fromkeys(r["sampler"] for r in rows):
        sub = [r for r in rows if r["sampler"] == lab]
        hits = [r for r in sub if r["z"] < 3]
        first = min(hits, key=lambda r: r["nfe"]) if hits else None
        stays = next((r for i, r in enumerate(sub) if all(q["z"] < 3 for q in sub[i:])), None) if hits else None
        if sub[0]["steps"] == "adaptive":
            loosest = first is not None and first["tol"] == max(FEWEST_TOLS)
            cells = (f"tol {first['tol']:g}" + (" (the loosest scanned: fewer NFE may reach the floor)" if loosest else "")
                     if first else f"not by tol {FEWEST_TOLS[-1]:g} ({sub[-1]['nfe']} NFE, z {sub[-1]['z']:.1f})")
        else:
            at = {r["nfe"]: r["z"] for r in sub}
            cells = " / ".join(f"{at[k]:.1f}" if k in at else "-" for k in (5, 6, 8, 10))
        hit = f"{first['nfe']} ({first['z']:.1f})" if first else f"not by {sub[-1]['nfe']} NFE (z {min(r['z'] for r in sub):.1f} at best)"
        table.append(f"| {lab} | {hit} | {stays['nfe'] if stays else '-'} | {cells} |")
        if first:
            summary.append((first["nfe"], stays["nfe"] if stays else 10**9, lab))
    best = min(summary)
    robust = min(summary, key=lambda x: (x[1], x[0]))
    table += ["", f"Fewest NFE at the floor: **{best[2]}**, {best[0]} NFE (first hit); staying at the floor from "
              f"**{robust[1]}** NFE: **{robust[2]}**.", ""]
    lines = [f"# Fewest NFE at the noise floor (VP SDE, 2-D Gaussian mixture, exact oracle score, n = {n}, float32)", "",
             "Command: `OMP_NUM_THREADS=1 python benchmarks/sampler_nfe.py --fewest` (also part of the full run).", ""] + table
    (out / "sampler_nfe_fewest.md").write_text("\n".join(lines))
    print(f"wrote {out / 'sampler_nfe_fewest.md'}")
    return table


def report_only(out: Path) -> None:
    """Rewrite sampler_nfe.md and sampler_nfe_fewest.md from the CSVs (no sampling)."""
    with open(out / "sampler_nfe.csv") as f:
        rows = [{**r, "D": int(r["D"]), "n": int(r["n"]), "nfe": int(r["nfe"]), "z": float(r["z"]),
                 "noise_floor_sd": float(r["noise_floor_sd"])} for r in csv.DictReader(f)]
    with open(out / "sampler_nfe_fewest.csv") as f:
        few = [{**r, "nfe": int(r["nfe"]), "z": float(r["z"]), "tol": float(r["tol"]) if r.get("tol") else ""}
               for r in csv.DictReader(f)]
    d2 = next(r for r in rows if r["D"] == 2)
    write_markdown(rows, out / "sampler_nfe.md", write_fewest(few, d2["noise_floor_sd"], d2["n"], out))


def write_markdown(rows, path, fewest_lines=()):
    lines = ["# Sampler quality per NFE (VP SDE, Gaussian-mixture oracle score, float32)", "",
             "Command: `OMP_NUM_THREADS=1 python benchmarks/sampler_nfe.py`.", "",
             "z = MMD^2 / (std of MMD^2 between two independent data samples of the same size); z < 3 is at the noise floor.",
             "Columns: steps -> `z (NFE)`.", ""]
    if fewest_lines:
        lines += ["## Fewest NFE at the noise floor, every sampler (D = 2)", ""] + list(fewest_lines)
        lines += ["Learned few-step generators on the same mixture and score (progressive distillation, consistency models): "
                  "experiments/results/few_step.md.", ""]
    for D in sorted({r["D"] for r in rows}):
        sub = [r for r in rows if r["D"] == D]
        lines += [f"## D = {D} (n = {sub[0]['n']}, noise floor sd = {sub[0]['noise_floor_sd']:.2e})", ""]
        cols = [str(s) for s in STEPS] + ["adaptive"]
        lines += ["| sampler | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for lab in dict.fromkeys(r["sampler"] for r in sub):
            cells = []
            for c in cols:
                hit = [r for r in sub if r["sampler"] == lab and str(r["steps"]) == c]
                cells.append(f"{hit[0]['z']:.1f} ({hit[0]['nfe']})" if hit else "")
            lines.append(f"| {lab} | " + " | ".join(cells) + " |")
        best = [r for r in sub if r["z"] < 3]
        if best:
            b = min(best, key=lambda r: (r["nfe"], r["z"]))
            lines += ["", f"Fewest NFE at the noise floor: **{b['sampler']}**, {b['nfe']} NFE (z = {b['z']:.1f})."]
        lines.append("")
    lines += ["Wall time (median of 3 repeats below 1000 steps, 1 otherwise; 2 shared CPU cores, OMP_NUM_THREADS=1) is in the CSV.", ""]
    Path(path).write_text("\n".join(lines))


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    Ds = sorted({int(r["D"]) for r in rows})
    rows = [{**r, "D": int(r["D"])} for r in rows]
    fig, axes = plt.subplots(1, len(Ds), figsize=(7 * len(Ds), 5.5))
    for ax, D in zip(axes, Ds):
        sub = [r for r in rows if r["D"] == D]
        cmap = plt.get_cmap("tab20")
        for i, lab in enumerate(dict.fromkeys(r["sampler"] for r in sub)):
            pts = sorted((int(r["nfe"]), max(float(r["z"]), 0.1)) for r in sub if r["sampler"] == lab)
            style = "s--" if "adaptive" in [str(r["steps"]) for r in sub if r["sampler"] == lab] else "o-"
            ax.plot(*zip(*pts), style, label=lab, ms=3, color=cmap(i % 20))
        ax.axhspan(0.1, 3, color="grey", alpha=0.2, label="noise floor (z < 3)")
        ax.set(xscale="log", yscale="log", xlabel="NFE (counted)", ylabel="MMD$^2$ / null std (clipped at 0.1)", title=f"D = {D}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
