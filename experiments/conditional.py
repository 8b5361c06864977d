"""Conditional generation on the embedded 8x8 digits: classifier-free guidance (the w-curve), classifier guidance at
matched NFE, and inpainting, each judged by the project's digit classifier (accuracy on the intended label) and by
Fréchet distance / k-NN precision and recall on its features beside the floor at the same N.

1. A class-conditional quickstart model: ``scoresde-train experiment=quickstart model.num_classes=10
   train.p_uncond=P`` (ConvScoreNet with a label table of 11 rows, the last the null label; label dropout P). Its
   own ``metrics.json`` holds the PF-ODE test bits/dim of the null-label (unconditional) score.
2. Classifier-free guidance ``s_w = (1 + w) s(x, t, y) - w s(x, t, null)`` for w in ``--weights``: ``--n`` samples with
   balanced labels (``i mod 10``), the quickstart sampler (DDIM eta = 1, 100 steps; every NFE one network call on a
   doubled batch for w > 0); ``class_accuracy``, FD, precision / recall. Also the null label alone (``class_label=10``),
   the model's unconditional sampler, to compare with the unconditional quickstart in README.
3. Classifier guidance ``s(x, t, null) + w grad log p_t(y | x)`` with a noise-conditional classifier
   (``scoresde.classifier``, trained on perturbed digits for the same VP SDE) on the same network's null-label
   score, at the same sampler and NFE.
4. Inpainting (Song et al. 2021, App. I): the top half (rows 0-3) of test images given, the bottom half sampled with
   the null-label score by PC (reverse diffusion + Langevin) with the known rows replaced by forward-marginal draws at
   every step; several samples per input in a figure; FD of the completed images to the test split (the true
   completions' distribution) beside the floor.

    python experiments/conditional.py --out experiments/results/conditional      # OUT.md, OUT.json, OUT.png, OUT_inpaint.png
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from scoresde.evaluate import (EvalOptions, GuidanceOptions, class_accuracy, draw_samples, guided_score_maker,
                               image_quality, sample_labels)
from scoresde.runs import load_run, load_split, reference_samples, stream_seed

SAMPLER = {"method": "ddim", "steps": 100, "eta": 1.0}
NUM_CLASSES = 10


def train_model(run: Path, p_uncond: float, extra: list) -> dict:
    from scoresde.cli import train_main

    t0 = time.perf_counter()
    if not (run / "metrics.json").is_file():
        train_main(["experiment=quickstart", "model.num_classes=10", f"train.p_uncond={p_uncond}", "progress=false",
                    f"hydra.run.dir={run}"] + extra)
    m = json.loads((run / "metrics.json").read_text())
    m["wall_seconds"] = time.perf_counter() - t0
    return m


def judge(x: torch.Tensor, labels, run, seed: int) -> dict:
    """FD / precision / recall with floors (own features) and the classifier's accuracy on ``labels``."""
    test = load_split(run.data, "test", seed=run.seed)
    out = image_quality(x, test, run.data, EvalOptions(), seed=run.seed, device="cpu")
    if labels is not None:
        out["class_accuracy"] = class_accuracy(x, labels, run.data, EvalOptions(), "cpu")
    return out


def sample_with(make_score, run, n: int, seed: int, labels):
    t0 = time.perf_counter()
    x, nfes, _ = draw_samples(make_score, run.sde, run.shape, SAMPLER, n, n, seed, "cpu", torch.float32, labels=labels)
    return x, {"nfe": nfes[0], "seconds": time.perf_counter() - t0}


