"""Figures of a run: sample grids / scatter plots, the DDPM-vs-SDE comparison, sweep bar charts (matplotlib, Agg)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch

__all__ = ["save_sample_figure", "plot_compare", "plot_report", "to_uint8", "save_png_folder", "save_uint8_npz"]


def save_sample_figure(samples: torch.Tensor, path, centered: bool = True, reference: Optional[torch.Tensor] = None, title: str = "") -> None:
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
        imgs = from_model_scale(x, centered=centered).clamp(0, 1)
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




def to_uint8(samples: torch.Tensor, centered: bool = True) -> torch.Tensor:
    """8-bit pixels ``(N, H, W, C)`` of model-scale images ``(N, C, H, W)``: ``clamp(floor(256 u), 0, 255)`` with
    ``u = (y - b) / a`` (the mapping ``features.InceptionFeatures`` applies). Non-finite pixels become 0."""
    if not torch.is_tensor(samples) or samples.dim() != 4:
        raise ValueError(f"samples must be images (N, C, H, W); got {getattr(samples, 'shape', type(samples).__name__)}")
    from .data.transforms import from_model_scale

    u = from_model_scale(samples.detach().double().cpu(), centered=centered)
    u = torch.nan_to_num(u, nan=0.0, posinf=1.0, neginf=0.0)
    return torch.clamp(torch.floor(256 * u), 0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def save_png_folder(samples: torch.Tensor, folder, centered: bool = True) -> Path:
    """One 8-bit PNG per image (``000000.png``, ...) in ``folder`` (created): grey ``L`` for 1 channel, ``RGB`` for
    3 (the layout folder-based FID tools such as pytorch-fid read). Returns the folder."""
    from PIL import Image

    pix = to_uint8(samples, centered).numpy()
    if pix.shape[-1] not in (1, 3):
        raise ValueError(f"PNG export needs 1 or 3 channels; got {pix.shape[-1]}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    width = max(6, len(str(len(pix) - 1)))
    for i, img in enumerate(pix):
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(folder / f"{i:0{width}d}.png")
    return folder


def save_uint8_npz(samples: torch.Tensor, path, centered: bool = True) -> Path:
    """``arr_0``: the samples as uint8 ``(N, H, W, C)`` in an ``.npz`` (the batch layout of the ADM / guided-diffusion
    FID evaluator). Returns the path."""
    import numpy as np

    path = Path(path)
    np.savez(path, arr_0=to_uint8(samples, centered).numpy())
    return path


def plot_compare(all_metrics: dict, labels: list, path: Path) -> None:
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


def plot_report(table: list, varying: list, plotted: list, path: Path) -> None:
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
