"""Command-line entry points: ``scoresde-train``, ``-sample``, ``-nll``, ``-compare`` (Hydra apps) and ``-report``.

Each Hydra app composes its config from ``scoresde/configs`` (see ``scoresde.config`` for the
schemas), validates it before any work, and writes into its run directory:

* ``config.yaml`` -- the resolved config (Hydra also keeps ``.hydra/``: config, overrides);
* ``checkpoint.pt`` / ``best.pt`` / ``metrics.jsonl`` -- training state and log (train, compare);
* ``metrics.json`` -- every number of the run, machine-readable;
* ``samples.png`` -- a sample grid (a scatter plot for 2-D data).

The work itself is done by plain functions (``run_train``, ``run_sample``, ``run_nll``,
``run_compare``) that take validated config dataclasses and an output directory, so they can be
called from Python without Hydra. ``collate_runs`` (``scoresde-report``) turns run/sweep directories
into a markdown table, a CSV and bar plots; after a multirun the ``CollateCallback`` (enabled in
the configs) does it automatically in the sweep directory.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from . import config as C

__all__ = [
    "train_main",
    "sample_main",
    "nll_main",
    "compare_main",
    "report_main",
    "run_train",
    "run_sample",
    "run_nll",
    "run_compare",
    "load_run",
    "collate_runs",
    "CollateCallback",
]

CONFIG_NAME = "config.yaml"
METRICS_NAME = "metrics.json"
SAMPLES_NAME = "samples.png"


# ============================================================================================
# small helpers
# ============================================================================================
def _log(msg: str) -> None:
    print(f"[scoresde] {msg}", flush=True)


def _is_rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _jsonable(v):
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if torch.is_tensor(v):
        return _jsonable(v.tolist())
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, Path):
        return str(v)
    return v


def write_json(path, obj) -> None:
    """Write ``obj`` as indented JSON (tensors -> lists, non-finite floats -> strings), atomically."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_jsonable(obj), indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def _save_config(obj, outdir: Path) -> None:
    from omegaconf import OmegaConf

    (outdir / CONFIG_NAME).write_text(OmegaConf.to_yaml(OmegaConf.structured(obj)))


