"""What a run computes: samples and their quality, likelihoods (PF-ODE bits/dim, DDPM ELBO) per split.

Plain functions on a reloaded run (``scoresde.runs.LoadedRun``: ``sde``, ``score_fn``, ``model``, ``oracle``,
``shape``, ``data``, ``seed``) and on ``EvalOptions``; the random streams come from ``runs.stream_seed``.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import torch

from .plots import save_png_folder, save_sample_figure, save_uint8_npz

__all__ = ["EvalOptions", "GuidanceOptions", "sample_labels", "guided_score_maker", "class_accuracy", "SPLITS", "draw_samples", "sample_quality", "image_quality", "image_fd", "nll_on_split", "elbo_on_split",
           "evaluate_run", "print_summary"]

log = logging.getLogger("scoresde")

SPLITS = ("train", "val", "test")
FEATURE_DATASETS = ("digits", "mnist", "cifar10")  # the image sets with a feature classifier (scoresde.features)


@dataclass
class EvalOptions:
    """What a run evaluates: samples (figure + quality metrics + NFE) and likelihoods (ODE NLL, DDPM ELBO).

    ``n_samples`` samples drawn in batches of ``batch_size``; ``quality``: MMD² / sliced Wasserstein to the test
    split; ``nll``: PF-ODE bits/dim on each of ``splits`` with the solver options ``divergence``, ``probes``,
    ``rtol``, ``atol``, ``eps`` (``scoresde.log_likelihood``); ``elbo``: the DDPM ELBO (VP models on discrete data;
    ``elbo_terms=None`` sums all N terms); ``use_ema``: evaluate the EMA weights. ``fd``: for images of the digits, MNIST
    or CIFAR-10 (``FEATURE_DATASETS``; other data are skipped), also the Fréchet distance of the samples to the test split on the features of a small classifier trained on the same
    data set (``scoresde.features``; cached in ``feature_cache``, default ``features.default_cache_dir()``), with
    the same distance between as many training images and the test split as its floor, and k-NN precision /
    recall (Kynkäänniemi et al. 2019, ``pr_k`` neighbours) on the same features, with their floor likewise.
    ``fid_stats`` + ``inception_weights``: FID against precomputed reference statistics (an ``.npz`` with ``mu``,
    ``sigma``) on the features of the user's TorchScript Inception-V3 (``features.InceptionFeatures``).
    ``export_png`` / ``export_npz``: also write the samples as a folder of 8-bit PNGs (``samples_png/``) and as a
    uint8 ``(N, H, W, C)`` array ``arr_0`` in ``samples.npz``, for external FID tools (image data only).
    """

    n_samples: int = 256
    batch_size: int = 256
    quality: bool = True
    nll: bool = True
    splits: List[str] = field(default_factory=lambda: ["test"])
    divergence: str = "hutchinson"
    probes: int = 1
    rtol: float = 1e-5
    atol: float = 1e-5
    eps: float = 1e-5
    elbo: bool = False
    elbo_terms: Optional[int] = None
    use_ema: bool = True
    fd: bool = True
    pr_k: int = 3
    feature_cache: Optional[str] = None
    fid_stats: Optional[str] = None
    inception_weights: Optional[str] = None
    export_png: bool = False
    export_npz: bool = False

    def check(self) -> "EvalOptions":
        """Range checks (``ValueError`` naming the field); the solver fields through ``check_likelihood_options``."""
        from ._validate import check_choice, check_int
        from .likelihood import check_likelihood_options

        check_int("n_samples", self.n_samples, 0)
        check_int("batch_size", self.batch_size)
        for s in self.splits:
            check_choice("splits[i]", s, SPLITS)
        check_likelihood_options(divergence=self.divergence, probes=self.probes, rtol=self.rtol, atol=self.atol, eps=self.eps)
        if self.elbo_terms is not None:
            check_int("elbo_terms", self.elbo_terms)
        check_int("pr_k", self.pr_k)
        if (self.fid_stats is None) != (self.inception_weights is None):
            raise ValueError("fid_stats and inception_weights go together: FID against precomputed statistics needs the "
                             f"Inception weights they were computed with; got fid_stats={self.fid_stats!r}, "
                             f"inception_weights={self.inception_weights!r}")
        for name in ("fid_stats", "inception_weights"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{name}: file {path!r} not found")
        return self


def _generator(seed: int, device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(int(seed))


@dataclass
class GuidanceOptions:
    """How the samples of a run are conditioned.

    ``class_label``: for a class-conditional model (``model.num_classes = K``) ``None`` draws balanced labels
    (sample ``i`` gets label ``i mod K``), ``0 <= c < K`` draws class ``c`` only, ``c = K`` the null label (the model's
    unconditional score). ``guidance``: the weight ``w >= 0``; with a conditional model classifier-free guidance
    ``s_w = (1 + w) s(x, t, y) - w s(x, t, null)`` (``w = 0``: the conditional model itself, one network call per NFE;
    ``w > 0``: one call on a doubled batch per NFE); with ``classifier`` (a ``scoresde-train-classifier`` run
    directory or checkpoint) classifier guidance ``s(x, t) + w grad_x log p_t(y | x)`` of an unconditional model
    (Song et al. 2021, App. I). An unconditional model without ``classifier`` takes neither option.
    """

    guidance: float = 0.0
    class_label: Optional[int] = None
    classifier: Optional[str] = None

    def check(self) -> "GuidanceOptions":
        """Range checks without the model (``ValueError`` naming the field)."""
        w = self.guidance
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ValueError(f"guidance must be a finite number >= 0 (the guidance weight w); got {w!r}")
        c = self.class_label
        if c is not None and (isinstance(c, bool) or not isinstance(c, int) or c < 0):
            raise ValueError(f"class_label must be null (balanced labels) or an integer >= 0; got {c!r}")
        if self.classifier is not None and not Path(self.classifier).exists():
            raise ValueError(f"classifier: no such file or directory: {self.classifier!r}")
        return self

    @classmethod
    def of(cls, c) -> "GuidanceOptions":
        """The conditional-sampling options of an app config ``c`` (its ``guidance``, ``class_label``, ``classifier``;
        the defaults where it has none)."""
        return cls(getattr(c, "guidance", 0.0), getattr(c, "class_label", None), getattr(c, "classifier", None))

    @property
    def active(self) -> bool:
        return self.guidance != 0 or self.class_label is not None or self.classifier is not None


def sample_labels(n: int, num_classes: int, class_label: Optional[int], device=None) -> torch.Tensor:
    """The labels ``(n,)`` long of ``n`` conditional samples: ``i mod num_classes`` (balanced) or ``class_label``."""
    if class_label is None:
        return torch.arange(n, device=device) % num_classes
    return torch.full((n,), int(class_label), dtype=torch.long, device=device)


def guided_score_maker(run, guide: GuidanceOptions, device, dtype):
    """``(make_score, num_classes)``: ``make_score(y (B,)) -> score_fn(x, t)`` of the conditioned sampler of ``run``
    under ``guide`` (see ``GuidanceOptions``), or ``(None, None)`` for plain unconditional sampling. Checks the
    options against the model (``ValueError`` naming the field) before any sampling."""
    guide.check()
    k = run.model.num_classes if run.model is not None else None
    if guide.classifier is not None:
        from .classifier import load_classifier
        from .samplers.guidance import classifier_guided_score_fn

        if k is not None:
            raise ValueError(f"classifier guidance (classifier=...) is for an unconditional model; this model is "
                             f"class-conditional (num_classes={k}): use guidance=w for classifier-free guidance")
        clf = load_classifier(guide.classifier).to(device=device, dtype=dtype).eval()
        kc = clf.num_classes
        if guide.class_label is not None and guide.class_label >= kc:
            raise ValueError(f"class_label must lie in [0, {kc - 1}] (the classifier's classes); got {guide.class_label}")
        log_prob = clf.log_prob_fn()
        return (lambda y: classifier_guided_score_fn(run.score_fn, log_prob, y, guide.guidance)), kc
    if k is None:
        if guide.active:
            raise ValueError("guidance / class_label need a class-conditional model (trained with model.num_classes=K) "
                             "or a noise-conditional classifier (classifier=<scoresde-train-classifier run>); this model "
                             "is unconditional")
        return None, None
    if guide.class_label is not None and guide.class_label > k:
        raise ValueError(f"class_label must be null (balanced), in [0, {k - 1}], or {k} (the null label); got {guide.class_label}")
    if guide.class_label == k and guide.guidance != 0:
        raise ValueError(f"class_label={k} is the null label (unconditional): guidance must be 0; got {guide.guidance}")
    # classifier-free guidance, or the null label's (unconditional) score for class_label = K
    return (lambda y: run.model.guided_score_fn(y, guide.guidance)), k


@torch.no_grad()
def class_accuracy(samples: torch.Tensor, labels: torch.Tensor, data, eval_opts: "EvalOptions", device) -> Optional[float]:
    """Fraction of finite ``samples`` that the data set's feature classifier (``scoresde.features``) assigns to their
    ``labels``; ``None`` for data without one (``FEATURE_DATASETS``) or a label outside its classes (the null label)."""
    from .features import FeatureExtractor

    if data.name not in FEATURE_DATASETS:
        return None
    ok = torch.isfinite(samples.reshape(samples.shape[0], -1)).all(dim=1)
    x, y = samples[ok].to(device=device, dtype=torch.float32), labels[ok].to(device)
    ext = FeatureExtractor.load_or_train(data.name, cache_dir=eval_opts.feature_cache, root=data.root, seed=0, device=device)
    if x.shape[0] == 0 or int(y.max()) >= ext.classifier.arch["num_classes"]:
        return None
    pred = torch.cat([ext.classifier(x[i:i + 500]).argmax(1) for i in range(0, x.shape[0], 500)])
    return float((pred == y).double().mean())


@torch.no_grad()
def draw_samples(score_fn, sde, shape, sampler: dict, n: int, batch_size: int, seed: int, device, dtype, progress: bool = False,
                 labels: Optional[torch.Tensor] = None):
    """``n`` samples of per-sample ``shape`` with the configured sampler, in batches.

    ``sampler``: ``{"method": ..., **options of scoresde.sample}``. With ``labels`` ``(n,)`` (conditional sampling)
    ``score_fn`` is a maker, ``score_fn(y) -> score_fn(x, t)``, called with each batch's labels.
    Returns ``(x (n, *shape), nfe per batch (list of int), seconds)``. Batch ``j`` uses the generator
    seeded ``stream(seed, 1, j)``.
    """
    from .runs import stream_seed
    from .samplers import sample

    kwargs = dict(sampler)
    method = kwargs.pop("method")
    xs, nfes = [], []
    t0 = time.perf_counter()
    for j, start in enumerate(range(0, n, batch_size)):
        b = min(batch_size, n - start)
        g = _generator(stream_seed(seed, 1, j), device)
        fn = score_fn if labels is None else score_fn(labels[start:start + b].to(device))
        res = sample(fn, sde, (b, *shape), method=method, generator=g, progress=progress,
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


def image_quality(samples: torch.Tensor, test, data, eval_opts: EvalOptions, seed: int, device) -> dict:
    """Sample quality of images on a cached classifier's features (``scoresde.features``), each with its floor.

    ``fd``: Fréchet distance of the finite samples to the test split; ``precision`` / ``recall``: k-NN precision
    and recall (``metrics.precision_recall``, ``eval_opts.pr_k``) of the samples against the test split. The floors
    ``fd_floor``, ``precision_floor``, ``recall_floor``: the same statistics of ``n_floor`` training images (as many
    as samples, or the whole split if smaller) against the test split: what a model that draws the data scores.
    With ``eval_opts.fid_stats``: ``fid``, the Fréchet distance of Inception features to the precomputed statistics.
    """
    from .features import FeatureExtractor, InceptionFeatures, frechet_distance_to_stats, image_features
    from .metrics import frechet_distance, precision_recall
    from .runs import load_split

    x = samples[torch.isfinite(samples.reshape(samples.shape[0], -1)).all(dim=1)].to(device=device, dtype=torch.float32)
    out: dict = {}
    if eval_opts.fid_stats is not None and x.shape[0] >= 2:
        inception = InceptionFeatures(eval_opts.inception_weights, centered=data.centered, device=device)
        out["fid"] = frechet_distance_to_stats(x, eval_opts.fid_stats, inception)
    if data.name not in FEATURE_DATASETS:  # the user's own images: no classifier to take features from
        return out
    ext = FeatureExtractor.load_or_train(data.name, cache_dir=eval_opts.feature_cache, root=data.root, seed=0, device=device)
    out["fd_classifier_test_accuracy"] = ext.test_accuracy
    if x.shape[0] < 2:
        return out
    train = load_split(data, "train", seed=seed)
    f_x, f_test = image_features(x, ext), image_features(test.x.to(device), ext)
    f_train = image_features(train.x[: x.shape[0]].to(device), ext)
    out["fd"] = frechet_distance(f_x, f_test)
    out["fd_floor"] = frechet_distance(f_train, f_test)
    out["n_floor"] = int(f_train.shape[0])
    k = eval_opts.pr_k
    if min(f_x.shape[0], f_test.shape[0], f_train.shape[0]) > k:
        pr, pr0 = precision_recall(f_test, f_x, k), precision_recall(f_test, f_train, k)
        out.update(precision=pr["precision"], recall=pr["recall"], precision_floor=pr0["precision"],
                   recall_floor=pr0["recall"], pr_k=k)
    return out


def image_fd(samples: torch.Tensor, test, data, eval_opts: EvalOptions, seed: int, device) -> dict:
    """The Fréchet distance part of ``image_quality`` (``fd``, ``fd_floor``) and the classifier's accuracy."""
    q = image_quality(samples, test, data, eval_opts, seed, device)
    return {k: q[k] for k in ("fd_classifier_test_accuracy", "fd", "fd_floor") if k in q}


