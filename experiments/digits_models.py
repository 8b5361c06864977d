"""Discrete DDPM vs continuous VP / sub-VP / VE score models on the embedded 8x8 digits, against a
full-covariance Gaussian-mixture baseline, in test bits/dim (probability-flow ODE, uniform dequantisation).

Data: the fixed digits split (train 1347 / val 150 / test 300, 17 levels, D = 64), flattened to
vectors; every training batch is freshly dequantised, ``y = 2 (k + U) / 17 - 1``. Model: a residual
MLP ε-network (``MLPScoreNet``), or with ``--net convnet`` the convolutional ``ConvScoreNet`` (base width ``--ch``) on
the ``(1, 8, 8)`` images, wrapped by ``ScoreModel(parameterization="eps")``. ``experiments/results/digits_models.md`` is
the ConvScoreNet table (with the MLP's rows from ``digits_models_mlp.json`` beside it: ``--collate ... --previous``). Losses from
``get_loss_fn``: DDPM its own discrete loss (L_simple, ``continuous=False``); VP / sub-VP the continuous
DSM loss, either ε-MSE (``--weighting default``, ``lambda = s^2``) or the likelihood weighting
``lambda = g^2`` with importance sampling of ``t`` (``--weighting likelihood``; Song et al. 2021,
"Maximum likelihood training of score-based diffusion models"); VE ``lambda = sigma^2``, which is
already ``∝ g^2`` for VE. Training with ``scoresde.train.train``: Adam(W), warm-up, clipping, EMA;
every ``--eval-every`` steps the EMA model's validation bits/dim (PF-ODE, Hutchinson, fixed probes and
dequantisation noise) is computed, the best EMA checkpoint is kept (held-out model selection) and
training stops after ``--patience`` evaluations without improvement. Only the selected checkpoint
is scored on the test split (and, for DDPM, also by its discrete ELBO).

Bits/dim: ``bpd = -log p_y(y) / (64 ln 2) - 1 + log2 17`` per test image (``scoresde.likelihood``),
reported as mean +- standard error over the 300 test images (one dequantisation draw each), the
median and the worst image. Baselines (``scoresde.baselines``, same dequantisation): K chosen on the
validation split with ``reg_covar = 1e-6``, and (K, reg_covar) chosen jointly on the validation split.

Runs can be split over processes and collated::

    OMP_NUM_THREADS=1 python experiments/digits_models.py --models ddpm vp --out /tmp/a
    OMP_NUM_THREADS=1 python experiments/digits_models.py --models subvp ve --out /tmp/b
    python experiments/digits_models.py --collate /tmp/a.json /tmp/b.json --out experiments/results/digits_models

Models are built from ``scoresde.build`` specs (``spec_for`` -> ``model_spec``, then ``build_model``; the
MLP is built on the flattened per-sample shape ``(64,)`` with the run's ``--seed`` as its init seed), so every
training checkpoint carries its spec. ``--ckpt-root DIR`` copies each selected (best-by-val EMA) checkpoint to
``DIR/<model>/best.pt``, with ``metrics.json`` beside it (best step, val and test bits/dim);
``scoresde.build.load(DIR/<model>/best.pt)`` rebuilds ``(model, sde)`` from the checkpoint alone, and
``--reevaluate`` reloads the models that way.

Sample quality (``--fd-sets S``, default 0 = off): the selected checkpoint draws ``S`` sets of 300 samples (as many as
test images) with ancestral sampling (``method=pc, predictor=ancestral, corrector=none``, ``--fd-steps`` steps, then
Tweedie's denoising; DDPM's posterior step for VP, SMLD's for VE; the same sampler for every model), and each set
is scored by ``scoresde.evaluate.image_quality``: Fréchet distance to the test split on the digits classifier's
features and k-NN precision / recall (k = 3), each with its floor (300 training images vs the test split). The
table reports the mean over the sets and their standard deviation. ``--weighting likelihood`` rows are labelled
``vp (g^2)`` / ``subvp (g^2)``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from scoresde.baselines import dequantize_unit, fit_gmm_baseline, gmm_bits_per_dim
from scoresde.build import build_model, load, model_spec
from scoresde.data import load_dataset
from scoresde.data.transforms import noise_mixture, uniform_dequantize
from scoresde.likelihood import evaluate_bpd, evaluate_elbo
from scoresde.losses import get_loss_fn
from scoresde.runs import DataOptions, _data_entry
from scoresde.sde import VESDE, VPSDE, SubVPSDE
from scoresde.train import TrainOptions, train

MODELS = ("ddpm", "vp", "subvp", "ve")
LEVELS = 17
N_TEST = 300
REG_COVARS = (1e-6, 1e-5, 1e-4, 3e-4, 1e-3, 2e-3, 3e-3, 5e-3, 1e-2, 3e-2)


def spec_for(kind: str, hidden: int, depth: int, dropout: float, sigma_max: float, seed: int, time_embedding: str = "fourier",
             fourier_scale: float = 16.0, parameterization: str = "eps", data: dict | None = None, net: str = "mlp",
             ch: int = 32) -> dict:
    """The ``scoresde.build`` model spec of one of ``MODELS`` (``build_model(spec)`` builds it; ``seed``: the init seed).

    DDPM conditions on the step index ``i`` (sinusoidal embedding, as Ho et al.); the continuous models on
    ``999 t`` (VP, sub-VP) or ``sigma(t)`` (VE) through ``time_embedding`` (Fourier features of the log of
    the network time with ``fourier_scale``, or sinusoidal). ``parameterization`` applies to the continuous
    models (``"eps"``: score ``= -net / s``; ``"score"``: score ``= net``, so the score stays bounded as
    ``s -> 0`` and the ε-loss becomes ``|| -s net - z ||^2``); DDPM is always ε. The network is an
    ``MLPScoreNet`` on the flattened digits (per-sample shape ``(64,)``). ``data``: the spec's data entry
    (``scoresde.runs._data_entry``; default: the digits, centred, ``LEVELS`` levels). ``net="convnet"``: a
    ``ConvScoreNet`` of base width ``ch`` on the images ``(1, 8, 8)`` instead (sinusoidal embedding of ``999 t`` or
    of ``i``; Fourier features of ``log sigma`` for VE; ``hidden``, ``depth`` and ``time_embedding`` unused).
    """
    if kind not in MODELS:
        raise ValueError(f"kind must be one of {MODELS}; got {kind!r}")
    if kind in ("ddpm", "vp"):
        sde = VPSDE()
    elif kind == "subvp":
        sde = SubVPSDE()
    else:
        sde = VESDE(sigma_min=0.01, sigma_max=sigma_max)
    if data is None:
        data = _data_entry(DataOptions(name="digits", centered=True), LEVELS)
    if net == "convnet":
        net_kwargs = dict(ch=ch, dropout=dropout, time_embedding="fourier" if kind == "ve" else "sinusoidal")
        return model_spec(sde, "convnet", net_kwargs, (1, 8, 8), parameterization="eps" if kind == "ddpm" else parameterization,
                          continuous=kind != "ddpm", data=data, seed=seed)
    emb = "sinusoidal" if kind == "ddpm" else time_embedding
    net_kwargs = dict(hidden=hidden, depth=depth, time_embedding=emb, fourier_scale=fourier_scale, dropout=dropout)
    return model_spec(sde, "mlp", net_kwargs, (64,), parameterization="eps" if kind == "ddpm" else parameterization,
                      continuous=kind != "ddpm", data=data, seed=seed)


def loss_for(kind: str, sde, weighting: str = "default"):
    """The training loss of one of ``MODELS`` (``get_loss_fn``): DDPM its discrete loss, the others continuous DSM.

    ``weighting`` applies to VP / sub-VP only: ``"likelihood"`` uses ``lambda = g^2`` with importance sampling of ``t``.
    """
    if kind not in MODELS:
        raise ValueError(f"kind must be one of {MODELS}; got {kind!r}")
    lw = weighting == "likelihood" and kind in ("vp", "subvp")
    return get_loss_fn(sde, continuous=kind != "ddpm", weighting="likelihood" if lw else "default", importance_sampling=lw)


def bpd(model, sde, k, probes, seed, rtol, eps=1e-5):
    """Per-image PF-ODE bits/dim of integer vectors ``k (N, 64)`` (Hutchinson, fixed seed), ODE from ``t = eps`` to ``T``."""
    g = torch.Generator().manual_seed(seed)
    with torch.enable_grad():
        return evaluate_bpd(model.score_fn, sde, k, levels=LEVELS, centered=True, batch_size=len(k), generator=g,
                            dtype=torch.float32, divergence="hutchinson", probes=probes, rtol=rtol, atol=rtol, eps=eps,
                            # torchdiffeq's automatic first step can overshoot T (VE drift is large at t=eps)
                            options={"first_step": 1e-3})


def samples_quality(model, sde, shape, sets: int, steps: int, seed: int = 0) -> dict:
    """FD / precision / recall (``image_quality``, classifier features of the digits) of ``sets`` sets of ``N_TEST``
    ancestral samples of per-sample ``shape`` (``pc``, ``steps`` steps; scored as ``(1, 8, 8)`` images), each against the test split; the floor from ``N_TEST`` training images.

    Set ``j`` uses the sampling seed ``seed + j``. Returns the per-set values and their mean / standard deviation.
    """
    from scoresde.evaluate import EvalOptions, draw_samples, image_quality
    from scoresde.runs import load_split

    data = DataOptions(name="digits", centered=True)
    test = load_split(data, "test", seed=0)
    sampler = {"method": "pc", "predictor": "ancestral", "corrector": "none", "steps": steps}
    per, c0 = [], time.process_time()
    for j in range(sets):
        x, nfes, _ = draw_samples(model.score_fn, sde, shape, sampler, N_TEST, N_TEST, seed + j, "cpu", torch.float32)
        x = x.reshape(-1, 1, 8, 8)
        q = image_quality(x, test, data, EvalOptions(n_samples=N_TEST), seed=0, device="cpu")
        q["nfe"] = nfes[0]
        per.append(q)
    out = {"sampler": sampler, "sets": per, "cpu_s": time.process_time() - c0}
    for k in ("fd", "precision", "recall"):
        v = np.array([q[k] for q in per])
        out[k], out[k + "_sd"] = float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0
    for k in ("fd_floor", "precision_floor", "recall_floor", "nfe"):
        out[k] = per[0][k]
    print(f"samples: FD {out['fd']:.1f} +- {out['fd_sd']:.1f} (floor {out['fd_floor']:.1f}), precision {out['precision']:.3f} "
          f"recall {out['recall']:.3f} (floor {out['precision_floor']:.3f} / {out['recall_floor']:.3f}), NFE {out['nfe']}", flush=True)
    return out


def label(row: dict) -> str:
    """The table's name of a row: the model, with `` (g^2)`` for the likelihood-weighted VP / sub-VP."""
    lw = row.get("recipe", {}).get("loss", "").startswith("g^2")
    return row["model"] + (" (g^2)" if lw else "")