def cfg_curve(run, weights, n: int, seed: int) -> list:
    rows = []
    for w in weights:
        make_score, k = guided_score_maker(run, GuidanceOptions(guidance=w), "cpu", torch.float32)
        labels = sample_labels(n, k, None)
        x, info = sample_with(make_score, run, n, seed, labels)
        rows.append({"guidance": w, "kind": "classifier-free", **info, "network_rows_per_nfe": 2 if w else 1,
                     **judge(x, labels, run, seed)})
        print(json.dumps(rows[-1]), flush=True)
        if w == weights[len(weights) // 2]:
            rows[-1]["_samples"] = x
    return rows


def null_label(run, n: int, seed: int) -> dict:
    make_score, k = guided_score_maker(run, GuidanceOptions(class_label=NUM_CLASSES), "cpu", torch.float32)
    x, info = sample_with(make_score, run, n, seed, sample_labels(n, k, NUM_CLASSES))
    return {"kind": "null label (unconditional branch)", **info, **judge(x, None, run, seed)}


def classifier_curve(run, clf_path: Path, weights, n: int, seed: int) -> list:
    from scoresde.classifier import load_classifier
    from scoresde.samplers.guidance import classifier_guided_score_fn

    clf = load_classifier(clf_path).eval()
    uncond = run.model.guided_score_fn(NUM_CLASSES)  # the same network's null-label score: the unconditional model

    rows = []
    for w in weights:
        labels = sample_labels(n, NUM_CLASSES, None)
        x, info = sample_with(lambda y: classifier_guided_score_fn(uncond, clf.log_prob_fn(), y, w), run, n, seed, labels)
        rows.append({"guidance": w, "kind": "classifier", **info, **judge(x, labels, run, seed)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def train_classifier(workdir: Path) -> tuple[Path, dict]:
    from scoresde.classifier import ClassifierOptions, run_train_classifier

    opts = ClassifierOptions(dataset="digits", sde="vp", workdir=str(workdir))
    m = run_train_classifier(opts)
    return workdir, m


def inpainting(run, n: int, per_input: int, seed: int, steps: int) -> tuple[dict, torch.Tensor]:
    """Top half known: ``n`` completions of the first ``n`` test images (FD against the test split) and a figure
    block of ``per_input`` samples for 8 inputs."""
    from scoresde.samplers.inpaint import inpaint

    test = load_split(run.data, "test", seed=run.seed)
    y = reference_samples(test, run.data, seed=stream_seed(seed, 4), dtype=torch.float32, device="cpu")[:n]
    mask = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    mask[..., :4, :] = True
    uncond = run.model.guided_score_fn(NUM_CLASSES)  # the null label: the model's unconditional score
    t0 = time.perf_counter()
    res = inpaint(uncond, run.sde, y, mask.expand_as(y), method="pc", steps=steps,
                  generator=torch.Generator().manual_seed(seed))
    secs = time.perf_counter() - t0
    known_exact = bool(torch.equal(res.x[mask.expand_as(y)], y[mask.expand_as(y)]))
    row = {"kind": "inpainting (top half given)", "method": "pc", "steps": steps, "nfe": res.nfe, "seconds": secs,
           "known_pixels_exact": known_exact, **judge(res.x, None, run, seed)}
    # the figure block: 8 inputs, per_input completions each
    y8 = y[:8].repeat_interleave(per_input, 0)
    r8 = inpaint(uncond, run.sde, y8, mask.expand_as(y8), method="pc", steps=steps,
                 generator=torch.Generator().manual_seed(seed + 1)).x
    shown = torch.where(mask, y[:8], torch.zeros(()))  # the hidden half mid-grey (0 on the model's scale)
    return row, torch.cat([shown[:, None], y[:8, None], r8.reshape(8, per_input, *y.shape[1:])], 1)


def _pad(img: torch.Tensor) -> torch.Tensor:
    """``(N, 8, 8)`` uint8 tiles with a 1-pixel mid-grey frame: ``(N, 10, 10)``, so neighbouring digits stay apart."""
    return torch.nn.functional.pad(img, (1, 1, 1, 1), value=128)


def figures(out: Path, cfg_rows, clf_rows, grid, guided_samples) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from scoresde.plots import to_uint8

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6), dpi=110)
    for rows, name, mk in ((cfg_rows, "classifier-free", "o-"), (clf_rows, "classifier", "s--")):
        if not rows:
            continue
        w = [r["guidance"] for r in rows]
        axes[0].plot(w, [r["class_accuracy"] for r in rows], mk, label=name)
        axes[1].plot(w, [r["fd"] for r in rows], mk, label=name)
    if cfg_rows:
        axes[1].axhline(cfg_rows[0]["fd_floor"], color="grey", lw=1, label="floor (train vs test)")
    axes[0].set(xlabel="guidance weight w", ylabel="classifier accuracy on the intended label", ylim=(0, 1.02))
    axes[1].set(xlabel="guidance weight w", ylabel="FD to the test split (own features)")
    for ax in axes[:2]:
        ax.legend(fontsize=8)
    if guided_samples is not None:
        img = _pad(to_uint8(guided_samples[:100], centered=True).squeeze(-1))  # (100, 10, 10), labels i mod 10
        tiles = img.reshape(10, 10, 10, 10).permute(1, 2, 0, 3).reshape(100, 100)  # row = class
        axes[2].imshow(tiles.numpy(), cmap="gray", vmin=0, vmax=255)
        axes[2].set_title("classifier-free guidance: one row per class", fontsize=9)
        axes[2].axis("off")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"))
    plt.close(fig)
    if grid is not None:
        k = grid.shape[1]
        img = _pad(to_uint8(grid.reshape(-1, *grid.shape[2:]), centered=True).squeeze(-1)).reshape(8, k, 10, 10)
        tiles = img.permute(0, 2, 1, 3).reshape(80, 10 * k)
        fig, ax = plt.subplots(figsize=(1.0 + 0.8 * k, 6.6), dpi=110)
        ax.imshow(tiles.numpy(), cmap="gray", vmin=0, vmax=255)
        ax.set_title("inpainting: given top half | test image | completions", fontsize=8)
        ax.axis("off")
        fig.tight_layout()
        fig.savefig(out.parent / (out.name + "_inpaint.png"))
        plt.close(fig)


def _f(v, d):
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{d}f}"