def nll_on_split(run, ds, eval_opts: EvalOptions, seed: int, device, dtype, progress: bool = False) -> dict:
    """Negative log-likelihood of one split through the probability-flow ODE.

    Discrete data: dequantised bits/dim of the integer data (``evaluate_bpd``; mean and standard error
    over examples). Continuous data: ``nll_nats`` (nats per dimension) and ``bpd`` = nats / ln 2 per
    dimension (not comparable to discrete bits/dim); with the oracle, also the exact ``nll_nats_true``.
    """
    from .likelihood import evaluate_bpd, log_likelihood
    from .runs import stream_seed

    kw = dict(divergence=eval_opts.divergence, probes=eval_opts.probes, rtol=eval_opts.rtol, atol=eval_opts.atol, eps=eval_opts.eps)
    g = _generator(stream_seed(seed, 2), device)
    t0 = time.perf_counter()
    if ds.is_discrete:
        res = evaluate_bpd(run.score_fn, run.sde, ds.x.to(device), levels=ds.levels, centered=run.data.centered,
                           batch_size=eval_opts.batch_size, generator=g, dtype=dtype, device=device, progress=progress, **kw)
        return {"bpd": float(res.mean), "bpd_stderr": float(res.stderr), "n": int(res.bpd.numel()), "nfe": int(res.nfe),
                "bpd_median": float(res.bpd.median()), "bpd_max": float(res.bpd.max()), "seconds": time.perf_counter() - t0}
    x_all = ds.x.to(device=device, dtype=dtype)
    D = x_all[0].numel()
    vals, nfe = [], 0
    for start in range(0, x_all.shape[0], eval_opts.batch_size):
        x = x_all[start: start + eval_opts.batch_size]
        res = log_likelihood(run.score_fn, run.sde, x, generator=g, progress=progress, **kw)
        vals.append((-res.logp / D).detach().double().cpu())
        nfe += int(res.nfe)
    v = torch.cat(vals)
    out = {"nll_nats": float(v.mean()), "nll_nats_stderr": float(v.std(unbiased=True) / math.sqrt(v.numel())) if v.numel() > 1 else 0.0,
           "bpd": float(v.mean() / math.log(2)), "bpd_stderr": float(v.std(unbiased=True) / math.sqrt(v.numel()) / math.log(2)) if v.numel() > 1 else 0.0,
           "n": int(v.numel()), "nfe": nfe, "seconds": time.perf_counter() - t0}
    if run.oracle is not None:
        out["nll_nats_true"] = float((-run.oracle.log_prob(x_all.double().cpu()) / D).mean())
    return out


