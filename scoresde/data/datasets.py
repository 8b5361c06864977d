"""``DataSet`` and ``load_dataset``: one entry point for every data set of the toolkit.

Names and what they give (``DataSet.x``):

| name | x | levels |
| --- | --- | --- |
| "swissroll", "moons", "eight_gaussians", "checkerboard" | float ``(N, 2)``, standardised (see ``toy``) | None |
| "gmm" | float ``(N, 2)`` samples of ``default_gmm(2)``; labels: their component ``0..4`` | None |
| "digits" | uint8 ``(N, 1, 8, 8)`` in ``[0, 16]`` (scikit-learn, fixed split, see ``digits``) | 17 |
| "mnist" | uint8 ``(N, 1, 28, 28)`` | 256 |
| "cifar10" | uint8 ``(N, 3, 32, 32)`` | 256 |
| "tensor_file" | the user's ``.npy`` / ``.npz`` / ``.pt`` array (``path=...``, see ``tensor_file``) | as declared |

Splits: "train", "val", "test" and "trainval" (train followed by val). Continuous toy sets are
generated from ``torch.Generator().manual_seed(4 * seed + k)`` with ``k = 0, 1, 2`` for
train, val, test, so splits never share a stream; default sizes ``TOY_SPLIT_SIZES``. For the image
sets ``seed`` is unused: their splits are fixed (see ``digits`` and ``archives``); a tensor file's splits are its
own arrays or carved with its own ``split_seed`` (see ``tensor_file``).
``n`` keeps the first ``n`` examples of the split (for toy sets: generates exactly ``n``).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch

from . import archives
from .digits import DIGITS_LEVELS, load_digits_split
from .tensor_file import load_tensor_file
from .toy import TOY_GENERATORS, default_gmm
from .transforms import uniform_dequantize
from .._validate import check_choice

__all__ = ["DataSet", "load_dataset", "DATASET_NAMES", "SPLITS", "TOY_SPLIT_SIZES", "TENSOR_FILE_OPTIONS", "NUM_CLASSES"]

CONTINUOUS_NAMES = ("swissroll", "moons", "eight_gaussians", "checkerboard", "gmm")
IMAGE_NAMES = ("digits", "mnist", "cifar10")
FILE_NAMES = ("tensor_file",)
DATASET_NAMES = CONTINUOUS_NAMES + IMAGE_NAMES + FILE_NAMES
# options of load_dataset("tensor_file", ...) beyond path / split / n: load_tensor_file's signature is their schema
TENSOR_FILE_OPTIONS = tuple(p for p in inspect.signature(load_tensor_file).parameters if p not in ("path", "split", "n"))
SPLITS = ("train", "val", "test", "trainval")
TOY_SPLIT_SIZES = {"train": 20000, "val": 2000, "test": 5000}
_SPLIT_STREAM = {"train": 0, "val": 1, "test": 2}
# the labelled data sets and their number of classes (gmm: the component of ``default_gmm(2)`` a sample came from)
NUM_CLASSES = {"gmm": 5, "digits": 10, "mnist": 10, "cifar10": 10}


@dataclass
class DataSet:
    """A data set held in memory.

    Attributes:
        x: continuous data: float ``(N, D)``; discrete images: integer (uint8) ``(N, C, H, W)``
            with values in ``[0, levels - 1]``.
        levels: number of discrete values per dimension ``L`` (None for continuous data).
        name: the data set's name as passed to ``load_dataset``.
        labels: optional class labels ``(N,)`` long.
        split: which split this is.
    """

    x: torch.Tensor
    levels: int | None
    name: str
    labels: torch.Tensor | None = None
    split: str = "train"

    def __post_init__(self):
        if not torch.is_tensor(self.x) or self.x.dim() < 2:
            raise ValueError(f"x must be a tensor of shape (N, *shape); got {type(self.x).__name__} {getattr(self.x, 'shape', None)}")
        if self.levels is not None:
            if isinstance(self.levels, bool) or not isinstance(self.levels, int) or self.levels < 2:
                raise ValueError(f"levels must be None or an integer >= 2; got {self.levels!r}")
            if self.x.dtype.is_floating_point or self.x.dtype.is_complex:
                raise TypeError(f"discrete data (levels={self.levels}) must have an integer dtype; got {self.x.dtype}")
        elif not self.x.dtype.is_floating_point:
            raise TypeError(f"continuous data (levels=None) must have a floating dtype; got {self.x.dtype}")
        if self.labels is not None and self.labels.shape != (self.x.shape[0],):
            raise ValueError(f"labels must have shape (N,) = ({self.x.shape[0]},); got {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return self.x.shape[0]

    @property
    def shape(self) -> tuple[int, ...]:
        """Per-sample shape, e.g. ``(2,)`` or ``(C, H, W)``."""
        return tuple(self.x.shape[1:])

    @property
    def dim(self) -> int:
        """Dimension ``D = prod(shape)``."""
        return math.prod(self.shape)

    @property
    def is_discrete(self) -> bool:
        """True for integer-valued data with ``levels`` values per dimension."""
        return self.levels is not None

    def model_scale(
        self,
        centered: bool = True,
        dequantize: bool = True,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """The data on the model's continuous scale, shape ``(N, *shape)``.

        Discrete: ``y = a (k + U) / L + b`` (``transforms.uniform_dequantize``; ``U = 1/2`` if not
        ``dequantize``), ``(a, b) = (2, -1)`` if ``centered`` else ``(1, 0)``. Continuous: ``x``
        unchanged (cast to ``dtype`` if given).
        """
        if not self.is_discrete:
            return self.x if dtype is None else self.x.to(dtype)
        return uniform_dequantize(self.x, self.levels, centered=centered, generator=generator, dtype=dtype, noise=dequantize)


def _toy_split(name: str, split: str, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(x, labels)`` of a toy split; labels (the mixture component) for "gmm" only, else ``None``."""
    g = torch.Generator().manual_seed(4 * seed + _SPLIT_STREAM[split])
    if name == "gmm":
        return default_gmm(2).sample(n, generator=g, dtype=torch.get_default_dtype(), return_labels=True)
    return TOY_GENERATORS[name](n, generator=g), None


