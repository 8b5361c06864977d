"""The noise-mixture augmentation on the quickstart model, side by side: none, leaking, non-leaking.

Three runs of README's main job (``scoresde-train experiment=quickstart``: ConvScoreNet, VP SDE, 2500 steps), each
scored by the app itself (``metrics.json``: test bits/dim through the PF-ODE, FD and k-NN precision / recall of 300
DPM-Solver samples, each with its floor):

* ``none``: the quickstart as it is (no augmentation);
* ``leaking``: ``data.noise_mixture_prob=0.2`` (std log-uniform in [0.03, 0.5]) applied in ``prepare``: the model
  learns q = 0.8 p + 0.2 (p * noise), so about one sample in five comes from the noisy component;
* ``conditioned``: the same augmentation with ``model.aug_cond=true``: the network is told each image's noise level
  (``losses.conditioned_noise_mixture``) and is sampled and evaluated at level 0, i.e. on p itself.

Bits/dim are always the model's own density at the clean condition (for ``leaking`` that density is q's).

    python experiments/augmentation.py --out experiments/results/augmentation   # writes OUT.md and OUT.json
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

AUG = ["data.noise_mixture_prob=0.2", "data.noise_mixture_std_min=0.03", "data.noise_mixture_std_max=0.5"]
VARIANTS = {"none": [], "leaking": AUG, "conditioned": AUG + ["model.aug_cond=true"]}


def run_variant(name: str, workdir: Path, extra: list) -> dict:
    from scoresde.cli import train_main

    run = workdir / name
    t0 = time.perf_counter()
    train_main(["experiment=quickstart", "progress=false", f"hydra.run.dir={run}"] + VARIANTS[name] + extra)
    m = json.loads((run / "metrics.json").read_text())
    m["wall_seconds"] = time.perf_counter() - t0
    return m


def _fmt(v, digits: int) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def table(results: dict) -> str:
    head = ("| augmentation | train min | test bits/dim (mean ± se) | median | worst image | FD (floor) | "
            "precision / recall (floor) |")
    lines = [head, "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, m in results.items():
        s, n = m["samples"], m["nll"]["test"]
        lines.append(f"| {name} | {m['train']['seconds'] / 60:.1f} | {n['bpd']:.3f} ± {n['bpd_stderr']:.3f} | "
                     f"{_fmt(n.get('bpd_median'), 3)} | {_fmt(n.get('bpd_max'), 2)} | "
                     f"{s['fd']:.1f} ({s['fd_floor']:.1f}) | {s['precision']:.2f} / {s['recall']:.2f} "
                     f"({s['precision_floor']:.2f} / {s['recall_floor']:.2f}) |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--workdir", default="outputs/augmentation")
    ap.add_argument("--out", default=None, help="write OUT.md and OUT.json")
    ap.add_argument("--reuse", nargs="*", default=[], help="NAME=RUN_DIR: take a finished run's metrics.json")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    a = ap.parse_args(argv)
    reuse = dict(r.split("=", 1) for r in a.reuse)
    results = {}
    for name in a.variants:
        if name in reuse:
            results[name] = json.loads((Path(reuse[name]) / "metrics.json").read_text())
        else:
            results[name] = run_variant(name, Path(a.workdir), a.overrides)
        print(f"{name}: {json.dumps(results[name]['nll']['test'])}", flush=True)
    md = table(results)
    print(md)
    if a.out:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        meta = {"command": " ".join(["python"] + sys.argv), "commit": commit,
                "machine": f"{platform.machine()}, {platform.system()}"}
        Path(a.out + ".json").write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=str))
        Path(a.out + ".md").write_text(f"# Noise-mixture augmentation on the quickstart model\n\n- command: "
                                       f"`{meta['command']}`\n- commit: `{commit}`\n\n" + md)


if __name__ == "__main__":
    main()
