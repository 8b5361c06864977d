"""CIFAR-10 and MNIST read from their standard archives; downloaded only on request.

Layouts looked for under ``root``:

* CIFAR-10: the extracted folder ``root/cifar-10-batches-py/`` (python pickle batches
  ``data_batch_1..5`` and ``test_batch``: dicts with ``b"data"`` uint8 ``(n, 3072)``, rows laid
  out as 1024 red, 1024 green, 1024 blue values in row-major 32x32 order, and ``b"labels"``), or
  the archive ``root/cifar-10-python.tar.gz`` containing that folder (read without extracting).
  Pickles are read with a restricted unpickler that only admits numpy array reconstruction.
* MNIST: IDX files ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
  ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each raw or gzipped (``.gz``), in
  ``root/mnist/``, ``root/MNIST/raw/`` (torchvision's layout) or ``root`` itself. IDX: a magic
  number whose third byte is the element type (0x08 = uint8) and fourth the number of
  dimensions (2051 = images, 3 dims; 2049 = labels, 1 dim), then big-endian uint32 sizes, then data.

Splits: ``test`` is the official test set; ``val`` is the last ``val_size`` images of the official
training set (default 5000 for both), ``train`` the rest, ``trainval`` the whole official
training set (what published CIFAR-10 numbers train on).

``download=True`` fetches the official files (CIFAR-10 from the Toronto page, MNIST from the
PyTorch S3 mirror of LeCun's files), checks their MD5, and (CIFAR-10) extracts the archive.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.request
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "CIFAR10_URL",
    "CIFAR10_MD5",
    "MNIST_URL",
    "MNIST_FILES",
    "default_root",
    "read_idx",
    "load_cifar10_arrays",
    "load_mnist_arrays",
    "load_cifar10",
    "load_mnist",
    "download_cifar10",
    "download_mnist",
]

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_DIR = "cifar-10-batches-py"
CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_BATCH = "test_batch"

MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
MNIST_FILES = {  # name (without .gz) -> md5 of the .gz file
    "train-images-idx3-ubyte": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte": "ec29112dd5afa0611ce80d1b7f02629c",
}
DEFAULT_VAL_SIZE = 5000
SPLITS = ("train", "val", "test", "trainval")

_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def default_root() -> Path:
    """``$SCORESDE_DATA`` if set, else ``~/.cache/scoresde/data``."""
    return Path(os.environ.get("SCORESDE_DATA", "~/.cache/scoresde/data")).expanduser()


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}; got {split!r}")
    return split


def _check_val_size(val_size) -> int:
    if isinstance(val_size, bool) or not isinstance(val_size, int) or val_size < 1:
        raise ValueError(f"val_size must be an integer >= 1; got {val_size!r}")
    return val_size


# --- file helpers ----------------------------------------------------------------------
def _md5(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _download(url: str, dest: Path, md5: str) -> Path:
    """Fetch ``url`` to ``dest`` through a temporary file; raise ``RuntimeError`` on an MD5 mismatch."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, suffix=".part")
    os.close(fd)
    try:
        with urllib.request.urlopen(url) as r, open(tmp, "wb") as f:
            shutil.copyfileobj(r, f)
        got = _md5(Path(tmp))
        if got != md5:
            raise RuntimeError(f"MD5 mismatch for {url}: expected {md5}, got {got}")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return dest


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that only reconstructs numpy arrays (CIFAR-10's batches hold nothing else)."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"CIFAR-10 batch refers to {module}.{name}, which is not allowed")


def _read_cifar_batch(f) -> tuple[np.ndarray, np.ndarray]:
    d = _ArrayUnpickler(f, encoding="bytes").load()
    if not isinstance(d, dict) or b"data" not in d or b"labels" not in d:
        raise ValueError("CIFAR-10 batch must be a dict with keys b'data' and b'labels'")
    data = np.asarray(d[b"data"], dtype=np.uint8)
    labels = np.asarray(d[b"labels"], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise ValueError(f"CIFAR-10 batch data must be (n, 3072) with n labels; got {data.shape} and {labels.shape}")
    return data.reshape(-1, 3, 32, 32), labels


def read_idx(path) -> np.ndarray:
    """Read an IDX file (raw, or gzipped if the name ends in ``.gz``) into a numpy array.

    Format: bytes 0-1 zero, byte 2 the element type (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
    0x0D float32, 0x0E float64), byte 3 the number of dimensions ``d``; then ``d`` big-endian uint32
    sizes; then the data in C order. Raises ``ValueError`` on a bad header or a size mismatch.
    """
    path = Path(path)
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {raw[:4].hex()})")
    ndim = raw[3]
    dims = tuple(int(v) for v in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    offset = 4 + 4 * ndim
    count = int(np.prod(dims)) if dims else 1
    if len(raw) - offset != count * dtype.itemsize:
        raise ValueError(f"{path}: header says {dims} x {dtype.itemsize} bytes, file holds {len(raw) - offset} bytes of data")
    arr = np.frombuffer(raw, dtype=dtype, count=count, offset=offset).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def _carve(x: np.ndarray, y: np.ndarray, split: str, val_size: int):
    if split in ("test", "trainval"):
        return x, y
    if isinstance(val_size, bool) or not isinstance(val_size, int) or not 0 < val_size < len(x):
        raise ValueError(f"val_size must be an integer in [1, {len(x) - 1}] (the training file has {len(x)} images); got {val_size!r}")
    cut = len(x) - val_size
    return (x[:cut], y[:cut]) if split == "train" else (x[cut:], y[cut:])


def _load_split(load_arrays, root, split: str, download: bool, val_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One split of an archive as tensors: ``load_arrays(root, train, download)`` gives the official training
    or test file, and ``_carve`` takes the last ``val_size`` training images as "val" (the rest: "train")."""
    _check_split(split)
    _check_val_size(val_size)
    x, y = load_arrays(root, train=split != "test", download=download)
    x, y = _carve(x, y, split, val_size)
    return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y))


# --- CIFAR-10 ---------------------------------------------------------------------------
def download_cifar10(root=None) -> Path:
    """Download ``cifar-10-python.tar.gz`` to ``root`` (MD5-checked) and extract it; returns the folder."""
    root = Path(root) if root is not None else default_root()
    archive = root / CIFAR10_ARCHIVE
    if not archive.exists() or _md5(archive) != CIFAR10_MD5:
        _download(CIFAR10_URL, archive, CIFAR10_MD5)
    with tarfile.open(archive, "r:gz") as tar:
        tar.extractall(root, filter="data")
    return root / CIFAR10_DIR


def load_cifar10_arrays(root=None, train: bool = True, download: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The official CIFAR-10 training (50000, all five batches in order) or test (10000) set as
    images ``(n, 3, 32, 32)`` uint8 and labels ``(n,)`` int64 numpy arrays."""
    root = Path(root) if root is not None else default_root()
    names = CIFAR10_TRAIN_BATCHES if train else (CIFAR10_TEST_BATCH,)
    folder, archive = root / CIFAR10_DIR, root / CIFAR10_ARCHIVE
    if not folder.is_dir() and not archive.is_file():
        if not download:
            raise FileNotFoundError(
                f"CIFAR-10 not found: expected the folder {folder} or the archive {archive}; "
                f"pass download=True to fetch it from {CIFAR10_URL}"
            )
        download_cifar10(root)
    parts = []
    if folder.is_dir():
        for name in names:
            with open(folder / name, "rb") as f:
                parts.append(_read_cifar_batch(f))
    else:
        with tarfile.open(archive, "r:gz") as tar:
            for name in names:
                member = tar.extractfile(f"{CIFAR10_DIR}/{name}")
                if member is None:
                    raise ValueError(f"{archive} has no regular file {CIFAR10_DIR}/{name}")
                parts.append(_read_cifar_batch(io.BytesIO(member.read())))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def load_cifar10(root=None, split: str = "train", download: bool = False, val_size: int = DEFAULT_VAL_SIZE):
    """CIFAR-10 split as images ``(N, 3, 32, 32)`` uint8 (256 levels) and labels ``(N,)`` long tensors."""
    return _load_split(load_cifar10_arrays, root, split, download, val_size)


# --- MNIST ------------------------------------------------------------------------------
def _mnist_dirs(root: Path) -> list[Path]:
    return [root / "mnist", root / "MNIST" / "raw", root]


def _find_mnist_file(root: Path, name: str) -> Path | None:
    for d in _mnist_dirs(root):
        for candidate in (d / name, d / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def download_mnist(root=None) -> Path:
    """Download the four gzipped MNIST IDX files to ``root/mnist`` (MD5-checked); returns the folder."""
    root = Path(root) if root is not None else default_root()
    folder = root / "mnist"
    for name, md5 in MNIST_FILES.items():
        dest = folder / f"{name}.gz"
        if not dest.exists() or _md5(dest) != md5:
            _download(MNIST_URL + f"{name}.gz", dest, md5)
    return folder


def load_mnist_arrays(root=None, train: bool = True, download: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The official MNIST training (60000) or test (10000) set as images ``(n, 1, 28, 28)`` uint8 and labels int64."""
    root = Path(root) if root is not None else default_root()
    prefix = "train" if train else "t10k"
    names = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
    paths = [_find_mnist_file(root, n) for n in names]
    if any(p is None for p in paths):
        if not download:
            raise FileNotFoundError(
                f"MNIST files {names[0]}[.gz] and {names[1]}[.gz] not found in any of "
                f"{[str(d) for d in _mnist_dirs(root)]}; pass download=True to fetch them from {MNIST_URL}"
            )
        download_mnist(root)
        paths = [_find_mnist_file(root, n) for n in names]
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels) or images.dtype != np.uint8:
        raise ValueError(f"MNIST images must be uint8 (n, H, W) with n labels; got {images.dtype} {images.shape}, labels {labels.shape}")
    return images[:, None], labels.astype(np.int64)


def load_mnist(root=None, split: str = "train", download: bool = False, val_size: int = DEFAULT_VAL_SIZE):
    """MNIST split as images ``(N, 1, 28, 28)`` uint8 (256 levels) and labels ``(N,)`` long tensors."""
    return _load_split(load_mnist_arrays, root, split, download, val_size)
