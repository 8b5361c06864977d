"""What ``scoresde-inpaint`` does: imputation and colourisation of a trained run's images (plain functions and options).

``run_inpaint(InpaintOptions)`` reloads a ``scoresde-train`` run, takes ``n_images`` images (a split of the run's own
data, or the user's array file of the same kind), hides the part ``mask`` names (``task="inpaint"``) or keeps only
the grey value (``task="colorize"``, 3-channel images), and draws ``samples_per_image`` completions of each with
``samplers.inpaint`` / ``samplers.colorize`` (the replacement method of Song et al. 2021, App. I.2-I.3; PC or the
probability-flow ODE). A class-conditional model is run with its null label (unconditional) unless ``class_label``
is given. It writes into the output directory:

* ``inpaint.png``: per input a row ``[masked input | completions ... | original]``;
* ``completions.pt`` ``(n_images, samples_per_image, *shape)`` and ``inputs.pt`` (the originals on the model scale);
* ``metrics.json``: NFE, seconds, ``known_exact`` (the observed pixels equal the input bitwise), the mean squared
  error of the completions on the hidden pixels, and for data with a feature classifier (digits, MNIST, CIFAR-10)
  the Fréchet distance and precision / recall of the completed images against the run's test split, each with its
  floor (as many training images), as ``evaluate.image_quality`` computes them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from ._validate import check_choice, check_int, check_positive

__all__ = ["InpaintOptions", "MASKS", "TASKS", "named_mask", "run_inpaint"]

log = logging.getLogger("scoresde")

TASKS = ("inpaint", "colorize")
MASKS = ("top_half", "bottom_half", "left_half", "right_half", "center", "checkerboard")
SPLIT_NAMES = ("train", "val", "test")


def named_mask(name: str, shape) -> torch.Tensor:
    """The observed pixels ``(1, *shape)`` bool (True = observed) of a named mask for images ``shape = (C, H, W)``:
    ``top_half`` / ``bottom_half`` / ``left_half`` / ``right_half`` observe that half, ``center`` observes all but the
    central ``H/2 x W/2`` square, ``checkerboard`` every other pixel. Every channel is observed alike."""
    check_choice("mask", name, MASKS)
    C, H, W = shape
    m = torch.zeros(H, W, dtype=torch.bool)
    if name == "top_half":
        m[: H // 2] = True
    elif name == "bottom_half":
        m[H // 2:] = True
    elif name == "left_half":
        m[:, : W // 2] = True
    elif name == "right_half":
        m[:, W // 2:] = True
    elif name == "center":
        m[:] = True
        m[H // 4: H // 4 + H // 2, W // 4: W // 4 + W // 2] = False
    else:
        m = (torch.arange(H)[:, None] + torch.arange(W)[None, :]) % 2 == 0
    return m.expand(C, H, W).unsqueeze(0).clone()


@dataclass
class InpaintOptions:
    """``scoresde-inpaint``'s options.

    ``ckpt``: a ``scoresde-train`` run directory or checkpoint (image data). ``task``: ``inpaint`` or ``colorize``
    (3-channel images: the grey value is kept, colour imputed). ``mask`` (inpaint): one of ``MASKS`` or a ``.npy`` /
    ``.pt`` file of a bool array ``(H, W)`` or ``(C, H, W)``, True = observed. ``images``: a split of the run's data
    (``train`` / ``val`` / ``test``) or a ``.npy`` / ``.pt`` file of integer images ``(N, C, H, W)`` in the run's levels
    ``[0, L-1]``; the first ``n_images`` are used. ``samples_per_image`` completions each. Sampler (``samplers.inpaint``):
    ``method`` ``pc`` (``predictor`` reverse diffusion, ``corrector`` Langevin with ``snr``, ``n_steps`` corrector steps
    per step) or ``ode`` (``ode_step``); ``steps`` (``None``: the sampler's default). ``class_label``: for a
    class-conditional model, the label (``None``: the null label, i.e. the unconditional score). ``out``: output
    directory (``None``: the app's). ``seed``, ``device`` (``auto``: CUDA if available), ``progress``.
    """

    ckpt: Optional[str] = None
    task: str = "inpaint"
    mask: str = "top_half"
    images: str = "test"
    n_images: int = 8
    samples_per_image: int = 4
    method: str = "pc"
    steps: Optional[int] = None
    snr: float = 0.16
    n_steps: int = 1
    ode_step: str = "heun"
    class_label: Optional[int] = None
    seed: int = 0
    device: str = "auto"
    out: Optional[str] = None
    progress: bool = True

    def check(self) -> "InpaintOptions":
        """``ValueError`` naming the field (``run_inpaint`` calls it first)."""
        from .samplers.inpaint import INPAINT_METHODS, ODE_STEPS

        if self.ckpt is None:
            raise ValueError("ckpt must be given: a scoresde-train run directory or checkpoint file (ckpt=<run>)")
        if not Path(self.ckpt).exists():
            raise ValueError(f"ckpt: no such file or directory: {self.ckpt!r}")
        check_choice("task", self.task, TASKS)
        if self.task == "inpaint" and self.mask not in MASKS and not Path(self.mask).is_file():
            raise ValueError(f"mask must be one of {list(MASKS)} or a .npy / .pt file of a bool array; got {self.mask!r}")
        if self.images not in SPLIT_NAMES and not Path(self.images).is_file():
            raise ValueError(f"images must be one of {list(SPLIT_NAMES)} or a .npy / .pt file of images; got {self.images!r}")
        check_int("n_images", self.n_images)
        check_int("samples_per_image", self.samples_per_image)
        check_choice("method", self.method, INPAINT_METHODS)
        if self.steps is not None:
            check_int("steps", self.steps)
        check_positive("snr", self.snr)
        check_int("n_steps", self.n_steps, 0)
        check_choice("ode_step", self.ode_step, ODE_STEPS)
        if self.class_label is not None:
            check_int("class_label", self.class_label, 0)
        check_int("seed", self.seed, 0)
        return self


def _load_array(path: str) -> torch.Tensor:
    p = Path(path)
    if p.suffix == ".npy":
        import numpy as np

        return torch.from_numpy(np.load(p))
    if p.suffix == ".pt":
        return torch.load(p, map_location="cpu")
    raise ValueError(f"{path!r}: expected a .npy or .pt file")


def _images(o: InpaintOptions, run) -> torch.Tensor:
    """The originals ``(n, *shape)`` on the model's scale (pixel-bin centres of the run's levels)."""
    from .data.datasets import DataSet
    from .runs import load_split

    if o.images in SPLIT_NAMES:
        ds = load_split(run.data, o.images, seed=run.seed)
    else:
        x = _load_array(o.images)
        if x.dtype.is_floating_point or tuple(x.shape[1:]) != tuple(run.shape):
            raise ValueError(f"images: {o.images!r} must hold integer images (N, {', '.join(map(str, run.shape))}) in "
                             f"[0, levels-1] like the run's data; got {x.dtype} {tuple(x.shape)}")
        levels = getattr(load_split(run.data, "test", seed=run.seed), "levels", None)
        if levels is None or int(x.min()) < 0 or int(x.max()) >= levels:
            raise ValueError(f"images: values must lie in [0, {levels - 1 if levels else '?'}] (the run's levels); got "
                             f"[{int(x.min())}, {int(x.max())}]")
        ds = DataSet(x=x, levels=levels, name=run.data.name, split="file")
    if ds.levels is None or len(run.shape) != 3:
        raise ValueError(f"scoresde-inpaint works on images; the run's data {run.data.name!r} have shape {tuple(run.shape)}")
    x = ds.model_scale(centered=run.data.centered, dequantize=False, dtype=torch.float32)
    return x[: o.n_images]


def _mask(o: InpaintOptions, shape) -> torch.Tensor:
    if o.mask in MASKS:
        return named_mask(o.mask, shape)
    m = _load_array(o.mask)
    if m.dtype != torch.bool:
        raise ValueError(f"mask: {o.mask!r} must hold a bool array (True = observed); got {m.dtype}")
    if m.dim() == 2:
        m = m.expand(shape[0], *m.shape)
    if tuple(m.shape) != tuple(shape):
        raise ValueError(f"mask: {o.mask!r} must have shape (H, W) or {tuple(shape)}; got {tuple(m.shape)}")
    return m.unsqueeze(0)


def _score(run, class_label: Optional[int]):
    """The unconditional score, or for a class-conditional model the score at ``class_label`` (default: null)."""
    k = run.model.num_classes if run.model is not None else None
    if k is None:
        if class_label is not None:
            raise ValueError("class_label needs a class-conditional model (trained with model.num_classes); this one is "
                             "unconditional")
        return run.score_fn
    label = k if class_label is None else class_label
    if label > k:
        raise ValueError(f"class_label must lie in [0, {k - 1}] or be {k} (the null label); got {label}")
    return run.model.guided_score_fn(label)


def _figure(inputs, shown, completions, path: Path, centered: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .plots import to_uint8

    n, k = completions.shape[:2]
    cols = [shown[:, None], completions, inputs[:, None]]
    grid = to_uint8(torch.cat(cols, 1).reshape(-1, *inputs.shape[1:]), centered=centered)  # (n (k + 2), H, W, C)
    H, W, C = grid.shape[1:]
    tiles = grid.reshape(n, k + 2, H, W, C).permute(0, 2, 1, 3, 4).reshape(n * H, (k + 2) * W, C)
    fig, ax = plt.subplots(figsize=(1.0 + 0.5 * (k + 2), 0.5 + 0.5 * n), dpi=110)
    ax.imshow(tiles.squeeze(-1).numpy(), cmap="gray" if C == 1 else None, vmin=0, vmax=255)
    ax.set_title("input (hidden part grey) | completions | original", fontsize=7)
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run_inpaint(o: InpaintOptions, outdir=None) -> dict:
    """Inpaint or colourise ``o.n_images`` images of the run ``o.ckpt`` (see the module docstring); returns the metrics
    written to ``metrics.json``."""
    from .evaluate import EvalOptions, FEATURE_DATASETS, image_quality
    from .runs import load_run, load_split, resolve_device, write_json
    from .samplers.inpaint import colorize, inpaint

    o = o.check()
    out = Path(o.out) if o.out else Path(outdir) if outdir is not None else Path("outputs/inpaint")
    device = resolve_device(o.device)
    run = load_run(o.ckpt, device, torch.float32)
    if run.model is None:
        raise ValueError("ckpt: scoresde-inpaint needs a trained image model; this run is the oracle")
    score_fn = _score(run, o.class_label)
    x0 = _images(o, run).to(device)
    if o.task == "colorize" and run.shape[0] != 3:
        raise ValueError(f"task=colorize needs 3-channel images; the run's data have {run.shape[0]} channel(s)")
    reps = x0.repeat_interleave(o.samples_per_image, 0)
    kw = {"steps": o.steps, "progress": o.progress, "generator": torch.Generator(device=device).manual_seed(o.seed)}
    if o.method == "pc":
        kw.update(snr=o.snr, n_steps=o.n_steps)
    else:
        kw.update(ode_step=o.ode_step)
    t0 = time.perf_counter()
    if o.task == "inpaint":
        mask = _mask(o, run.shape).to(device)
        res = inpaint(score_fn, run.sde, reps, mask.expand_as(reps), method=o.method, **kw)
        full = mask.expand_as(reps)
        shown = torch.where(mask, x0, torch.zeros((), dtype=x0.dtype, device=device))
    else:
        gray = reps.mean(1, keepdim=True)
        res = colorize(score_fn, run.sde, gray, method=o.method, **kw)
        full = None
        shown = x0.mean(1, keepdim=True).expand_as(x0)
    secs = time.perf_counter() - t0
    x = res.x
    if full is not None:
        known_exact = bool(torch.equal(x[full], reps[full]))
        hidden_mse = float((x - reps)[~full].pow(2).mean())
    else:
        known_exact = bool(torch.allclose(x.mean(1, keepdim=True), gray, atol=1e-5))
        hidden_mse = float((x - reps).pow(2).mean())
    out.mkdir(parents=True, exist_ok=True)
    comps = x.reshape(x0.shape[0], o.samples_per_image, *run.shape)
    torch.save(comps.cpu(), out / "completions.pt")
    torch.save(x0.cpu(), out / "inputs.pt")
    _figure(x0.cpu(), shown.cpu(), comps.cpu(), out / "inpaint.png", run.data.centered)
    metrics = {"options": asdict(o), "run": str(run.run_dir), "checkpoint": str(run.checkpoint), "task": o.task,
               "n_images": int(x0.shape[0]), "samples_per_image": o.samples_per_image, "nfe": res.nfe,
               "seconds": secs, "known_exact": known_exact, "hidden_mse": hidden_mse, "sampler": res.info}
    if run.data.name in FEATURE_DATASETS and x.shape[0] >= 2:
        test = load_split(run.data, "test", seed=run.seed)
        metrics["quality"] = image_quality(x, test, run.data, EvalOptions(), seed=run.seed, device=device)
    write_json(out / "metrics.json", metrics)
    log.info("%s: %d images x %d completions, NFE %d, %.1f s, known pixels exact: %s; output directory: %s", o.task,
             x0.shape[0], o.samples_per_image, res.nfe, secs, known_exact, out)
    return metrics