def _generator(seed: int, device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(int(seed))


def _stream_seed(seed: int, *stream: int) -> int:
    """A seed for an independent stream of the run (sampling, likelihood, ...)."""
    import numpy as np

    return int(np.random.SeedSequence([int(seed), *stream]).generate_state(1, dtype=np.uint32)[0])


# ============================================================================================
# data
# ============================================================================================
def load_split(data_cfg: C.DataConfig, split: str, seed: int = 0):
    """``load_dataset`` for one split: ``n_train`` examples for "train", ``n_eval`` for the others."""
    from .data import load_dataset

    n = data_cfg.n_train if split == "train" else data_cfg.n_eval
    return load_dataset(data_cfg.name, split=split, root=data_cfg.root, download=data_cfg.download, n=n, seed=seed)


def make_prepare(data_cfg: C.DataConfig, levels: Optional[int], dtype: torch.dtype) -> Callable:
    """``prepare(batch, generator) -> x0`` on the model's scale: dequantise (discrete data), flip (images) and the
    noise-mixture augmentation (off at ``data.noise_mixture_prob = 0``, which draws nothing)."""
    from .data.transforms import noise_mixture, random_hflip, uniform_dequantize

    def prepare(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if levels is not None:
            x = uniform_dequantize(batch, levels, centered=data_cfg.centered, generator=generator, dtype=dtype, noise=data_cfg.dequantize)
        else:
            x = batch.to(dtype)
        if data_cfg.random_flip and x.dim() == 4:
            x = random_hflip(x, generator=generator)
        return noise_mixture(x, data_cfg.noise_mixture_prob, data_cfg.noise_mixture_std_min, data_cfg.noise_mixture_std_max,
                             generator=generator)

    return prepare


def reference_samples(ds, data_cfg: C.DataConfig, seed: int, dtype, device) -> torch.Tensor:
    """The data on the model's scale (discrete data uniformly dequantised with a fixed seed)."""
    g = torch.Generator().manual_seed(int(seed))
    return ds.model_scale(centered=data_cfg.centered, dequantize=True, generator=g, dtype=dtype).to(device)


# ============================================================================================
# models: build for training, reload for sampling / likelihood
# ============================================================================================
def _oracle_for(data_cfg: C.DataConfig):
    from .data import default_gmm

    if data_cfg.name != "gmm":
        raise C.ConfigError(f"model=oracle needs data=gmm; got data.name={data_cfg.name!r}")
    return default_gmm(2)


@dataclass
class LoadedRun:
    """A trained (or oracle) model ready for evaluation."""

    cfg: Any  # TrainAppConfig
    sde: Any
    score_fn: Callable
    model: Any  # ScoreModel or None (oracle)
    oracle: Any  # GaussianMixture or None
    shape: tuple
    run_dir: Path
    checkpoint: Optional[Path]
    step: Optional[int]


def _build_model_for(cfg, sde, shape, device, dtype):
    model = C.build_model(cfg.model, cfg.sde, sde, shape, continuous=cfg.train.continuous, seed=cfg.seed)
    return model.to(device=device, dtype=dtype)


def _find_run(ckpt: str) -> tuple[Path, Optional[Path]]:
    """``ckpt`` = a train run dir (uses ``best.pt`` if present, else ``checkpoint.pt``) or a checkpoint file."""
    from .train import BEST_NAME, CHECKPOINT_NAME

    p = Path(ckpt).expanduser()
    if p.is_dir():
        run_dir = p
        for name in (BEST_NAME, CHECKPOINT_NAME):
            if (p / name).is_file():
                return run_dir, p / name
        return run_dir, None
    if p.is_file():
        return p.parent, p
    raise C.ConfigError(f"ckpt: no such file or directory: {ckpt!r} (give a scoresde-train run directory or a checkpoint file)")


def load_run(ckpt: str, device, dtype, use_ema: bool = True) -> LoadedRun:
    """Rebuild the model of a ``scoresde-train`` run from its ``config.yaml`` and load its weights.

    Raises ``ConfigError`` if the run has no ``config.yaml`` or no checkpoint (non-oracle models),
    ``ValueError`` (from the checkpoint loader) for a corrupt or mismatched checkpoint.
    """
    from omegaconf import OmegaConf

    from .checkpoint import load_model_weights
    from .data import load_dataset

    run_dir, ckpt_path = _find_run(ckpt)
    cfg_path = run_dir / CONFIG_NAME
    if not cfg_path.is_file():
        raise C.ConfigError(f"ckpt: {str(run_dir)!r} has no {CONFIG_NAME} (is it a scoresde-train run directory?)")
    C.register_configs()
    base = OmegaConf.structured(C.TrainAppConfig)
    loaded = OmegaConf.load(cfg_path)
    node = OmegaConf.merge(
        base,
        {"sde": OmegaConf.structured({"vp": C.VPSDEConfig, "subvp": C.SubVPSDEConfig, "ve": C.VESDEConfig}[loaded.sde.name])},
        {"model": OmegaConf.structured({"mlp": C.MLPModelConfig, "unet": C.UNetModelConfig, "oracle": C.OracleModelConfig}[loaded.model.name])},
        {"sampler": OmegaConf.structured(C.SAMPLER_SCHEMAS[loaded.sampler.method])},
        loaded,
    )
    cfg = C.validate(node)
    sde = C.build_sde(cfg.sde)
    if isinstance(cfg.model, C.OracleModelConfig):
        gm = _oracle_for(cfg.data)
        return LoadedRun(cfg, sde, gm.score_fn(sde), None, gm, (gm.D,), run_dir, None, None)
    shape = load_dataset(cfg.data.name, split="test", root=cfg.data.root, n=1, seed=cfg.seed).shape
    if ckpt_path is None:
        raise C.ConfigError(f"ckpt: {str(run_dir)!r} has no checkpoint (best.pt / checkpoint.pt)")
    model = _build_model_for(cfg, sde, shape, device, dtype)
    state = load_model_weights(model, ckpt_path, which="ema" if use_ema else "model")
    model.eval()
    return LoadedRun(cfg, sde, model.score_fn, model, None, tuple(shape), run_dir, ckpt_path, state.get("step"))


# ============================================================================================
# evaluation pieces
# ============================================================================================
@torch.no_grad()
def draw_samples(score_fn, sde, shape, sampler_cfg, n: int, batch_size: int, seed: int, device, dtype, progress: bool = False):
    """``n`` samples of per-sample ``shape`` with the configured sampler, in batches.

    Returns ``(x (n, *shape), nfe per batch (list of int), seconds)``. Batch ``j`` uses the generator
    seeded ``stream(seed, 1, j)``.
    """
    from .samplers import sample

    kwargs = C.sampler_kwargs(sampler_cfg)
    method = kwargs.pop("method")
    steps = kwargs.pop("steps")
    xs, nfes = [], []
    t0 = time.perf_counter()
    for j, start in enumerate(range(0, n, batch_size)):
        b = min(batch_size, n - start)
        g = _generator(_stream_seed(seed, 1, j), device)
        res = sample(score_fn, sde, (b, *shape), method=method, steps=steps, generator=g, progress=progress,
                     device=device, dtype=dtype, **kwargs)
        xs.append(res.x.detach())
        nfes.append(int(res.nfe))
    x = torch.cat(xs) if xs else torch.empty((0, *shape), device=device, dtype=dtype)
    return x, nfes, time.perf_counter() - t0


def sample_quality(samples: torch.Tensor, reference: torch.Tensor, seed: int) -> dict:
    """Two-sample statistics of ``samples`` against ``reference`` (both on the model scale, flattened).

    ``mmd2`` (unbiased, RBF, median-heuristic bandwidths), ``swd`` (sliced Wasserstein-2) and, as the
    scale of chance, ``mmd2_floor``: the same MMD between two disjoint halves of the reference.
    Non-finite samples are counted (``nonfinite``) and left out.
    """
    from .metrics import mmd2_unbiased, sliced_wasserstein

    x = samples.reshape(samples.shape[0], -1).double().cpu()
    y = reference.reshape(reference.shape[0], -1).double().cpu()
    ok = torch.isfinite(x).all(dim=1)
    out = {"n": int(x.shape[0]), "nonfinite": int((~ok).sum())}
    x = x[ok]
    if x.shape[0] < 2 or y.shape[0] < 4:
        return out
    g = torch.Generator().manual_seed(int(seed))
    out["mmd2"] = float(mmd2_unbiased(x, y))
    out["swd"] = float(sliced_wasserstein(x, y, n_projections=128, generator=g))
    perm = torch.randperm(y.shape[0], generator=g)
    h = y.shape[0] // 2
    out["mmd2_floor"] = float(mmd2_unbiased(y[perm[:h]][: x.shape[0]], y[perm[h:]]))
    return out


def image_fd(samples: torch.Tensor, test, data_cfg: C.DataConfig, eval_cfg: C.EvalConfig, seed: int, device) -> dict:
    """Fréchet distance (``fd``) of image samples to the test split on a cached classifier's features, and
    ``fd_floor``: the same distance from as many training images to the test split."""
    from .features import FeatureExtractor, frechet_distance_images

    ext = FeatureExtractor.load_or_train(data_cfg.name, cache_dir=eval_cfg.feature_cache, root=data_cfg.root, seed=0, device=device)
    x = samples[torch.isfinite(samples.reshape(samples.shape[0], -1)).all(dim=1)].to(device=device, dtype=torch.float32)
    out = {"fd_classifier_test_accuracy": ext.test_accuracy}
    if x.shape[0] < 2:
        return out
    out["fd"] = frechet_distance_images(x, test.x.to(device), ext)
    train = load_split(data_cfg, "train", seed=seed)
    out["fd_floor"] = frechet_distance_images(train.x[: x.shape[0]].to(device), test.x.to(device), ext)
    return out


def save_sample_figure(samples: torch.Tensor, path, data_cfg: C.DataConfig, reference: Optional[torch.Tensor] = None, title: str = "") -> None:
    """PNG of ``samples``: a scatter plot (over the reference in grey) for 2-D data, else an image grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from .data.transforms import from_model_scale

    x = samples.detach().double().cpu()
    x = x[torch.isfinite(x.reshape(x.shape[0], -1)).all(dim=1)]
    if x.dim() == 2:
        fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
        if reference is not None:
            r = reference.detach().double().cpu()
            ax.scatter(r[:, 0], r[:, 1], s=2, c="0.75", label="data")
        if x.shape[1] >= 2:
            ax.scatter(x[:, 0], x[:, 1], s=3, c="C0", label="samples")
        ax.set_aspect("equal")
        ax.legend(loc="upper right", fontsize=7)
    else:
        imgs = from_model_scale(x, centered=data_cfg.centered).clamp(0, 1)
        if imgs.dim() == 3:
            imgs = imgs[:, None]
        n = min(imgs.shape[0], 64)
        cols = int(math.ceil(math.sqrt(n))) if n else 1
        rows = int(math.ceil(n / cols)) if n else 1
        c, h, w = imgs.shape[1:]
        grid = np.ones((rows * (h + 1) + 1, cols * (w + 1) + 1, c))
        for i in range(n):
            r, q = divmod(i, cols)
            grid[1 + r * (h + 1): 1 + r * (h + 1) + h, 1 + q * (w + 1): 1 + q * (w + 1) + w] = imgs[i].permute(1, 2, 0).numpy()
        fig, ax = plt.subplots(figsize=(4, 4 * rows / cols), dpi=100)
        ax.imshow(grid[..., 0] if c == 1 else grid, cmap="gray" if c == 1 else None, vmin=0, vmax=1, interpolation="nearest")
        ax.axis("off")
    if title:
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def nll_on_split(run: LoadedRun, ds, eval_cfg: C.EvalConfig, seed: int, device, dtype, progress: bool = False) -> dict:
    """Negative log-likelihood of one split through the probability-flow ODE.

    Discrete data: dequantised bits/dim of the integer data (``evaluate_bpd``; mean and standard error
    over examples). Continuous data: ``nll_nats`` (nats per dimension) and ``bpd`` = nats / ln 2 per
    dimension (not comparable to discrete bits/dim); with the oracle, also the exact ``nll_nats_true``.
    """
    from .likelihood import evaluate_bpd, log_likelihood

    kw = dict(divergence=eval_cfg.divergence, probes=eval_cfg.probes, rtol=eval_cfg.rtol, atol=eval_cfg.atol, eps=eval_cfg.eps)
    g = _generator(_stream_seed(seed, 2), device)
    t0 = time.perf_counter()
    if ds.is_discrete:
        res = evaluate_bpd(run.score_fn, run.sde, ds.x.to(device), levels=ds.levels, centered=run.cfg.data.centered,
                           batch_size=eval_cfg.batch_size, generator=g, dtype=dtype, device=device, progress=progress, **kw)
        return {"bpd": float(res.mean), "bpd_stderr": float(res.stderr), "n": int(res.bpd.numel()), "nfe": int(res.nfe),
                "seconds": time.perf_counter() - t0}
    x_all = ds.x.to(device=device, dtype=dtype)
    D = x_all[0].numel()
    vals, nfe = [], 0
    for start in range(0, x_all.shape[0], eval_cfg.batch_size):
        x = x_all[start: start + eval_cfg.batch_size]
        res = log_likelihood(run.score_fn, run.sde, x, generator=g, **kw)
        vals.append((-res.logp / D).detach().double().cpu())
        nfe += int(res.nfe)
    v = torch.cat(vals)
    out = {"nll_nats": float(v.mean()), "nll_nats_stderr": float(v.std(unbiased=True) / math.sqrt(v.numel())) if v.numel() > 1 else 0.0,
           "bpd": float(v.mean() / math.log(2)), "bpd_stderr": float(v.std(unbiased=True) / math.sqrt(v.numel()) / math.log(2)) if v.numel() > 1 else 0.0,
           "n": int(v.numel()), "nfe": nfe, "seconds": time.perf_counter() - t0}
    if run.oracle is not None:
        out["nll_nats_true"] = float((-run.oracle.log_prob(x_all.double().cpu()) / D).mean())
    return out


def elbo_on_split(run: LoadedRun, ds, eval_cfg: C.EvalConfig, seed: int, device, dtype, progress: bool = False) -> Optional[dict]:
    """The discrete DDPM negative ELBO in bits/dim (VP models on discrete data only; else ``None``)."""
    from .likelihood import evaluate_elbo
    from .sde import VPSDE

    if not (ds.is_discrete and isinstance(run.sde, VPSDE)):
        return None
    eps_fn = run.model.ddpm_eps_fn() if run.model is not None else run.oracle.ddpm_eps_fn(run.sde)
    g = _generator(_stream_seed(seed, 3), device)
    t0 = time.perf_counter()
    res = evaluate_elbo(eps_fn, run.sde, ds.x.to(device), levels=ds.levels, centered=run.cfg.data.centered,
                        batch_size=eval_cfg.batch_size, terms=eval_cfg.elbo_terms, generator=g, dtype=dtype, device=device,
                        progress=progress)
    return {"bpd": float(res.mean), "bpd_stderr": float(res.stderr), "n": int(res.bpd.numel()), "nfe": int(res.nfe),
            "seconds": time.perf_counter() - t0}


def evaluate_run(run: LoadedRun, sampler_cfg, eval_cfg: C.EvalConfig, outdir: Path, seed: int, device, dtype,
                 progress: bool = False, label: str = "", do_samples: bool = True, do_nll: Optional[bool] = None) -> dict:
    """Samples (figure, NFE, quality vs the test split) and likelihoods (ODE NLL per split, DDPM ELBO)."""
    out: dict = {}
    data_cfg = run.cfg.data
    test = load_split(data_cfg, "test", seed=run.cfg.seed)
    if do_samples and eval_cfg.n_samples > 0:
        x, nfes, secs = draw_samples(run.score_fn, run.sde, run.shape, sampler_cfg, eval_cfg.n_samples, eval_cfg.batch_size,
                                     seed, device, dtype, progress)
        s = {"method": sampler_cfg.method, "steps": sampler_cfg.steps, "nfe": nfes[0] if len(set(nfes)) == 1 else nfes,
             "nfe_mean": sum(nfes) / len(nfes), "seconds": secs}
        ref = reference_samples(test, data_cfg, seed=_stream_seed(seed, 4), dtype=torch.float64, device="cpu")
        if eval_cfg.quality:
            s.update(sample_quality(x, ref, seed=_stream_seed(seed, 5)))
        if eval_cfg.fd and x.dim() == 4:
            s.update(image_fd(x, test, data_cfg, eval_cfg, seed=run.cfg.seed, device=device))
        fig = outdir / (f"samples_{label}.png" if label else SAMPLES_NAME)
        save_sample_figure(x, fig, data_cfg, reference=ref if x.dim() == 2 else None,
                           title=f"{label or sampler_cfg.method}: NFE {s['nfe_mean']:.0f}")
        s["figure"] = fig.name
        torch.save(x.cpu(), outdir / (f"samples_{label}.pt" if label else "samples.pt"))
        out["samples"] = s
    if do_nll if do_nll is not None else eval_cfg.nll:
        out["nll"] = {}
        for split in eval_cfg.splits:
            ds = test if split == "test" else load_split(data_cfg, split, seed=run.cfg.seed)
            out["nll"][split] = nll_on_split(run, ds, eval_cfg, seed, device, dtype, progress)
    if eval_cfg.elbo:
        el = {}
        for split in eval_cfg.splits:
            ds = test if split == "test" else load_split(data_cfg, split, seed=run.cfg.seed)
            r = elbo_on_split(run, ds, eval_cfg, seed, device, dtype, progress)
            if r is not None:
                el[split] = r
        if el:
            out["elbo"] = el
    return out


def _print_summary(metrics: dict, prefix: str = "") -> None:
    s = metrics.get("samples")
    if s:
        q = f", MMD^2 {s['mmd2']:.4g} (floor {s['mmd2_floor']:.2g})" if "mmd2" in s else ""
        _log(f"{prefix}samples: {s['method']} NFE {s['nfe_mean']:.0f}{q}")
    for split, r in (metrics.get("nll") or {}).items():
        _log(f"{prefix}{split} bits/dim (PF-ODE): {r['bpd']:.4f} +- {r['bpd_stderr']:.4f} (n={r['n']})")
    for split, r in (metrics.get("elbo") or {}).items():
        _log(f"{prefix}{split} bits/dim (DDPM ELBO): {r['bpd']:.4f} +- {r['bpd_stderr']:.4f} (n={r['n']})")


# ============================================================================================
# the runs
# ============================================================================================
def _setup(c) -> tuple[torch.device, torch.dtype]:
    device = C.resolve_device(c.device)
    dtype = C.resolve_dtype(c.dtype)
    torch.manual_seed(c.seed)
    return device, dtype


def _val_loss_fn(model, loss_fn, val_x0: torch.Tensor, seed: int):
    """``eval_fn(ema_model, step) -> {"val_loss": ...}``: the training loss on a fixed validation batch and noise."""

    def eval_fn(ema_model, step):
        g = _generator(seed, val_x0.device)
        with torch.no_grad():
            return {"val_loss": float(loss_fn(ema_model, val_x0, g))}

    return eval_fn


def train_model(c, outdir: Path, device, dtype, progress: bool = True):
    """Train the configured model into ``outdir`` (``checkpoint.pt``, ``best.pt``, ``metrics.jsonl``).

    Returns ``(TrainResult or None, seconds)``; ``None`` for the oracle (nothing to train).
    """
    from .train import train

    if isinstance(c.model, C.OracleModelConfig):
        _log("model=oracle: the exact score of the data's mixture; nothing to train")
        return None, 0.0
    sde = C.build_sde(c.sde)
    train_ds = load_split(c.data, "train", seed=c.seed)
    model = _build_model_for(c, sde, train_ds.shape, device, dtype)
    loss_fn = C.build_loss(c.train, sde)
    prepare = make_prepare(c.data, train_ds.levels, dtype)
    extra, eval_fn = {}, None
    if c.train.eval_every > 0:
        val_ds = load_split(c.data, "val", seed=c.seed)
        val_x0 = prepare(val_ds.x[: 4 * c.train.batch_size].to(device), _generator(_stream_seed(c.seed, 6), device))
        eval_fn = _val_loss_fn(model, loss_fn, val_x0, _stream_seed(c.seed, 7))
        extra = {"select_metric": "val_loss", "select_mode": "min", "patience": c.train.patience or 0}
    options = C.build_train_options(c.train, c.seed, **extra)
    n_params = sum(p.numel() for p in model.parameters())
    net_name = type(getattr(model.net, "net", model.net)).__name__
    _log(f"training {net_name} ({n_params:,} parameters) on {c.data.name} ({len(train_ds)} examples), "
         f"sde={c.sde.name}, continuous={c.train.continuous}, {c.train.n_iters} steps, device={device}")
    t0 = time.perf_counter()
    result = train(model, loss_fn, train_ds.x, options, outdir, prepare=prepare, eval_fn=eval_fn, resume=True, progress=progress)
    return result, time.perf_counter() - t0


def run_train(c: C.TrainAppConfig, outdir, progress: Optional[bool] = None) -> dict:
    """Train, then evaluate (samples with the configured sampler; NLL per split; ELBO if asked).

    Writes ``config.yaml``, checkpoints, ``metrics.json`` and the sample figure into ``outdir`` and
    returns the metrics dict. Under torchrun only rank 0 evaluates.
    """
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    progress = c.progress if progress is None else progress
    device, dtype = _setup(c)
    _save_config(c, outdir)
    result, secs = train_model(c, outdir, device, dtype, progress)
    metrics: dict = {"config": C.to_plain(c)}
    if result is not None:
        metrics["train"] = {"steps": int(result.step), "final_loss": float(result.loss), "seconds": secs,
                            "best_step": result.best_step, "best_val_loss": result.best_value, "stopped_early": bool(result.stopped_early),
                            "world_size": int(getattr(result, "world_size", 1))}
    if not _is_rank0():
        return metrics
    run = load_run(str(outdir), device, dtype, use_ema=c.eval.use_ema)
    metrics["checkpoint"] = run.checkpoint.name if run.checkpoint else None
    metrics.update(evaluate_run(run, c.sampler, c.eval, outdir, c.seed, device, dtype, progress))
    write_json(outdir / METRICS_NAME, metrics)
    _print_summary(metrics)
    _log(f"run directory: {outdir}")
    return metrics


def _evaluate_saved_run(c, outdir, progress: Optional[bool], sampler_cfg, **evaluate_kwargs) -> dict:
    """Reload the run ``c.ckpt``, check ``sampler_cfg`` (if any) against its SDE, then ``evaluate_run`` into
    ``outdir`` (``config.yaml``, ``metrics.json``); the shared body of ``run_sample`` and ``run_nll``."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    progress = c.progress if progress is None else progress
    device, dtype = _setup(c)
    run = load_run(c.ckpt, device, dtype, use_ema=c.eval.use_ema)
    if sampler_cfg is not None:
        C._check_combination(run.cfg.sde, run.cfg.model, run.cfg.data, run.cfg.train, sampler_cfg)
    _save_config(c, outdir)
    metrics = {"config": C.to_plain(c), "run": str(run.run_dir), "checkpoint": str(run.checkpoint) if run.checkpoint else None}
    metrics.update(evaluate_run(run, sampler_cfg, c.eval, outdir, c.seed, device, dtype, progress, **evaluate_kwargs))
    write_json(outdir / METRICS_NAME, metrics)
    _print_summary(metrics)
    return metrics


def run_sample(c: C.SampleAppConfig, outdir, progress: Optional[bool] = None) -> dict:
    """Samples from a trained run with the configured sampler: figure, ``samples.pt``, NFE and quality."""
    return _evaluate_saved_run(c, outdir, progress, c.sampler, do_nll=False)


def run_nll(c: C.NLLAppConfig, outdir, progress: Optional[bool] = None) -> dict:
    """Bits/dim of a trained run per split (``eval.splits``) with standard errors; DDPM ELBO with ``eval.elbo``."""
    return _evaluate_saved_run(c, outdir, progress, None, do_samples=False, do_nll=True)


# ---------------------------------------------------------------------------------- compare
def variant_config(c: C.CompareAppConfig, variant: str) -> C.TrainAppConfig:
    """The ``TrainAppConfig`` of one comparison variant.

    ``ddpm``: VP SDE, discrete (``continuous=false``, the DDPM loss on integer steps); ``vp``, ``subvp``,
    ``ve``: continuous DSM with the base ``train`` settings. ``compare.sde_overrides[variant]`` sets SDE
    fields (e.g. ``ve: {sigma_max: 10}``). The VE variant uses ``compare.ema_rate_ve`` if set.
    """
    over = dict(c.compare.sde_overrides.get(variant, {}) or {})
    if variant in ("ddpm", "vp"):
        sde = C.VPSDEConfig(**over)
    elif variant == "subvp":
        sde = C.SubVPSDEConfig(**over)
    else:
        sde = C.VESDEConfig(**over)
    train = replace(c.train, continuous=(variant != "ddpm"))
    if variant == "ve" and c.compare.ema_rate_ve is not None:
        train = replace(train, ema_rate=c.compare.ema_rate_ve)
    sampler = C.PCSamplerConfig()
    tc = C.TrainAppConfig(seed=c.seed, device=c.device, dtype=c.dtype, progress=c.progress, sde=sde, model=c.model,
                          data=c.data, sampler=sampler, train=train, eval=c.eval)
    tc.check()
    return tc


def samplers_for(c: C.CompareAppConfig, variant: str) -> dict:
    """``label -> sampler config`` for one variant; labels a variant cannot use map to ``None`` (n/a)."""
    out = {}
    for label, node in c.compare.samplers.items():
        node = c.compare.samplers_ve.get(label, node) if variant == "ve" else node
        s = C.validate_sampler(node, prefix=f"compare.samplers.{label}")
        sde_cfg = C.VESDEConfig() if variant == "ve" else (C.SubVPSDEConfig() if variant == "subvp" else C.VPSDEConfig())
        try:
            C._check_combination(sde_cfg, c.model, c.data, c.train, s)
            out[label] = s
        except C.ConfigError:
            out[label] = None
    return out


def run_compare(c: C.CompareAppConfig, outdir, progress: Optional[bool] = None) -> dict:
    """Train every variant (``compare.variants``), evaluate each with every sampler and with the ODE NLL and
    DDPM ELBO, and write ``comparison.md``, ``comparison.csv``, ``comparison.png`` and ``metrics.json``.

    Each variant trains in ``outdir/<variant>/`` (a complete train run: ``scoresde-sample``/``-nll``
    accept it); an interrupted comparison resumes from the variants' checkpoints.
    """
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    progress = c.progress if progress is None else progress
    device, dtype = _setup(c)
    _save_config(c, outdir)
    variants = {v: variant_config(c, v) for v in c.compare.variants}  # validate everything first
    plans = {v: samplers_for(c, v) for v in c.compare.variants}
    all_metrics: dict = {"config": C.to_plain(c), "variants": {}}
    rows = []
    for v, tc in variants.items():
        vdir = outdir / v
        vdir.mkdir(exist_ok=True)
        _save_config(tc, vdir)
        _log(f"=== variant {v}")
        result, secs = train_model(tc, vdir, device, dtype, progress)
        run = load_run(str(vdir), device, dtype, use_ema=c.eval.use_ema)
        m: dict = {"train": {"steps": int(result.step), "final_loss": float(result.loss), "seconds": secs}, "samplers": {}}
        for label, s in plans[v].items():
            if s is None:
                m["samplers"][label] = None
                continue
            r = evaluate_run(run, s, c.eval, vdir, c.seed, device, dtype, progress, label=label, do_nll=False)
            m["samplers"][label] = r["samples"]
            _print_summary(r, prefix=f"{v}/{label} ")
        ev = replace(c.eval, elbo=c.compare.elbo)
        lk = evaluate_run(run, None, ev, vdir, c.seed, device, dtype, progress, do_samples=False, do_nll=c.compare.nll)
        m.update({k: lk[k] for k in ("nll", "elbo") if k in lk})
        _print_summary(lk, prefix=f"{v} ")
        write_json(vdir / METRICS_NAME, m)
        all_metrics["variants"][v] = m
        rows.append(_compare_row(v, m, list(c.compare.samplers)))
        write_json(outdir / METRICS_NAME, all_metrics)
        _write_compare_table(rows, list(c.compare.samplers), outdir)
    _plot_compare(all_metrics, list(c.compare.samplers), outdir / "comparison.png")
    _log(f"comparison table: {outdir / 'comparison.md'}")
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
        row[f"{label}_nonfinite"] = s.get("nonfinite") if s else None
        if s and s.get("fd_floor") is not None:
            row["fd_floor"] = s["fd_floor"]
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
    head = ["variant", "test NLL (ODE) bits/dim", "test DDPM ELBO bits/dim"] + [f"{l}: method, NFE, {q}" for l in labels]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["variant"], _fmt_pm(r["ode_nll_bpd"], r["ode_nll_bpd_se"]), _fmt_pm(r["elbo_bpd"], r["elbo_bpd_se"])]
        for l in labels:
            if r.get(f"{l}_nfe") is None:
                cells.append("n/a")
                continue
            v = r.get(f"{l}_fd") if use_fd else r.get(f"{l}_mmd2")
            bad = r.get(f"{l}_nonfinite") or 0
            cells.append(f"{r[f'{l}_method']}, {r[f'{l}_nfe']:.0f}, " + (f"{v:.4g}" if v is not None else "–") + (f" ({bad} non-finite)" if bad else ""))
        lines.append("| " + " | ".join(cells) + " |")
    floor = next((r.get("fd_floor" if use_fd else "mmd2_floor") for r in rows if r.get("fd_floor" if use_fd else "mmd2_floor") is not None), None)
    if floor is not None:
        lines += ["", f"{q} between training and test images of the same count (the floor): {floor:.4g}"]
    (outdir / "comparison.md").write_text("\n".join(lines) + "\n")


def _plot_compare(all_metrics: dict, labels: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vs = list(all_metrics["variants"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), dpi=100)
    ax = axes[0]
    for i, v in enumerate(vs):
        m = all_metrics["variants"][v]
        for j, (key, name) in enumerate((("nll", "ODE NLL"), ("elbo", "DDPM ELBO"))):
            r = (m.get(key) or {}).get("test")
            if r:
                ax.bar(i + 0.38 * j - 0.19, r["bpd"], width=0.36, yerr=r["bpd_stderr"], color=f"C{j}", label=name if i == 0 or True else None)
    handles, names = ax.get_legend_handles_labels()
    uniq = dict(zip(names, handles))
    ax.legend(uniq.values(), uniq.keys(), fontsize=7)
    ax.set_xticks(range(len(vs)), vs)
    ax.set_ylabel("test bits/dim")
    ax = axes[1]
    all_s = [s for v in vs for s in all_metrics["variants"][v]["samplers"].values() if s]
    key = "fd" if any(s.get("fd") is not None for s in all_s) else "mmd2"
    for i, v in enumerate(vs):
        for j, l in enumerate(labels):
            s = all_metrics["variants"][v]["samplers"].get(l)
            if s and s.get(key) is not None:
                ax.scatter(s["nfe_mean"], max(s[key], 1e-6), color=f"C{i}", marker="osd^vx"[j % 6], label=f"{v}/{l}")
    floor = next((s.get(f"{key}_floor") for s in all_s if s.get(f"{key}_floor") is not None), None)
    if floor is not None and floor > 0:
        ax.axhline(floor, color="0.5", ls="--", lw=1, label="data floor")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("NFE")
    ax.set_ylabel("FD to test (classifier features)" if key == "fd" else "MMD² to test data")
    ax.legend(fontsize=6, ncol=2, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ============================================================================================
# collation of run / sweep directories (scoresde-report, experiments/collect.py)
# ============================================================================================
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
        _plot_report(table, varying, plotted, png_path)
    return {"rows": table, "columns": columns, "md": md_path, "csv": csv_path, "png": png_path if plotted else None, "root": root}


def _plot_report(table: list, varying: list, plotted: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [",".join(f"{k}={t[k]}" for k in varying) or t["run"] for t in table]
    fig, axes = plt.subplots(1, len(plotted), figsize=(3.2 * len(plotted), 3.2), dpi=100, squeeze=False)
    for ax, key in zip(axes[0], plotted):
        vals = [t[key] if isinstance(t[key], (int, float)) else float("nan") for t in table]
        se = [t.get(key + "_stderr") if isinstance(t.get(key + "_stderr"), (int, float)) else 0.0 for t in table]
        ax.bar(range(len(vals)), vals, yerr=se if any(se) else None, color="C0")
        ax.set_xticks(range(len(vals)), labels, rotation=60, ha="right", fontsize=6)
        ax.set_title(key, fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _callback_base():
    try:
        from hydra.experimental.callback import Callback
    except ImportError:  # pragma: no cover
        Callback = object
    return Callback


class CollateCallback(_callback_base()):
    """Hydra callback: at the end of a multirun, collate the sweep directory into ``report.md/.csv/.png``."""

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            res = collate_runs([sweep_dir], out_dir=sweep_dir)
            _log(f"collated {len(res['rows'])} runs: {res['md']}")
        except FileNotFoundError as e:
            _log(f"nothing to collate: {e}")


# ============================================================================================
# Hydra entry points
# ============================================================================================
def _hydra_app(config_name: str, run_fn: Callable) -> Callable:
    import hydra

    C.register_configs()

    @hydra.main(version_base="1.3", config_path="configs", config_name=config_name)
    def app(cfg) -> Optional[float]:
        from hydra.core.hydra_config import HydraConfig

        try:
            obj = C.validate(cfg)  # every range check before any work
        except C.ConfigError as e:
            print(f"Config error: {e}", file=sys.stderr, flush=True)
            sys.exit(2)
        outdir = Path(HydraConfig.get().runtime.output_dir)
        try:
            metrics = run_fn(obj, outdir)
        except C.ConfigError as e:  # a cross-check needing the run (e.g. a sampler that the trained SDE cannot use)
            print(f"Config error: {e}", file=sys.stderr, flush=True)
            sys.exit(2)
        return _objective(metrics)

    return app


def _objective(metrics: dict) -> Optional[float]:
    """A scalar a sweeper could minimise: test bits/dim when measured."""
    r = (metrics or {}).get("nll", {}).get("test") if isinstance(metrics, dict) else None
    return r["bpd"] if r else None


def _run_app(config_name: str, run_fn: Callable, argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if config_name == "train":
        try:
            argv = C.expand_score_sde_argv(argv)
        except C.ConfigError as e:
            print(f"Error in score_sde_config: {e}", file=sys.stderr)
            sys.exit(2)
    old = sys.argv
    sys.argv = [old[0] if old else f"scoresde-{config_name}"] + argv
    try:
        _hydra_app(config_name, run_fn)()
    finally:
        sys.argv = old


def train_main(argv=None) -> None:
    """``scoresde-train [overrides]``: train, sample and evaluate (``score_sde_config=FILE.py`` accepted)."""
    _run_app("train", run_train, argv)


def sample_main(argv=None) -> None:
    """``scoresde-sample ckpt=RUN_DIR [sampler=... eval.n_samples=...]``."""
    _run_app("sample", run_sample, argv)


def nll_main(argv=None) -> None:
    """``scoresde-nll ckpt=RUN_DIR [eval.splits=[val,test] eval.elbo=true ...]``."""
    _run_app("nll", run_nll, argv)


def compare_main(argv=None) -> None:
    """``scoresde-compare experiment=ddpm_vs_sde [data=... train.n_iters=...]``."""
    _run_app("compare", run_compare, argv)


def report_main(argv=None) -> None:
    """``scoresde-report DIR [DIR ...] [--out OUT] [--metrics k1,k2] [--name report]``: collate runs."""
    p = argparse.ArgumentParser(prog="scoresde-report", description="Collate scoresde run / sweep directories into markdown, CSV and plots.")
    p.add_argument("paths", nargs="+", help="run or sweep directories (searched recursively for metrics.json)")
    p.add_argument("--out", default=None, help="output directory (default: the runs' common root)")
    p.add_argument("--metrics", default=None, help="comma-separated dotted metric keys (default: bits/dim, NFE, MMD², loss, time)")
    p.add_argument("--name", default="report", help="output file stem (default: report)")
    a = p.parse_args(argv)
    try:
        res = collate_runs(a.paths, out_dir=a.out, metrics=a.metrics.split(",") if a.metrics else None, name=a.name)
    except FileNotFoundError as e:
        p.error(str(e))
    print(res["md"].read_text())
    _log(f"wrote {res['md']}, {res['csv']}" + (f", {res['png']}" if res["png"] else ""))


if __name__ == "__main__":  # python -m scoresde.cli {train,sample,nll,compare,report} ...
    cmds = {"train": train_main, "sample": sample_main, "nll": nll_main, "compare": compare_main, "report": report_main}
    if len(sys.argv) < 2 or sys.argv[1] not in cmds:
        print(f"usage: python -m scoresde.cli {{{','.join(cmds)}}} [args]", file=sys.stderr)
        sys.exit(2)
    cmd = sys.argv.pop(1)
    cmds[cmd]()