def _conv_embedding(kind: str) -> str:
    """The time embedding ``spec_for`` gives ``ConvScoreNet`` for ``kind`` (its ``--time-embedding`` is not used)."""
    return {"ddpm": "sinusoidal(i)", "ve": "fourier(log sigma, scale 16)"}.get(kind, "sinusoidal(999 t)")


def _recipe(row: dict) -> dict:
    """``row["recipe"]`` as the table shows it: for ``ConvScoreNet`` rows the embedding it used and no MLP widths
    (records written before the recipe said so listed the MLP's unused ``hidden``, ``depth`` and ``--time-embedding``)."""
    rec = dict(row["recipe"])
    if rec.get("net") == "convnet":
        rec.pop("hidden", None)
        rec.pop("depth", None)
        rec["time_embedding"] = _conv_embedding(row["model"])
    return rec


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def run_model(kind, a, tr, va, te, root: Path) -> dict:
    cpu0 = _cpu()
    data = _data_entry(DataOptions(name="digits", centered=True, noise_mixture_prob=a.aug_prob,
                                   noise_mixture_std_min=a.aug_std_min, noise_mixture_std_max=a.aug_std_max), LEVELS)
    spec = spec_for(kind, hidden=a.hidden, depth=a.depth, dropout=a.dropout, sigma_max=a.sigma_max, seed=a.seed,
                    time_embedding=a.time_embedding, fourier_scale=a.fourier_scale, parameterization=a.parameterization,
                    data=data, net=a.net, ch=a.ch)
    if a.net == "convnet":  # the convolutional network sees images
        tr, va, te = (k.reshape(-1, 1, 8, 8) for k in (tr, va, te))
    model = build_model(spec)  # model.spec: train() stores it in checkpoint.pt and best.pt
    sde = model.sde
    loss_fn = loss_for(kind, sde, a.weighting)
    eval_cpu = [0.0]
    # Training time survives a stop/resume: the cumulative (wall, CPU) seconds are logged at every evaluation
    # (= checkpoint) and a resumed run starts from the entry of the step it resumes at.
    timing_path = root / kind / "timing.jsonl"
    offset = {"wall": 0.0, "cpu": 0.0, "val_eval_cpu": 0.0}
    ckpt_step = _checkpoint_step(root / kind)
    if ckpt_step and timing_path.exists():
        for line in timing_path.read_text().splitlines():
            rec = json.loads(line)
            if rec["step"] == ckpt_step:
                offset = rec

    def prepare(batch, g):
        y = uniform_dequantize(batch, LEVELS, centered=True, generator=g, dtype=torch.float32)
        return noise_mixture(y, a.aug_prob, a.aug_std_min, a.aug_std_max, generator=g)  # --aug-prob 0: y, no draws

    def eval_fn(ema_model, step):
        c0 = time.process_time()
        r = bpd(ema_model, sde, va, a.val_probes, 1234, a.rtol)
        eval_cpu[0] += time.process_time() - c0
        with open(timing_path, "a") as f:
            f.write(json.dumps({"step": step, "wall": offset["wall"] + time.time() - t0,
                                "cpu": offset["cpu"] + time.process_time() - c0_train,
                                "val_eval_cpu": offset["val_eval_cpu"] + eval_cpu[0]}) + "\n")
        median, worst = float(r.bpd.median()), float(r.bpd.max())
        print(f"[{kind}] step {step} val bpd {r.mean:.4f} +- {r.stderr:.4f} median {median:.4f} worst {worst:.4g} "
              f"(nfe {r.nfe})", flush=True)
        return {"val_bpd": r.mean, "val_bpd_se": r.stderr, "val_bpd_median": median, "val_bpd_max": worst, "val_nfe": r.nfe}

    opts = TrainOptions(n_steps=a.steps, batch_size=a.batch, lr=a.lr, warmup=a.warmup, lr_schedule=a.lr_schedule,
                        lr_final_ratio=a.lr_final_ratio, ema_rate=a.ema,
                        weight_decay=a.weight_decay, grad_clip=1.0, seed=a.seed, log_every=500,
                        eval_every=a.eval_every, checkpoint_every=a.eval_every, select_metric="val_bpd",
                        select_mode="min", patience=a.patience)
    t0, c0_train = time.time(), time.process_time()
    res = train(model, loss_fn, tr, opts, root / kind, prepare=prepare, eval_fn=eval_fn, resume=True, progress=a.progress)
    t_train = offset["wall"] + time.time() - t0
    c_train = offset["cpu"] + time.process_time() - c0_train
    eval_cpu[0] += offset["val_eval_cpu"]
    model, sde = load(res.best_path)  # the selected EMA weights, rebuilt from the checkpoint's spec (eval mode)
    t0, c0 = time.time(), time.process_time()
    r = bpd(model, sde, te, a.test_probes, 4321, a.rtol)
    test_cpu = time.process_time() - c0
    out = {
        "model": kind, "params": sum(p.numel() for p in model.parameters()), "steps": res.step,
        "stopped_early": res.stopped_early, "best_step": res.best_step, "val_bpd": res.best_value,
        "test_bpd": r.mean, "test_se": r.stderr, "test_median": float(r.bpd.median()), "test_max": float(r.bpd.max()),
        "test_nfe": r.nfe, "train_wall_s": t_train, "train_cpu_s": c_train, "val_eval_cpu_s": eval_cpu[0],
        "test_eval_s": time.time() - t0, "test_eval_cpu_s": test_cpu, "final_loss": res.loss,
        "recipe": {"loss": "ddpm L_simple" if kind == "ddpm" else ("sigma^2 DSM (= g^2 up to a constant)" if kind == "ve" else
                   ("g^2 + importance sampling" if a.weighting == "likelihood" else "eps-MSE (s^2)")),
                   "parameterization": "eps" if kind == "ddpm" else a.parameterization,
                   "time_embedding": _conv_embedding(kind) if a.net == "convnet" else
                   ("sinusoidal(i)" if kind == "ddpm" else f"{a.time_embedding}(scale {a.fourier_scale})"),
                   **({"net": "convnet", "ch": a.ch} if a.net == "convnet" else {}),
                   **{k: getattr(a, k) for k in (() if a.net == "convnet" else ("hidden", "depth")) + ("dropout", "lr", "warmup", "lr_schedule", "ema", "weight_decay", "batch",
                                                  "eval_every", "patience", "aug_prob", "aug_std_min", "aug_std_max")}},
        "val_curve": _val_curve(root / kind),
    }
    if kind == "ddpm":
        t0, c0 = time.time(), time.process_time()
        e = evaluate_elbo(model.ddpm_eps_fn(), sde, te, levels=LEVELS, centered=True, batch_size=len(te),
                          generator=torch.Generator().manual_seed(99), dtype=torch.float32)
        out.update(test_elbo_bpd=e.mean, test_elbo_se=e.stderr, elbo_eval_s=time.time() - t0, elbo_eval_cpu_s=time.process_time() - c0)
    if a.fd_sets > 0:
        shape = (1, 8, 8) if a.net == "convnet" else (64,)
        out["samples"] = samples_quality(model, sde, shape, a.fd_sets, a.fd_steps)
    out["model_cpu_s"] = _cpu() - cpu0  # this model's training, test bits/dim, ELBO and samples (user + system, all threads)
    if a.ckpt_root:
        dest = Path(a.ckpt_root) / kind
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(res.best_path, dest / "best.pt")  # carries its spec: scoresde.build.load(dest / "best.pt")
        (dest / "metrics.json").write_text(json.dumps({"best_step": res.best_step, "val_bpd": res.best_value,
                                                       "test_bpd": r.mean, "test_se": r.stderr}, indent=1))
        out["ckpt"] = str(dest)
    print(json.dumps(out), flush=True)
    return out


