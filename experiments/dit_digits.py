"""A tiny DiT beside the convolutional score network on the embedded 8x8 digits, trained through the library.

Both models get the same recipe, with only the network changed (``model=dit_tiny`` or ``model=convnet``), run by
``scoresde.runs.run_train`` from the composed config, i.e. exactly this ``scoresde-train`` command line (``RECIPE``:
the quickstart recipe of commit 7ead0b0 -- VP SDE, ε-parameterisation, noise-mixture augmentation 0.2 on
[0.03, 0.5], Adam 1e-3, warm-up 200, EMA 0.999, batch 128 -- pinned here so that a change of ``experiment=quickstart``
does not change this comparison)::

    scoresde-train sde=vp model=dit_tiny data=digits sampler=dpm_solver train=quick eval=default \
        data.noise_mixture_prob=0.2 data.noise_mixture_std_min=0.03 data.noise_mixture_std_max=0.5 train.n_steps=STEPS \
        train.batch_size=128 train.lr=1e-3 train.warmup=200 train.ema_rate=0.999 train.eval_every=250 \
        train.checkpoint_every=500 eval.n_samples=300 eval.batch_size=300 eval.fd=true device=cpu

Reported per model, from the run's ``metrics.json``: test bits/dim through the probability-flow ODE (Hutchinson,
1 probe, rtol = atol = 1e-5, eps = 1e-5; mean ± standard error over the 300 test images), the Fréchet distance (FD)
of 300 DPM-Solver samples (order 3, 20 steps) to the test split on the digits classifier's features, and FD's floor
at the same N: 300 training images against the test split. A run directory that already holds ``metrics.json`` is
read, not retrained.

    OMP_NUM_THREADS=1 nice -n 5 python experiments/dit_digits.py --steps 2000 --runs outputs/dit_digits \
        --out experiments/results/dit_digits
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

MODELS = ("dit_tiny", "convnet")
RECIPE = ["sde=vp", "data=digits", "sampler=dpm_solver", "train=quick", "eval=default", "data.noise_mixture_prob=0.2",
          "data.noise_mixture_std_min=0.03", "data.noise_mixture_std_max=0.5", "train.batch_size=128", "train.lr=1e-3",
          "train.warmup=200", "train.ema_rate=0.999", "train.eval_every=250", "train.checkpoint_every=500",
          "eval.splits=[test]", "eval.divergence=hutchinson", "eval.probes=1"]
EVAL = ["eval.fd=true", "eval.n_samples=300", "eval.batch_size=300"]


def overrides(model: str, steps: int, seed: int) -> list[str]:
    """The ``scoresde-train`` overrides of one run."""
    return [f"model={model}", *RECIPE, f"train.n_steps={steps}", *EVAL, "device=cpu", "progress=false", f"seed={seed}"]


def run_one(model: str, steps: int, seed: int, run_dir: Path) -> dict:
    """Compose, validate and run ``run_train`` for one model; returns the row of the table."""
    import torch
    from hydra import compose, initialize_config_module

    from scoresde.config import register_configs, to_run, validate
    from scoresde.runs import run_train

    register_configs()
    ov = overrides(model, steps, seed)
    with initialize_config_module("scoresde.configs", version_base="1.3"):
        cfg = compose("train", overrides=ov)
    c = to_run(validate(cfg))
    cpu0, wall0 = time.process_time(), time.perf_counter()
    if (run_dir / "metrics.json").is_file():
        metrics = json.loads((run_dir / "metrics.json").read_text())
    else:
        metrics = run_train(c, run_dir, progress=False)
    n_params = sum(p.numel() for p in __import__("scoresde").load(run_dir)[0].parameters())
    nll, s = metrics["nll"]["test"], metrics["samples"]
    return {"model": model, "params": n_params, "steps": metrics["train"]["steps"], "train_seconds": metrics["train"]["seconds"],
            "total_cpu_seconds": time.process_time() - cpu0, "total_wall_seconds": time.perf_counter() - wall0,
            "bpd": nll["bpd"], "bpd_stderr": nll["bpd_stderr"], "n_test": nll["n"], "fd": s.get("fd"), "fd_floor": s.get("fd_floor"),
            "n_samples": s["n"], "sampler": s["method"], "nfe": s["nfe"], "final_loss": metrics["train"]["final_loss"],
            "threads": torch.get_num_threads(), "run_dir": str(run_dir), "command": "scoresde-train " + " ".join(ov)}


def write_table(rows: list[dict], out: str) -> None:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    meta = {"command": " ".join(["python"] + sys.argv), "commit": commit,
            "machine": f"{platform.machine()} {os.cpu_count()} cpus (shared)", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}
    Path(out + ".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = ["# A tiny DiT vs ConvScoreNet on digits (same recipe, same steps)", "",
             f"Command: `{meta['command']}`  ", f"Commit {commit}, {meta['machine']}, OMP_NUM_THREADS={meta['OMP_NUM_THREADS']}.", "",
             "Each run: `" + rows[0]["command"].replace(rows[0]["model"], "<model>", 1) + "` (run_train from the composed config; "
             "the quickstart recipe of commit 7ead0b0, pinned).", "",
             "| model | params | steps | train s (wall, shared machine) | test bits/dim (PF-ODE) | FD (N samples) | FD floor (same N) | sampler NFE |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        fd = f"{r['fd']:.1f} ({r['n_samples']})" if r["fd"] is not None else "–"
        floor = f"{r['fd_floor']:.1f}" if r["fd_floor"] is not None else "–"
        lines.append(f"| {r['model']} | {r['params']:,} | {r['steps']} | {r['train_seconds']:.0f} | {r['bpd']:.3f} ± {r['bpd_stderr']:.3f} "
                     f"(n={r['n_test']}) | {fd} | {floor} | {r['nfe']} |")
    lines += ["", "Bits/dim: dequantised test images, Hutchinson 1 probe, rtol = atol = 1e-5, eps = 1e-5. FD: Fréchet distance "
              "of DPM-Solver-3 samples (20 steps) to the 300 test images on the features of the cached digits classifier "
              "(`scoresde.features`); floor: as many training images against the test split."]
    Path(out + ".md").write_text("\n".join(lines) + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--runs", default="outputs/dit_digits", help="run directories go to RUNS/<model>")
    ap.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.steps < 1:
        ap.error("--steps must be >= 1")
    if a.one:
        print(json.dumps(run_one(a.one, a.steps, a.seed, Path(a.runs) / a.one)))
        return
    rows = []
    for m in a.models:  # one process per model: its CPU time is its own
        cmd = [sys.executable, __file__, "--one", m, "--steps", str(a.steps), "--seed", str(a.seed), "--runs", a.runs]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            sys.stderr.write(out.stderr)
            raise SystemExit(f"{m} failed")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"{m}: {r['params']:,} params, {r['steps']} steps in {r['train_seconds']:.0f} s, test bpd {r['bpd']:.3f} ± "
              f"{r['bpd_stderr']:.3f}, FD {r['fd']} (floor {r['fd_floor']})", flush=True)
    if a.out:
        write_table(rows, a.out)


if __name__ == "__main__":
    main()