def elbo_on_split(run, ds, eval_opts: EvalOptions, seed: int, device, dtype, progress: bool = False) -> Optional[dict]:
    """The discrete DDPM negative ELBO in bits/dim (VP models on discrete data only; else ``None``)."""
    from .likelihood import evaluate_elbo
    from .runs import stream_seed
    from .sde import VPSDE

    if not (ds.is_discrete and isinstance(run.sde, VPSDE)):
        return None
    eps_fn = run.model.ddpm_eps_fn() if run.model is not None else run.oracle.ddpm_eps_fn(run.sde)
    g = _generator(stream_seed(seed, 3), device)
    t0 = time.perf_counter()
    res = evaluate_elbo(eps_fn, run.sde, ds.x.to(device), levels=ds.levels, centered=run.data.centered,
                        batch_size=eval_opts.batch_size, terms=eval_opts.elbo_terms, generator=g, dtype=dtype, device=device,
                        progress=progress)
    return {"bpd": float(res.mean), "bpd_stderr": float(res.stderr), "n": int(res.bpd.numel()), "nfe": int(res.nfe),
            "seconds": time.perf_counter() - t0}


def evaluate_run(run, sampler: Optional[dict], eval_opts: EvalOptions, outdir: Path, seed: int, device, dtype,
                 progress: bool = False, label: str = "", do_samples: bool = True, do_nll: Optional[bool] = None,
                 guidance: Optional[GuidanceOptions] = None) -> dict:
    """Samples (figure, NFE, quality vs the test split) and likelihoods (ODE NLL per split, DDPM ELBO).

    A class-conditional model (or ``guidance.classifier``) draws its samples with the labels of ``guidance``
    (``GuidanceOptions``; default: balanced labels, ``w = 0``); the samples' labels are saved beside them
    (``labels.pt``) and, for data with a feature classifier, ``class_accuracy`` says how many of the samples it
    assigns to their label. Likelihoods use the model's unconditional score (the null label of a conditional model)."""
    from .runs import SAMPLES_NAME, load_split, reference_samples, stream_seed

    out: dict = {}
    data = run.data
    exporting = eval_opts.export_png or eval_opts.export_npz
    if do_samples and exporting and len(run.shape) != 3:
        raise ValueError(f"eval.export_png / eval.export_npz write images; this run's data have shape {tuple(run.shape)}")
    guide = guidance if guidance is not None else GuidanceOptions()
    make_score, n_classes = guided_score_maker(run, guide, device, dtype) if do_samples else (None, None)
    test = load_split(data, "test", seed=run.seed)
    if do_samples and eval_opts.n_samples > 0:
        labels = None if make_score is None else sample_labels(eval_opts.n_samples, n_classes, guide.class_label)
        x, nfes, secs = draw_samples(run.score_fn if make_score is None else make_score, run.sde, run.shape, sampler,
                                     eval_opts.n_samples, eval_opts.batch_size, seed, device, dtype, progress, labels=labels)
        s = {"method": sampler["method"], "steps": sampler.get("steps"), "nfe": nfes[0] if len(set(nfes)) == 1 else nfes,
             "nfe_mean": sum(nfes) / len(nfes), "seconds": secs}
        if labels is not None:
            s.update(guidance=guide.guidance, class_label=guide.class_label, classifier=guide.classifier,
                     network_rows_per_nfe=2 if (guide.guidance != 0 and guide.classifier is None) else 1)
            torch.save(labels.cpu(), outdir / (f"labels_{label}.pt" if label else "labels.pt"))
            acc = class_accuracy(x, labels, data, eval_opts, device)
            if acc is not None:
                s["class_accuracy"] = acc
        ref = reference_samples(test, data, seed=stream_seed(seed, 4), dtype=torch.float64, device="cpu")
        if eval_opts.quality:
            s.update(sample_quality(x, ref, seed=stream_seed(seed, 5)))
        if eval_opts.fd and x.dim() == 4 and (data.name in FEATURE_DATASETS or eval_opts.fid_stats is not None):
            s.update(image_quality(x, test, data, eval_opts, seed=run.seed, device=device))
        fig = outdir / (f"samples_{label}.png" if label else SAMPLES_NAME)
        save_sample_figure(x, fig, data.centered, reference=ref if x.dim() == 2 else None,
                           title=f"{label or sampler['method']}: NFE {s['nfe_mean']:.0f}")
        s["figure"] = fig.name
        torch.save(x.cpu(), outdir / (f"samples_{label}.pt" if label else "samples.pt"))
        if eval_opts.export_png:
            s["png_dir"] = save_png_folder(x, outdir / (f"samples_{label}_png" if label else "samples_png"), data.centered).name
        if eval_opts.export_npz:
            s["npz"] = save_uint8_npz(x, outdir / (f"samples_{label}.npz" if label else "samples.npz"), data.centered).name
        out["samples"] = s
    if do_nll if do_nll is not None else eval_opts.nll:
        out["nll"] = {}
        for split in eval_opts.splits:
            ds = test if split == "test" else load_split(data, split, seed=run.seed)
            out["nll"][split] = nll_on_split(run, ds, eval_opts, seed, device, dtype, progress)
    if eval_opts.elbo:
        el = {}
        for split in eval_opts.splits:
            ds = test if split == "test" else load_split(data, split, seed=run.seed)
            r = elbo_on_split(run, ds, eval_opts, seed, device, dtype, progress)
            if r is not None:
                el[split] = r
        if el:
            out["elbo"] = el
    return out


def print_summary(metrics: dict, prefix: str = "") -> None:
    s = metrics.get("samples")
    if s:
        q = f", MMD^2 {s['mmd2']:.4g} (floor {s['mmd2_floor']:.2g})" if "mmd2" in s else ""
        if "fd" in s:
            q += f", FD {s['fd']:.2f} (floor {s['fd_floor']:.2f} at N={s['n_floor']})"
        if "precision" in s:
            q += (f", precision {s['precision']:.3f} / recall {s['recall']:.3f}"
                  f" (floor {s['precision_floor']:.3f} / {s['recall_floor']:.3f})")
        if "fid" in s:
            q += f", FID {s['fid']:.2f}"
        log.info(f"{prefix}samples: {s['method']} NFE {s['nfe_mean']:.0f}{q}")
    for split, r in (metrics.get("nll") or {}).items():
        log.info(f"{prefix}{split} bits/dim (PF-ODE): {r['bpd']:.4f} +- {r['bpd_stderr']:.4f} (n={r['n']})")
    for split, r in (metrics.get("elbo") or {}).items():
        log.info(f"{prefix}{split} bits/dim (DDPM ELBO): {r['bpd']:.4f} +- {r['bpd_stderr']:.4f} (n={r['n']})")