def table(rows) -> str:
    lines = ["| sampling | w | NFE | rows / NFE | sec | class accuracy | FD (floor) | precision / recall (floor) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['kind']} | {_f(r.get('guidance'), 1)} | {r['nfe']} | {r.get('network_rows_per_nfe', 1)} | "
                     f"{r['seconds']:.1f} | {_f(r.get('class_accuracy'), 3)} | {r['fd']:.1f} ({r['fd_floor']:.1f}) | "
                     f"{r['precision']:.2f} / {r['recall']:.2f} ({r['precision_floor']:.2f} / {r['recall_floor']:.2f}) |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="outputs/conditional")
    ap.add_argument("--out", default=None, help="write OUT.md, OUT.json, OUT.png and OUT_inpaint.png")
    ap.add_argument("--p-uncond", type=float, default=0.1)
    ap.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.5, 1.0, 2.0, 4.0])
    ap.add_argument("--clf-weights", type=float, nargs="+", default=[0.0, 0.5, 1.0, 2.0, 4.0])
    ap.add_argument("--n", type=int, default=300, help="samples per setting (as many as test images)")
    ap.add_argument("--inpaint-steps", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-classifier", action="store_true")
    ap.add_argument("--skip-inpaint", action="store_true")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for the training run")
    a = ap.parse_args(argv)
    work = Path(a.workdir)
    m = train_model(work / "model", a.p_uncond, a.overrides)
    t_all = time.perf_counter()  # what follows the training run (reused when its metrics.json exists)
    run = load_run(str(work / "model"), "cpu", torch.float32)
    cfg_rows = cfg_curve(run, a.weights, a.n, a.seed)
    guided = next((r.pop("_samples") for r in cfg_rows if "_samples" in r), None)
    rows = list(cfg_rows) + [null_label(run, a.n, a.seed)]
    clf_rows, clf_metrics = [], None
    if not a.skip_classifier:
        t0 = time.perf_counter()
        clf_dir, clf_metrics = train_classifier(work / "classifier")
        clf_metrics = {**clf_metrics, "wall_seconds": time.perf_counter() - t0}
        clf_rows = classifier_curve(run, clf_dir, a.clf_weights, a.n, a.seed)
        rows += clf_rows
    grid = None
    if not a.skip_inpaint:
        row, grid = inpainting(run, a.n, 6, a.seed, a.inpaint_steps)
        rows.append(row)
    md = table(rows)
    print(md)
    if a.out:
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        figures(out, cfg_rows, clf_rows, grid, guided)
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        nll = m.get("nll", {}).get("test", {})
        meta = {"command": " ".join(["python"] + sys.argv), "commit": commit, "torch": torch.__version__,
                "machine": platform.machine(), "seconds_after_training": time.perf_counter() - t_all,
                "model_train_seconds": m["train"]["seconds"], "model_test_bpd_null_label": nll.get("bpd"),
                "model_test_bpd_stderr": nll.get("bpd_stderr"), "sampler": SAMPLER, "n": a.n, "p_uncond": a.p_uncond,
                "classifier": clf_metrics, "rows": rows}
        out.with_suffix(".json").write_text(json.dumps(meta, indent=1, default=str))
        head = (f"# Conditional generation on digits\n\nCommand: `{meta['command']}` at commit {commit}; "
                f"on this 2-core machine, shared with other jobs: model training {m['train']['seconds'] / 60:.1f} min "
                f"(2500 steps), everything after it {meta['seconds_after_training'] / 60:.1f} min; test bits/dim of the null-label score "
                f"{_f(nll.get('bpd'), 3)} ± {_f(nll.get('bpd_stderr'), 3)}.\n\nSampler: DDIM eta = 1, 100 steps, "
                f"{a.n} samples per row with balanced labels (FD and precision / recall against the {a.n} test images, "
                f"floor: as many training images). Class accuracy: the project's digit classifier "
                f"(`scoresde.features`) on the intended label.\n\n")
        out.with_suffix(".md").write_text(head + md + "\n![w-curve](" + out.name + ".png)\n\n![inpainting](" + out.name + "_inpaint.png)\n")


if __name__ == "__main__":
    main()
