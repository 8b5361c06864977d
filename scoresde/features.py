"""Image features for sample quality without network access, and the Fréchet distance on them.

A small convolutional classifier is trained on the same data set as the generative model (the
embedded digits by default; MNIST and CIFAR-10 shapes work too) and cached to a checkpoint file.
Its penultimate layer gives the features; ``frechet_distance_images`` fits Gaussians to the
features of two image sets and returns the Fréchet distance (FID's formula, on these features:
``|mu_x - mu_y|^2 + tr(S_x + S_y - 2 (S_x S_y)^{1/2})``, via ``scoresde.metrics.frechet_distance``).
Numbers are comparable only between runs using the same classifier file.

Images enter on the model's scale: ``y = a u + b`` with ``u in [0, 1)`` (``(a, b) = (2, -1)`` when
``centered``, the default, else ``(1, 0)``), float ``(B, C, H, W)``. The classifier is trained on
uniformly dequantised training images, ``u = (k + U) / L``, so it accepts continuous samples.

Inception FID (optional): ``InceptionFeatures(path)`` wraps a TorchScript Inception-V3 file that the
user already has, with the interface of NVlabs' ``inception-2015-12-05.pt`` (StyleGAN2-ADA metrics):
``net(images, return_features=True) -> (B, 2048)``, images ``(B, 3, H, W)`` uint8 values in
``[0, 255]``, resized inside the network. Nothing is downloaded.

Precomputed reference statistics: ``save_reference_stats(path, images, extractor)`` writes the feature mean and
covariance as ``mu`` and ``sigma`` in an ``.npz`` (the layout of the FID statistics files published with TTUR /
pytorch-fid, e.g. CIFAR-10 train statistics of Inception pool features), and ``frechet_distance_to_stats(samples,
path, extractor)`` scores samples against such a file without the reference images.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .checkpoint import check_state_dict, load_checkpoint, save_checkpoint
from .data import DataSet, from_model_scale, load_dataset, uniform_dequantize

__all__ = [
    "ConvClassifier",
    "FeatureExtractor",
    "InceptionFeatures",
    "train_feature_classifier",
    "default_cache_dir",
    "frechet_distance_images",
    "frechet_distance_to_stats",
    "image_features",
    "load_reference_stats",
    "save_reference_stats",
]

CHECKPOINT_FORMAT = "scoresde-feature-classifier"
CHECKPOINT_VERSION = 1


def default_cache_dir() -> Path:
    """``$SCORESDE_CACHE/features`` if ``SCORESDE_CACHE`` is set, else ``~/.cache/scoresde/features``."""
    return Path(os.environ.get("SCORESDE_CACHE", "~/.cache/scoresde")).expanduser() / "features"


class ConvClassifier(nn.Module):
    """Small CNN: two 3x3 convs, 2x2 average pool, a 3x3 conv, adaptive pool to 4x4, a linear layer
    to ``feature_dim`` features (the penultimate layer), and a linear head to ``num_classes`` logits.

    Input ``(B, in_channels, H, W)`` with ``H, W >= 2``; ``features`` returns ``(B, feature_dim)``,
    ``forward`` returns logits ``(B, num_classes)``.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32, feature_dim: int = 128):
        super().__init__()
        for name, v in (("in_channels", in_channels), ("num_classes", num_classes), ("width", width), ("feature_dim", feature_dim)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1; got {v!r}")
        self.arch = dict(in_channels=in_channels, num_classes=num_classes, width=width, feature_dim=feature_dim)
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.GELU(),
            nn.AvgPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.GELU(),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Linear(2 * width * 16, feature_dim),
            nn.GELU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, y: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features ``(B, feature_dim)`` of model-scale images ``(B, C, H, W)``."""
        return self.body(y)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        """Class logits ``(B, num_classes)``."""
        return self.head(self.body(y))


class FeatureExtractor(nn.Module):
    """Maps model-scale images ``(B, *shape)`` to the classifier's penultimate features ``(B, F)``.

    Attributes: ``classifier``, ``dataset_name``, ``levels``, ``centered``, ``shape`` (per-sample
    ``(C, H, W)``), ``test_accuracy``, ``val_accuracy``, ``train_args``.
    """

    def __init__(self, classifier: ConvClassifier, dataset_name: str, levels: int, centered: bool, shape, test_accuracy: float,
                 val_accuracy: float = float("nan"), train_args: dict | None = None):
        super().__init__()
        self.classifier = classifier
        self.dataset_name = dataset_name
        self.levels = int(levels)
        self.centered = bool(centered)
        self.shape = tuple(int(s) for s in shape)
        self.test_accuracy = float(test_accuracy)
        self.val_accuracy = float(val_accuracy)
        self.train_args = dict(train_args or {})

    @property
    def feature_dim(self) -> int:
        return self.classifier.arch["feature_dim"]

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        """Features ``(B, feature_dim)`` of model-scale images ``y`` of shape ``(B, *self.shape)``."""
        if tuple(y.shape[1:]) != self.shape:
            raise ValueError(f"images must have shape (B, {', '.join(map(str, self.shape))}) for the {self.dataset_name!r} feature classifier; got {tuple(y.shape)}")
        return self.classifier.features(y)

    def state(self) -> dict:
        """The checkpoint dict: architecture args, weights, data name, scale, accuracies, training args."""
        return {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "arch": dict(self.classifier.arch),
            "state_dict": {k: v.detach().cpu() for k, v in self.classifier.state_dict().items()},
            "dataset": self.dataset_name,
            "levels": self.levels,
            "centered": self.centered,
            "shape": list(self.shape),
            "test_accuracy": self.test_accuracy,
            "val_accuracy": self.val_accuracy,
            "train_args": self.train_args,
        }

    def save(self, path) -> Path:
        """Write the checkpoint atomically (``scoresde.checkpoint.save_checkpoint``)."""
        return save_checkpoint(path, self.state())

    @classmethod
    def load(cls, path, map_location=None) -> "FeatureExtractor":
        """Read a checkpoint written by ``save``; ``ValueError`` naming the file if it is corrupt or foreign."""
        keys = ("format", "arch", "state_dict", "dataset", "levels", "centered", "shape", "test_accuracy")
        st = load_checkpoint(path, map_location=map_location or "cpu", required_keys=keys)
        if st["format"] != CHECKPOINT_FORMAT:
            raise ValueError(f"checkpoint file {str(path)!r} is not a feature-classifier checkpoint (format {st['format']!r})")
        clf = ConvClassifier(**st["arch"])
        check_state_dict(clf, st["state_dict"], source=f"checkpoint file {str(path)!r}")
        clf.load_state_dict(st["state_dict"])
        ext = cls(clf, st["dataset"], st["levels"], st["centered"], st["shape"], st["test_accuracy"], st.get("val_accuracy", float("nan")), st.get("train_args"))
        return ext.eval()

    @classmethod
    def cache_path(cls, dataset_name: str, cache_dir=None, seed: int = 0) -> Path:
        """``cache_dir / f"feature_classifier_{dataset_name}_seed{seed}.pt"`` (default ``default_cache_dir()``)."""
        return Path(cache_dir if cache_dir is not None else default_cache_dir()) / f"feature_classifier_{dataset_name}_seed{seed}.pt"

    @classmethod
    def load_or_train(cls, dataset_name: str = "digits", cache_dir=None, root=None, seed: int = 0, retrain: bool = False,
                      device=None, progress: bool = False, **train_kwargs) -> "FeatureExtractor":
        """The cached classifier for ``dataset_name`` (``cache_path``), trained and saved first if missing or ``retrain``.

        ``train_kwargs`` go to ``train_feature_classifier`` (used only when training). Returns the
        extractor in eval mode on ``device`` (default CPU).
        """
        _check_image_name(dataset_name)
        path = cls.cache_path(dataset_name, cache_dir, seed)
        if path.is_file() and not retrain:
            ext = cls.load(path)
            if ext.dataset_name != dataset_name:
                raise ValueError(f"cached classifier {str(path)!r} was trained on {ext.dataset_name!r}, not {dataset_name!r}; pass retrain=True")
        else:
            ext = train_feature_classifier(dataset_name, root=root, seed=seed, device=device, progress=progress, **train_kwargs)
            ext.save(path)
        return ext.to(device if device is not None else "cpu").eval()


def _check_image_name(name: str) -> None:
    if name not in ("digits", "mnist", "cifar10"):
        raise ValueError(f"dataset_name must be one of ['digits', 'mnist', 'cifar10']; got {name!r}")


@torch.no_grad()
def _accuracy(clf: nn.Module, data: DataSet, centered: bool, device, batch_size: int = 1000) -> float:
    clf.eval()
    correct = 0
    for i in range(0, len(data), batch_size):
        y = uniform_dequantize(data.x[i : i + batch_size].to(device), data.levels, centered=centered, noise=False)
        correct += int((clf(y).argmax(1) == data.labels[i : i + batch_size].to(device)).sum())
    return correct / len(data)


def train_feature_classifier(
    dataset_name: str = "digits",
    root=None,
    seed: int = 0,
    epochs: int = 20,
    batch_size: int = 64,
    lr: float = 2e-3,
    weight_decay: float = 1e-4,
    width: int = 32,
    feature_dim: int = 128,
    centered: bool = True,
    n_train: int | None = None,
    device=None,
    progress: bool = False,
) -> FeatureExtractor:
    """Train ``ConvClassifier`` on the "train" split of an image data set; report val/test accuracy.

    Minimises cross-entropy with AdamW (``lr``, ``weight_decay``) and a cosine learning-rate decay
    over ``epochs`` passes of mini-batches of ``batch_size``. Each batch is uniformly dequantised
    afresh, ``y = a (k + U) / L + b``. Reproducible: the initial weights come from
    ``torch.manual_seed(seed)`` inside a forked RNG state, the shuffling and the dequantisation noise
    from ``torch.Generator().manual_seed(seed)`` (CPU), so the same seed gives the same classifier on
    the same device. Accuracies use the bin centres ``U = 1/2``.
    """
    _check_image_name(dataset_name)
    for name, v in (("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1; got {v!r}")
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"lr must be a number > 0; got {lr!r}")
    device = torch.device(device if device is not None else "cpu")
    train = load_dataset(dataset_name, "train", root=root, n=n_train)
    val = load_dataset(dataset_name, "val", root=root)
    test = load_dataset(dataset_name, "test", root=root)
    num_classes = int(train.labels.max()) + 1

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clf = ConvClassifier(train.shape[0], num_classes, width, feature_dim)
    clf = clf.to(device)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(clf.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(train) / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    for _ in tqdm(range(epochs), desc=f"feature classifier ({dataset_name})", disable=not progress):
        clf.train()
        perm = torch.randperm(len(train), generator=g)
        for i in range(0, len(train), batch_size):
            idx = perm[i : i + batch_size]
            y = uniform_dequantize(train.x[idx], train.levels, centered=centered, generator=g, dtype=torch.float32).to(device)
            loss = F.cross_entropy(clf(y), train.labels[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    args = dict(seed=seed, epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, n_train=n_train)
    ext = FeatureExtractor(clf, dataset_name, train.levels, centered, train.shape, _accuracy(clf, test, centered, device),
                           _accuracy(clf, val, centered, device), args)
    return ext.eval()


def _as_model_scale(name: str, images, levels: int, centered: bool) -> torch.Tensor:
    if isinstance(images, DataSet):
        images = images.x
    if not torch.is_tensor(images):
        raise TypeError(f"{name} must be a tensor (B, C, H, W) or a DataSet; got {type(images).__name__}")
    if images.dtype.is_floating_point:
        return images
    return uniform_dequantize(images, levels, centered=centered, noise=False, dtype=torch.float32)


@torch.no_grad()
def image_features(images, extractor: nn.Module, batch_size: int = 500) -> torch.Tensor:
    """Features ``(N, F)`` of images ``(N, *shape)`` computed batch by batch on the extractor's device.

    ``images``: float model-scale tensor, or integer levels / a discrete ``DataSet`` (mapped to the
    bin centres ``y = a (k + 1/2) / L + b``, with the extractor's ``levels`` and ``centered``).
    """
    levels, centered = getattr(extractor, "levels", None), getattr(extractor, "centered", True)
    y = _as_model_scale("images", images, levels, centered)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1; got {batch_size!r}")
    p = next(extractor.parameters(), None)
    device, dtype = (p.device, p.dtype) if p is not None else (y.device, torch.float32)
    was_training = extractor.training
    extractor.eval()
    try:
        out = [extractor(y[i : i + batch_size].to(device=device, dtype=dtype)) for i in range(0, len(y), batch_size)]
    finally:
        extractor.train(was_training)
    return torch.cat(out)


def frechet_distance_images(samples, reference, extractor: nn.Module, batch_size: int = 500) -> float:
    """Fréchet distance between the feature Gaussians of two image sets (FID's formula on ``extractor``'s features).

    ``samples`` ``(N, *shape)`` and ``reference`` ``(M, *shape)``: model-scale float tensors, integer
    levels, or ``DataSet``s (see ``image_features``); ``N, M >= 2``. Returns a float >= 0.
    """
    from .metrics import frechet_distance

    shape = getattr(extractor, "shape", None)
    for name, imgs in (("samples", samples), ("reference", reference)):
        x = imgs.x if isinstance(imgs, DataSet) else imgs
        if not torch.is_tensor(x):
            raise TypeError(f"{name} must be a tensor (B, C, H, W) or a DataSet; got {type(imgs).__name__}")
        if shape is not None and tuple(x.shape[1:]) != tuple(shape):
            raise ValueError(f"{name} must have shape (B, {', '.join(map(str, shape))}); got {tuple(x.shape)}")
        if x.shape[0] < 2:
            raise ValueError(f"{name} needs at least 2 images; got {x.shape[0]}")
    return frechet_distance(image_features(samples, extractor, batch_size), image_features(reference, extractor, batch_size))


class InceptionFeatures(nn.Module):
    """Inception-V3 pool features (2048) from a TorchScript file the user supplies (never downloaded).

    The file must follow NVlabs' ``inception-2015-12-05.pt`` interface:
    ``net(images, return_features=True) -> (B, 2048)`` with ``images`` ``(B, 3, H, W)`` holding
    uint8 values ``0..255`` (the network resizes to 299x299 itself). ``forward`` takes model-scale
    images ``y`` ``(B, C, H, W)``, ``C`` 1 or 3, maps them to 8-bit pixels
    ``clamp(floor(256 u), 0, 255)`` with ``u = (y - b) / a`` and repeats grey images to 3 channels.
    With this extractor ``frechet_distance_images`` is the usual FID.
    """

    def __init__(self, weights_path, centered: bool = True, device=None):
        super().__init__()
        path = Path(weights_path)
        if not path.is_file():
            raise FileNotFoundError(
                f"Inception weights {str(path)!r} not found; pass the path of a TorchScript Inception-V3 you have "
                "(NVlabs' inception-2015-12-05.pt interface); scoresde does not download it"
            )
        self.net = torch.jit.load(str(path), map_location=device or "cpu").eval()
        self.centered = bool(centered)
        self.levels = 256
        self.shape = None  # any image size

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        """Features ``(B, 2048)`` of model-scale images ``(B, C, H, W)``."""
        if y.dim() != 4 or y.shape[1] not in (1, 3):
            raise ValueError(f"images must have shape (B, 1 or 3, H, W); got {tuple(y.shape)}")
        u = from_model_scale(y.float(), self.centered)
        pix = torch.clamp(torch.floor(256 * u), 0, 255).to(torch.uint8)
        if pix.shape[1] == 1:
            pix = pix.expand(-1, 3, -1, -1)
        return self.net(pix, return_features=True)


def save_reference_stats(path, images, extractor: nn.Module, batch_size: int = 500) -> Path:
    """Write ``mu (F,)`` and ``sigma (F, F)`` (float64) of ``extractor``'s features of ``images`` to ``path`` (``.npz``).

    ``images``: as ``image_features`` (model-scale floats, integer levels or a ``DataSet``), at least 2.
    Returns the path written (NumPy appends ``.npz`` when missing).
    """
    import numpy as np

    from .metrics import gaussian_stats

    mu, sigma = gaussian_stats(image_features(images, extractor, batch_size))
    path = Path(path)
    if path.suffix != ".npz":
        path = path.with_name(path.name + ".npz")
    np.savez(path, mu=mu, sigma=sigma)
    return path


def load_reference_stats(path) -> tuple:
    """``(mu (F,), sigma (F, F))`` from an ``.npz`` holding arrays ``mu`` and ``sigma`` (FID statistics files).

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming the file for missing keys or
    inconsistent shapes.
    """
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference statistics {str(path)!r} not found (an .npz with arrays 'mu' and 'sigma')")
    import zipfile

    if not zipfile.is_zipfile(path):
        raise ValueError(f"reference statistics {str(path)!r} are not a readable .npz (not a zip archive)")
    try:
        with np.load(path) as f:
            missing = [k for k in ("mu", "sigma") if k not in f.files]
            if missing:
                raise ValueError(f"reference statistics {str(path)!r} lack {missing}: it holds {sorted(f.files)}; "
                                 "expected arrays 'mu' (F,) and 'sigma' (F, F)")
            mu, sigma = np.asarray(f["mu"], dtype=np.float64), np.asarray(f["sigma"], dtype=np.float64)
    except (OSError, EOFError, zipfile.BadZipFile) as e:  # truncated
        raise ValueError(f"reference statistics {str(path)!r} are not a readable .npz: {e}") from None
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"reference statistics {str(path)!r}: 'mu' must be (F,) and 'sigma' (F, F); "
                         f"got {mu.shape} and {sigma.shape}")
    return mu, sigma


def frechet_distance_to_stats(samples, stats, extractor: nn.Module, batch_size: int = 500) -> float:
    """Fréchet distance of ``samples``' feature Gaussian to precomputed reference statistics.

    ``stats``: a path to an ``.npz`` with ``mu``, ``sigma`` (``load_reference_stats``) or a ``(mu, sigma)`` pair;
    its feature dimension must be the extractor's. With ``InceptionFeatures`` and the published statistics of a
    data set this is the usual FID. ``samples``: as ``image_features``, at least 2. Returns a float >= 0.
    """
    from .metrics import gaussian_frechet_distance, gaussian_stats

    where = f"reference statistics {str(stats)!r}" if isinstance(stats, (str, os.PathLike)) else "reference statistics"
    mu_r, sigma_r = load_reference_stats(stats) if isinstance(stats, (str, os.PathLike)) else stats
    feats = image_features(samples, extractor, batch_size)
    if feats.shape[0] < 2:
        raise ValueError(f"frechet_distance_to_stats needs at least 2 samples; got {feats.shape[0]}")
    if feats.shape[1] != len(mu_r):
        raise ValueError(f"{where} have {len(mu_r)} features but the extractor gives {feats.shape[1]}: "
                         "they were computed with another feature network")
    mu, sigma = gaussian_stats(feats)
    return gaussian_frechet_distance(mu, sigma, mu_r, sigma_r)
