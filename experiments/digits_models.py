"""Discrete DDPM vs continuous VP / sub-VP / VE score models on the embedded 8x8 digits, against a
full-covariance Gaussian-mixture baseline, in test bits/dim (probability-flow ODE, uniform dequantisation).

Data: the fixed digits split (train 1347 / val 150 / test 300, 17 levels, D = 64), flattened to
vectors; every training batch is freshly dequantised, ``y = 2 (k + U) / 17 - 1``. Model: a residual
MLP ε-network (``MLPScoreNet``) wrapped by ``ScoreModel(parameterization="eps")``; losses from
``get_loss_fn`` (ε-MSE for VP / sub-VP / DDPM, ``lambda = sigma^2`` DSM for VE). Training with
``scoresde.train.train``: Adam(W), warm-up, clipping, EMA; every ``--eval-every`` steps the EMA
model's validation bits/dim (PF-ODE, Hutchinson, fixed probes and dequantisation noise) is computed;
the best EMA checkpoint is kept (held-out model selection) and training stops after ``--patience``
evaluations without improvement. The selected checkpoint is then scored on the test split.

Bits/dim: ``bpd = -log p_y(y) / (64 ln 2) - 1 + log2 17`` per test image (``scoresde.likelihood``),
reported as mean +- standard error over the 300 test images (one dequantisation draw each), and the
median. The baseline (``scoresde.baselines.fit_gmm_baseline``: K chosen on the validation split)
uses the same dequantisation.

    OMP_NUM_THREADS=1 python experiments/digits_models.py --out experiments/results/digits_models
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from scoresde.baselines import fit_gmm_baseline, gmm_bits_per_dim
from scoresde.checkpoint import load_model_weights
from scoresde.data import load_dataset
from scoresde.data.transforms import uniform_dequantize
from scoresde.likelihood import evaluate_bpd
from scoresde.losses import get_loss_fn
from scoresde.model import ScoreModel
from scoresde.nets import MLPScoreNet
from scoresde.sde import VESDE, VPSDE, SubVPSDE
from scoresde.train import TrainOptions, train

MODELS = ("ddpm", "vp", "subvp", "ve")


def build(kind: str, hidden: int, depth: int, dropout: float, sigma_max: float, seed: int):
    """``(ScoreModel, loss_fn, sde)`` for one of ``MODELS``."""
    if kind in ("ddpm", "vp"):
        sde = VPSDE()
    elif kind == "subvp":
        sde = SubVPSDE()
    else:
        sde = VESDE(sigma_min=0.01, sigma_max=sigma_max)
    continuous = kind != "ddpm"
    # DDPM conditions on the step index i (0..999): sinusoidal as in Ho et al.; the others on log(999 t) or log sigma
    emb = "sinusoidal" if kind == "ddpm" else "fourier"
    net = MLPScoreNet(64, hidden=hidden, depth=depth, time_embedding=emb, dropout=dropout, seed=seed)
    model = ScoreModel(net, sde, parameterization="eps", continuous=continuous)
    return model, get_loss_fn(sde, continuous=continuous), sde


def bpd(model, sde, k, probes, seed, rtol):
    """Per-image PF-ODE bits/dim of integer vectors ``k (N, 64)`` (Hutchinson, fixed seed)."""
    g = torch.Generator().manual_seed(seed)
    with torch.enable_grad():
        return evaluate_bpd(model.score_fn, sde, k, levels=17, centered=True, batch_size=len(k), generator=g,
                            dtype=torch.float32, divergence="hutchinson", probes=probes, rtol=rtol, atol=rtol,
                            # torchdiffeq's automatic first step can overshoot T (VE drift is large at t=eps)
                            options={"first_step": 1e-3})


def run_model(kind, a, tr, va, te, root: Path) -> dict:
    model, loss_fn, sde = build(kind, a.hidden, a.depth, a.dropout, a.sigma_max, a.seed)
    levels = 17

    def prepare(batch, g):
        return uniform_dequantize(batch, levels, centered=True, generator=g, dtype=torch.float32)

    def eval_fn(ema_model, step):
        r = bpd(ema_model, sde, va, a.val_probes, 1234, a.rtol)
        return {"val_bpd": r.mean, "val_bpd_se": r.stderr, "val_bpd_median": float(r.bpd.median()), "val_nfe": r.nfe}

    opts = TrainOptions(n_steps=a.steps, batch_size=a.batch, lr=a.lr, warmup=a.warmup, ema_rate=a.ema,
                        weight_decay=a.weight_decay, grad_clip=1.0, seed=a.seed, log_every=250,
                        eval_every=a.eval_every, checkpoint_every=a.eval_every, select_metric="val_bpd",
                        select_mode="min", patience=a.patience)
    t0 = time.time()
    res = train(model, loss_fn, tr, opts, root / kind, prepare=prepare, eval_fn=eval_fn, resume=True, progress=a.progress)
    t_train = time.time() - t0
    load_model_weights(model, res.best_path, which="ema")
    model.eval()
    t0 = time.time()
    r = bpd(model, sde, te, a.test_probes, 4321, a.rtol)
    out = {
        "model": kind, "params": sum(p.numel() for p in model.parameters()), "steps": res.step,
        "stopped_early": res.stopped_early, "best_step": res.best_step, "val_bpd": res.best_value,
        "test_bpd": r.mean, "test_se": r.stderr, "test_median": float(r.bpd.median()), "test_max": float(r.bpd.max()),
        "test_nfe": r.nfe, "train_s": t_train, "test_eval_s": time.time() - t0,
        "val_curve": [(h["step"], h["eval"]["val_bpd"]) for h in res.history if "eval" in h],
    }
    print(json.dumps(out), flush=True)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--steps", type=int, default=6000, help="max optimiser steps per model")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--sigma-max", type=float, default=12.0, help="VE: about the largest distance between training images (9.6)")
    p.add_argument("--eval-every", type=int, default=1000)
    p.add_argument("--patience", type=int, default=2)
    p.add_argument("--val-probes", type=int, default=1)
    p.add_argument("--test-probes", type=int, default=4)
    p.add_argument("--rtol", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default="runs/digits_models")
    p.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    p.add_argument("--progress", action="store_true")
    a = p.parse_args(argv)

    flat = lambda s: load_dataset("digits", s).x.reshape(-1, 64).long()
    tr, va, te = flat("train"), flat("val"), flat("test")
    t0 = time.time()
    base = fit_gmm_baseline(tr, va, 17, seed=a.seed)
    base_test = gmm_bits_per_dim(base.gmm, te, 17, n_dequant=1, seed=a.seed + 2)
    baseline = {"K": base.n_components, "val_bpd": base.val_bpd[base.n_components].mean, "test_bpd": base_test.mean,
                "test_se": base_test.stderr, "fit_s": time.time() - t0}
    print("baseline", json.dumps(baseline), flush=True)
    rows = [run_model(k, a, tr, va, te, Path(a.workdir)) for k in a.models]
    if a.out:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        meta = {"command": "OMP_NUM_THREADS=%s python %s" % (os.environ.get("OMP_NUM_THREADS"), " ".join(sys.argv)),
                "commit": commit, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared), torch {torch.__version__}",
                "args": vars(a)}
        Path(a.out + ".json").write_text(json.dumps({"meta": meta, "baseline": baseline, "rows": rows}, indent=1))
        lines = ["# Digits: score models vs full-covariance GMM (test bits/dim, PF-ODE, uniform dequantisation)", "",
                 f"Command: `{meta['command']}`  ", f"Commit {commit}; {meta['machine']}.", "",
                 "| model | params | steps (best) | train min | val bpd | test bpd (mean +- se) | median | max | test NFE |",
                 "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
                 f"| GMM full cov, K={baseline['K']} | | | | {baseline['val_bpd']:.3f} | {baseline['test_bpd']:.3f} +- "
                 f"{baseline['test_se']:.3f} | | | |"]
        for r in rows:
            lines.append(f"| {r['model']} | {r['params']:,} | {r['steps']} ({r['best_step']}) | {r['train_s'] / 60:.1f} | "
                         f"{r['val_bpd']:.3f} | {r['test_bpd']:.3f} +- {r['test_se']:.3f} | {r['test_median']:.3f} | "
                         f"{r['test_max']:.2f} | {r['test_nfe']} |")
        Path(a.out + ".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