def eps_for_std(sde, std: float) -> float:
    """The time ``t`` in ``[1e-5, T]`` at which the perturbation std ``s(t)`` equals ``std`` (bisection on ``log t``)."""
    lo, hi = math.log(1e-5), math.log(sde.T)
    s_of = lambda u: float(sde.marginal_coef(torch.tensor([math.exp(u)], dtype=torch.float64))[1])
    if std <= s_of(lo):
        return 1e-5
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if s_of(mid) < std else (lo, mid)
    return math.exp(0.5 * (lo + hi))


def reevaluate(row: dict, a, va, te) -> dict:
    """Choose the ODE's start time ``eps`` on the validation split, then score the test split there.

    ``p_eps`` (the model's density of ``x_eps``) is the density being evaluated; a larger ``eps`` smooths it at
    the scale ``s(eps)``, the analogue of the GMM baseline's ``reg_covar`` (also chosen on validation). The grid is
    ``eps = 1e-5`` (the paper's) and the times where ``s(eps)`` equals each of ``--eval-stds``. Adds
    ``eval_eps``, ``eval_std``, ``val_bpd_eps`` (the curve) and the ``test_*`` numbers at the chosen ``eps``; the
    numbers at ``eps = 1e-5`` are kept under ``test_*_eps1e-5``.
    """
    kind = row["model"]
    model, sde = load(Path(a.ckpt_root) / kind / "best.pt")
    grid = [(1e-5, float(sde.marginal_coef(torch.tensor([1e-5], dtype=torch.float64))[1]))]
    grid += [(eps_for_std(sde, sd), sd) for sd in a.eval_stds]
    curve = []
    for eps, sd in grid:
        r = bpd(model, sde, va, a.val_probes, 1234, a.rtol, eps=eps)
        curve.append({"eps": eps, "std": sd, "val_bpd": r.mean, "val_se": r.stderr, "val_median": float(r.bpd.median())})
        print(f"[{kind}] eps {eps:.3g} (s {sd:.3g}): val bpd {r.mean:.4f} +- {r.stderr:.4f}", flush=True)
    best = min(curve, key=lambda c: c["val_bpd"])
    out = dict(row)
    for key in ("test_bpd", "test_se", "test_median", "test_max", "test_nfe"):
        out[key + "_eps1e-5"] = row[key]
    t0 = time.time()
    r = bpd(model, sde, te, a.test_probes, 4321, a.rtol, eps=best["eps"])
    out.update(eval_eps=best["eps"], eval_std=best["std"], val_bpd_eps=curve, val_bpd_at_eps=best["val_bpd"],
               test_bpd=r.mean, test_se=r.stderr, test_median=float(r.bpd.median()), test_max=float(r.bpd.max()),
               test_nfe=r.nfe, test_eval_s=time.time() - t0)
    print(json.dumps({k: out[k] for k in ("model", "eval_eps", "val_bpd_at_eps", "test_bpd", "test_se", "test_median", "test_max")}), flush=True)
    return out