def load_dataset(
    name: str,
    split: str = "train",
    root=None,
    download: bool = False,
    n: int | None = None,
    seed: int = 0,
    val_size: int | None = None,
    path=None,
    **tensor_file_options,
) -> DataSet:
    """Load a data set split (see the module table) as a ``DataSet``.

    Args:
        name: one of ``DATASET_NAMES``.
        split: "train", "val", "test" or "trainval".
        root: folder with the CIFAR-10 / MNIST archives (default ``archives.default_root()``:
            ``$SCORESDE_DATA`` or ``~/.cache/scoresde/data``); unused for the other sets.
        download: fetch a missing CIFAR-10 / MNIST archive from its official URL (MD5-checked).
        n: number of examples (toy: generated; images: first ``n`` of the split); None = all/default.
        seed: seed of the toy sets' generators (unused for images, whose splits are fixed).
        val_size: CIFAR-10 / MNIST only: images carved off the end of the official training set
            for "val" (default 5000).
        path: "tensor_file" only: the ``.npy`` / ``.npz`` / ``.pt`` file.
        **tensor_file_options: "tensor_file" only: ``load_tensor_file``'s ``key``, ``levels``, ``value_range``,
            ``centered``, ``channels_last``, ``val_fraction``, ``test_fraction``, ``split_seed``
            (``TENSOR_FILE_OPTIONS``).

    Raises:
        ValueError: unknown ``name``/``split``, bad ``n``/``seed``/``val_size``, a tensor file's problems (naming
            the option; a missing file's error is also a ``FileNotFoundError``).
        FileNotFoundError: an archive is missing and ``download`` is False (the message gives the path).
    """
    check_choice("name", name, DATASET_NAMES)
    check_choice("split", split, SPLITS)
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"n must be None or an integer >= 1; got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0; got {seed!r}")
    if val_size is not None and name not in ("mnist", "cifar10"):
        raise ValueError(f"val_size applies only to 'mnist' and 'cifar10'; got val_size={val_size!r} for {name!r}")
    if name != "tensor_file" and (path is not None or tensor_file_options):
        given = (["path"] if path is not None else []) + sorted(tensor_file_options)
        raise ValueError(f"{', '.join(given)} apply only to 'tensor_file'; got them for {name!r}")
    unknown = sorted(set(tensor_file_options) - set(TENSOR_FILE_OPTIONS))
    if unknown:
        raise ValueError(f"unknown tensor_file option(s) {unknown}; allowed: {list(TENSOR_FILE_OPTIONS)}")
    if name == "tensor_file":
        return load_tensor_file(path, split, n=n, **tensor_file_options)

    if name in CONTINUOUS_NAMES:
        if split == "trainval":
            parts = [_toy_split(name, s, TOY_SPLIT_SIZES[s], seed) for s in ("train", "val")]
            x = torch.cat([p[0] for p in parts])[:n]
            y = None if parts[0][1] is None else torch.cat([p[1] for p in parts])[:n]
        else:
            x, y = _toy_split(name, split, n if n is not None else TOY_SPLIT_SIZES[split], seed)
        return DataSet(x=x, levels=None, name=name, labels=y, split=split)

    if name == "digits":
        x, y = load_digits_split(split)
        levels = DIGITS_LEVELS
    else:
        loader = archives.load_mnist if name == "mnist" else archives.load_cifar10
        kw = {} if val_size is None else {"val_size": val_size}
        x, y = loader(root, split=split, download=download, **kw)
        levels = 256
    if n is not None:
        x, y = x[:n], y[:n]
    return DataSet(x=x, levels=levels, name=name, labels=y, split=split)
