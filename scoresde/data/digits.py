"""The 8x8 handwritten digits that ship with scikit-learn: the embedded image data set (no network).

``sklearn.datasets.load_digits()`` gives 1797 greyscale 8x8 images with 17 grey levels
``0..16`` and labels ``0..9``. The split is fixed and does not depend on any seed:

* a permutation of the 1797 indices from ``numpy.random.RandomState(DIGITS_SPLIT_SEED)``
  (numpy's legacy generator, whose stream is frozen across versions);
* ``test`` = the first 300 permuted indices, ``val`` = the next 150, ``train`` = the remaining
  1347 (``trainval`` = train followed by val); each split keeps the permuted order.

Images are returned as ``uint8`` tensors ``(N, 1, 8, 8)`` with values in ``[0, 16]``.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

__all__ = ["DIGITS_LEVELS", "DIGITS_SPLIT_SIZES", "DIGITS_SPLIT_SEED", "digits_split_indices", "load_digits_split"]

DIGITS_LEVELS = 17
DIGITS_SPLIT_SEED = 0
DIGITS_SPLIT_SIZES = {"train": 1347, "val": 150, "test": 300}


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.rint(d.images).astype(np.uint8)  # stored as float64 0..16
    return images, d.target.astype(np.int64)


def digits_split_indices(split: str) -> np.ndarray:
    """Indices into ``load_digits()`` of a split ("train", "val", "test", "trainval"); int64 array."""
    n_total = sum(DIGITS_SPLIT_SIZES.values())
    perm = np.random.RandomState(DIGITS_SPLIT_SEED).permutation(n_total)
    n_test, n_val = DIGITS_SPLIT_SIZES["test"], DIGITS_SPLIT_SIZES["val"]
    parts = {"test": perm[:n_test], "val": perm[n_test : n_test + n_val], "train": perm[n_test + n_val :]}
    if split == "trainval":
        return np.concatenate([parts["train"], parts["val"]])
    if split not in parts:
        raise ValueError(f"split must be one of ['train', 'val', 'test', 'trainval']; got {split!r}")
    return parts[split]


def load_digits_split(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``(N, 1, 8, 8)`` uint8 in ``[0, 16]`` and labels ``(N,)`` long of a fixed digits split."""
    idx = digits_split_indices(split)
    images, labels = _digits_arrays()
    if len(images) != sum(DIGITS_SPLIT_SIZES.values()):
        raise RuntimeError(f"sklearn's digits set has {len(images)} images; expected {sum(DIGITS_SPLIT_SIZES.values())}")
    x = torch.from_numpy(images[idx].copy()).unsqueeze(1)
    y = torch.from_numpy(labels[idx].copy())
    return x, y