def paired(ckpts: list[str], a, te) -> dict:
    """Per-image test bits/dim of several checkpoints (``LABEL=PATH``) with the same dequantisation noise and probes
    (``bpd`` with seed 4321, ``--test-probes``, ``--rtol``), and every pairwise mean difference with its paired standard
    error (the images' own spread cancels; training noise between runs is not in it)."""
    per, out = {}, {"meta": meta_info(a), "models": {}, "differences": []}
    for item in ckpts:
        name, path = item.split("=", 1)
        model, sde = load(path)
        k = te.reshape(-1, 1, 8, 8) if len(model.spec["data_shape"]) == 3 else te
        c0 = time.process_time()
        r = bpd(model, sde, k, a.test_probes, 4321, a.rtol)
        per[name] = r.bpd.double()
        out["models"][name] = {"ckpt": path, "mean": r.mean, "se": r.stderr, "nfe": r.nfe, "cpu_s": time.process_time() - c0,
                               "bpd": r.bpd.tolist()}
        print(f"{name}: {r.mean:.4f} +- {r.stderr:.4f} (NFE {r.nfe})", flush=True)
    names = list(per)
    for i, x in enumerate(names):
        for y in names[i + 1:]:
            d = per[x] - per[y]
            out["differences"].append({"a": x, "b": y, "mean": float(d.mean()), "se": float(d.std() / math.sqrt(len(d)))})
            print(f"{x} - {y}: {float(d.mean()):+.4f} +- {float(d.std() / math.sqrt(len(d))):.4f}", flush=True)
    return out


def _val_curve(workdir: Path) -> list:
    """``[(step, val_bpd), ...]`` from ``workdir/metrics.jsonl`` (it spans stopped and resumed segments of a run)."""
    out = []
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "eval" in rec:
            out.append((rec["step"], rec["eval"]["val_bpd"]))
    return out


def _checkpoint_step(workdir: Path):
    """The step of ``workdir/checkpoint.pt`` (None if there is none)."""
    path = workdir / "checkpoint.pt"
    if not path.exists():
        return None
    return int(torch.load(path, map_location="cpu", weights_only=False)["step"])


def baselines(tr, va, te, seed: int) -> list[dict]:
    """The two GMM baselines: K by validation at ``reg_covar = 1e-6``, and (K, reg_covar) by validation."""
    rows = []
    fits = {}
    for rc in REG_COVARS:
        t0 = time.time()
        fits[rc] = (fit_gmm_baseline(tr, va, LEVELS, seed=seed, reg_covar=rc), time.time() - t0)
    best_rc = min(REG_COVARS, key=lambda rc: fits[rc][0].val_bpd[fits[rc][0].n_components].mean)
    for name, rc in (("GMM full cov (K by val, reg_covar 1e-6)", 1e-6), ("GMM full cov ((K, reg_covar) by val)", best_rc)):
        base, fit_s = fits[rc]
        bt = gmm_bits_per_dim(base.gmm, te, LEVELS, n_dequant=1, seed=seed + 2)
        # per-image values (the same single dequantisation draw as gmm_bits_per_dim) for the median and worst image
        u = dequantize_unit(te, LEVELS, torch.Generator().manual_seed(seed + 2))
        per = -base.gmm.score_samples(u) / (te.shape[1] * math.log(2)) + math.log2(LEVELS)
        rows.append({"model": name, "K": base.n_components, "reg_covar": rc, "val_bpd": base.val_bpd[base.n_components].mean,
                     "test_bpd": bt.mean, "test_se": bt.stderr, "test_median": float(np.median(per)), "test_max": float(per.max()),
                     "fit_s": fit_s})
    print("baselines", json.dumps(rows), flush=True)
    return rows


def meta_info(a) -> dict:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    return {"command": "OMP_NUM_THREADS=%s python %s" % (os.environ.get("OMP_NUM_THREADS"), " ".join(sys.argv)),
            "commit": commit, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared), torch {torch.__version__}",
            "args": vars(a), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def _model_rows(runs: list[dict]) -> list[dict]:
    order = {k: i for i, k in enumerate(MODELS)}
    rows = [r for run in runs for r in run["rows"]]
    return sorted(rows, key=lambda r: (order[r["model"]], label(r)))


def _net(row: dict) -> str:
    rec = row.get("recipe", {})
    return f"ConvScoreNet (ch {rec['ch']})" if rec.get("net") == "convnet" else f"MLP (hidden {rec.get('hidden')}, depth {rec.get('depth')})"


def write_tables(out: str, runs: list[dict], previous: list[dict] | None = None, previous_name: str = "") -> None:
    """``out.md`` and ``out.csv`` from the JSON records of one or more runs (baselines from the first).

    ``previous``: the runs of an earlier table (for example the MLP's), whose rows are listed in a second table for
    comparison (named by ``previous_name``, the file they come from); they are not written to the csv.
    """
    base = runs[0]["baselines"]
    rows = _model_rows(runs)
    best = min(base, key=lambda b: b["test_bpd"])
    nets = sorted({_net(r) for r in rows})
    lines = [f"# Digits: score models ({', '.join(nets)}) vs full-covariance GMM (test bits/dim, PF-ODE, uniform dequantisation)", ""]
    for run in runs:
        m = run["meta"]
        lines += [f"Command: `{m['command']}`  ", f"Commit {m['commit']}; {m['machine']}; {m.get('date', '')}.", ""]
    excl = lambda r: (r["test_bpd"] * N_TEST - r["test_max"]) / (N_TEST - 1)  # diagnostic only
    header = ("| model | params | steps (best) | steps/s | train wall min | train CPU min | val bpd | test bpd (mean +- se) | median | worst | "
              "mean without the worst image | test NFE | mean beats best GMM? |")
    lines += [header, "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for b in base:
        lines.append(f"| {b['model']}: K={b['K']}, reg_covar={b['reg_covar']:g} | | | | | | {b['val_bpd']:.3f} | "
                     f"{b['test_bpd']:.3f} +- {b['test_se']:.3f} | {b.get('test_median', float('nan')):.3f} | "
                     f"{b.get('test_max', float('nan')):.2f} | {excl(b):.3f} | | |")

    def model_line(r):
        verdict = "yes" if r["test_bpd"] < best["test_bpd"] else "no"
        # steps/s over the training wall time, which includes the validation evaluations (listed separately in the csv)
        sps = r["steps"] / max(r["train_cpu_s"] - r.get("val_eval_cpu_s", 0.0), 1e-9)
        return (f"| {label(r)} | {r['params']:,} | {r['steps']} ({r['best_step']}) | {sps:.1f} | {r['train_wall_s'] / 60:.1f} | "
                f"{r['train_cpu_s'] / 60:.1f} | {r['val_bpd']:.3f} | {r['test_bpd']:.3f} +- {r['test_se']:.3f} | "
                f"{r['test_median']:.3f} | {r['test_max']:.4g} | {excl(r):.3f} | {r['test_nfe']} | {verdict} |")

    lines += [model_line(r) for r in rows]
    lines += ["", "Steps/s: optimiser steps per CPU second of training, validation evaluations excluded; train CPU min includes them.", ""]
    if all("model_cpu_s" in r for r in rows):
        lines += ["CPU minutes per model in all (training, test bits/dim, ELBO, samples): " +
                  ", ".join(f"{label(r)} {r['model_cpu_s'] / 60:.1f}" for r in rows) + ".", ""]
    for r in rows:
        if "test_elbo_bpd" in r:
            lines.append(f"DDPM discrete ELBO (all 1000 terms, large variance) on the test split: "
                         f"{r['test_elbo_bpd']:.3f} +- {r['test_elbo_se']:.3f} bits/dim.")
    sq = [r for r in rows if "samples" in r]
    if sq:
        s0 = sq[0]["samples"]
        smp = s0["sampler"]
        lines += ["", f"Sample quality: {len(s0['sets'])} sets of {N_TEST} samples per model, {smp['method']} with predictor "
                  f"{smp['predictor']}, corrector {smp['corrector']}, {smp['steps']} steps (+ Tweedie denoising); each set against the "
                  f"test split on the digits classifier's features (`scoresde.evaluate.image_quality`): Fréchet distance and k-NN "
                  f"precision / recall (k = 3). Floor: {N_TEST} training images scored the same way: FD {s0['fd_floor']:.1f}, precision / "
                  f"recall {s0['precision_floor']:.2f} / {s0['recall_floor']:.2f}.", "",
                  "| model | NFE | FD (mean +- sd over sets) | FD / floor | FD per set | precision | recall | sampling + scoring CPU s |",
                  "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: |"]
        for r in sq:
            s = r["samples"]
            lines.append(f"| {label(r)} | {s['nfe']} | {s['fd']:.1f} +- {s['fd_sd']:.1f} | {s['fd'] / s['fd_floor']:.2f} | "
                         f"{', '.join('%.1f' % q['fd'] for q in s['sets'])} | {s['precision']:.3f} | {s['recall']:.3f} | {s['cpu_s']:.0f} |")
    if previous:
        prev = _model_rows(previous)
        lines += ["", f"Previous table for comparison ({previous_name}; {', '.join(sorted({_net(r) for r in prev}))}, "
                  "recipes in that file's .md; same data, split, baselines and bits/dim evaluation; no sample-quality numbers there):", "", header,
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
        lines += [model_line(r) for r in prev]
        for r in prev:
            if "test_elbo_bpd" in r:
                lines.append(f"\nDDPM discrete ELBO there: {r['test_elbo_bpd']:.3f} +- {r['test_elbo_se']:.3f} bits/dim.")
    lines += ["", "Recipes:", ""]
    for r in rows:
        lines.append(f"- {label(r)}: " + ", ".join(f"{k} {v}" for k, v in _recipe(r).items()))
    lines += ["", "Validation curves (step: val bpd):", ""]
    for r in rows:
        lines.append(f"- {label(r)}: " + ", ".join(f"{s}: {v:.3f}" for s, v in r["val_curve"]))
    Path(out + ".md").write_text("\n".join(lines) + "\n")
    fields = ["model", "label", "net", "K", "reg_covar", "params", "steps", "best_step", "train_wall_s", "train_cpu_s", "val_eval_cpu_s",
              "val_bpd", "test_bpd", "test_se", "test_median", "test_max", "test_nfe", "test_elbo_bpd", "test_elbo_se",
              "fd", "fd_sd", "fd_floor", "precision", "recall", "precision_floor", "recall_floor", "sample_nfe"]
    with open(out + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in base:
            w.writerow(r)
        for r in rows:
            s = r.get("samples", {})
            w.writerow({**r, "label": label(r), "net": _net(r), **{k: s[k] for k in fields if k in s},
                        **({"sample_nfe": s["nfe"]} if s else {})})


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--steps", type=int, default=6000, help="max optimiser steps per model")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--lr-schedule", default="constant", choices=("constant", "cosine", "linear"), help="decay after warm-up")
    p.add_argument("--lr-final-ratio", type=float, default=0.0, help="decayed lr at --steps as a fraction of --lr")
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--net", default="mlp", choices=("mlp", "convnet"), help="MLPScoreNet on vectors or ConvScoreNet on images")
    p.add_argument("--ch", type=int, default=32, help="ConvScoreNet base width (--net convnet)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--time-embedding", default="fourier", choices=("fourier", "sinusoidal"), help="continuous models")
    p.add_argument("--fourier-scale", type=float, default=16.0)
    p.add_argument("--weighting", default="default", choices=("default", "likelihood"), help="VP / sub-VP DSM weighting")
    p.add_argument("--parameterization", default="eps", choices=("eps", "score"), help="continuous models' network output")
    p.add_argument("--sigma-max", type=float, default=12.0, help="VE: about the largest distance between training images (9.6)")
    p.add_argument("--aug-prob", type=float, default=0.0, help="noise-mixture augmentation: probability per image")
    p.add_argument("--aug-std-min", type=float, default=0.03, help="noise-mixture augmentation: smallest std (model scale)")
    p.add_argument("--aug-std-max", type=float, default=0.3, help="noise-mixture augmentation: largest std (model scale)")
    p.add_argument("--eval-every", type=int, default=1000)
    p.add_argument("--patience", type=int, default=2)
    p.add_argument("--val-probes", type=int, default=1)
    p.add_argument("--test-probes", type=int, default=4)
    p.add_argument("--rtol", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fd-sets", type=int, default=0, help="sets of 300 ancestral samples scored by FD / precision / recall (0: off)")
    p.add_argument("--fd-steps", type=int, default=100, help="ancestral sampling steps for --fd-sets")
    p.add_argument("--workdir", default="runs/digits_models")
    p.add_argument("--ckpt-root", default=None, help="copy each selected checkpoint to CKPT_ROOT/<model>/")
    p.add_argument("--out", default=None, help="write OUT.json (and OUT.md, OUT.csv)")
    p.add_argument("--collate", nargs="+", default=None, help="only merge these OUT.json files into --out .md/.csv")
    p.add_argument("--previous", default=None, help="with --collate: a collated .json whose rows the .md lists in a second table")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--paired", nargs="+", default=None, metavar="LABEL=CKPT",
                   help="only score these checkpoints on the test split with shared noise (--test-probes, --rtol) and write "
                        "paired differences to --out.json")
    p.add_argument("--reevaluate", default=None, help="OUT.json of a finished run: choose eps on val for --models, rescore test")
    p.add_argument("--eval-stds", nargs="+", type=float, default=[0.005, 0.01, 0.02, 0.04],
                   help="candidate perturbation stds s(eps) for --reevaluate")
    a = p.parse_args(argv)

    if a.paired:
        if not a.out:
            p.error("--paired needs --out")
        te = load_dataset("digits", "test").x.reshape(-1, 64).long()
        Path(a.out + ".json").write_text(json.dumps(paired(a.paired, a, te), indent=1))
        return
    if a.reevaluate:
        flat = lambda s: load_dataset("digits", s).x.reshape(-1, 64).long()
        va, te = flat("val"), flat("test")
        run = json.loads(Path(a.reevaluate).read_text())
        run["rows"] = [reevaluate(r, a, va, te) if r["model"] in a.models else r for r in run["rows"]]
        run["meta"]["reevaluate"] = meta_info(a)
        Path(a.out + ".json").write_text(json.dumps(run, indent=1))
        return
    if a.collate:
        if not a.out:
            p.error("--collate needs --out")
        runs = [json.loads(Path(f).read_text()) for f in a.collate]
        flat = lambda s: load_dataset("digits", s).x.reshape(-1, 64).long()
        runs[0]["baselines"] = baselines(flat("train"), flat("val"), flat("test"), runs[0]["meta"]["args"]["seed"])
        Path(a.out + ".json").write_text(json.dumps({"runs": runs}, indent=1))
        previous = json.loads(Path(a.previous).read_text())["runs"] if a.previous else None
        write_tables(a.out, runs, previous, a.previous or "")
        return
    flat = lambda s: load_dataset("digits", s).x.reshape(-1, 64).long()
    tr, va, te = flat("train"), flat("val"), flat("test")
    base = baselines(tr, va, te, a.seed)
    meta = meta_info(a)
    rows = [run_model(k, a, tr, va, te, Path(a.workdir)) for k in a.models]
    if a.out:
        run = {"meta": meta, "baselines": base, "rows": rows}
        Path(a.out + ".json").write_text(json.dumps(run, indent=1))
        write_tables(a.out, [run])


if __name__ == "__main__":
    main()
