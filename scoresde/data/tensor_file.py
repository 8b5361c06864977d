"""The user's own array as a data set (``load_dataset("tensor_file", path=...)``): no loader to write.

Files:

* ``.npy``: one array.
* ``.npz`` (``np.savez``) or ``.pt`` (``torch.save`` of a tensor or of a dict of tensors):
  with ``key``: that array; else, if the file has a ``"train"`` array, the splits come from the keys
  ``"train"``, ``"val"``, ``"test"`` (a missing ``"val"`` / ``"test"`` is carved off ``"train"``, below); else its
  first array (``np.load(path).files[0]``, the dict's first key).

Shapes (``N`` examples): vectors ``(N, D)``; images ``(N, C, H, W)``, or ``(N, H, W, C)`` with
``channels_last=True``; grey images ``(N, H, W)`` get ``C = 1``. The rule is explicit, never guessed from sizes.

Values, as declared by the user:

* ``levels=L``: discrete data, integers in ``[0, L - 1]`` (an integer dtype, or floats holding whole numbers),
  stored as uint8 (``L <= 256``) or int64 and dequantised exactly like the digits / CIFAR-10
  (``DataSet.model_scale``: ``y = a (k + U) / L + b``).
* ``levels=None``: continuous data, used as given (as floats of torch's default dtype), or with
  ``value_range=(lo, hi)`` rescaled to the model's scale: ``y = a (x - lo) / (hi - lo) + b``, ``(a, b) = (2, -1)``
  if ``centered`` else ``(1, 0)`` (``to_value_range`` maps model-scale samples back). Values must be finite and,
  with a ``value_range``, inside it.

Splits without split keys: a permutation ``torch.randperm(N, generator=torch.Generator().manual_seed(split_seed))``
gives ``"test"`` its first ``n_test = round(test_fraction N)`` indices and ``"val"`` the next
``n_val = round(val_fraction N)`` (at least 1 each when its fraction is > 0); ``"train"`` keeps the rest. Each
split keeps the file's order. Defaults: 10 % val, 10 % test, ``split_seed = 0`` (not the run's seed, so runs
with different seeds share a test set). ``"trainval"`` is train followed by val.

Every bad input raises ``ValueError`` naming the argument (``path``, ``key``, ``levels``, ``value_range``,
``channels_last``, ...); a missing file raises an error that is both a ``ValueError`` and a ``FileNotFoundError``.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .._validate import check_bool, check_choice, check_in_range, check_int
from .transforms import from_model_scale, to_model_scale

__all__ = ["load_tensor_file", "to_value_range", "TENSOR_FILE_SUFFIXES", "SPLIT_KEYS"]

TENSOR_FILE_SUFFIXES = (".npy", ".npz", ".pt")
SPLIT_KEYS = ("train", "val", "test")
_SPLITS = ("train", "val", "test", "trainval")


class TensorFileNotFoundError(FileNotFoundError, ValueError):
    """The data file does not exist (a ``ValueError`` as well, like every other bad ``data.*`` value)."""


# ----------------------------------------------------------------------------- reading
def _read(path: Path) -> dict:
    """The file's arrays as ``{name: array or tensor}`` (insertion order kept); one unnamed array -> ``{None: a}``."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            return {None: np.load(path, allow_pickle=False)}
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as f:
                return {k: f[k] for k in f.files}
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a bad zip, pickled objects (refused), a torch payload that is not weights-only, ...
        raise ValueError(f"path {str(path)!r} cannot be read as a {suffix} array file: {type(e).__name__}: {e}") from None
    if torch.is_tensor(obj):
        return {None: obj}
    if isinstance(obj, dict) and obj and all(isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items()):
        return dict(obj)
    raise ValueError(f"path {str(path)!r} must hold a tensor or a non-empty dict of str -> tensor; "
                     f"got {type(obj).__name__}{' ' + str({k: type(v).__name__ for k, v in obj.items()}) if isinstance(obj, dict) else ''}")


def _to_tensor(a, what: str) -> torch.Tensor:
    """A numeric numpy array or tensor as a tensor (real integer or floating dtype); ``what`` names it in errors."""
    if isinstance(a, np.ndarray):
        if a.dtype.kind in "iu":
            if a.dtype.kind == "u" and a.dtype.itemsize >= 2:  # uint16/32/64: torch has few ops for them
                if a.size and int(a.max()) > np.iinfo(np.int64).max:
                    raise ValueError(f"{what} holds integers beyond int64; got max {int(a.max())}")
                a = a.astype(np.int64)
        elif a.dtype.kind != "f":
            raise ValueError(f"{what} must hold integers or floats; got dtype {a.dtype}")
        return torch.from_numpy(np.ascontiguousarray(a))
    t = a
    if t.dtype in _WIDE_UINTS:
        t = t.to(torch.int64)
    if t.dtype == torch.bool or t.dtype.is_complex or not (t.dtype.is_floating_point or _is_int(t.dtype)):
        raise ValueError(f"{what} must hold integers or floats; got dtype {t.dtype}")
    return t


_WIDE_UINTS = tuple(getattr(torch, n) for n in ("uint16", "uint32", "uint64") if hasattr(torch, n))


def _is_int(dtype: torch.dtype) -> bool:
    return dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _as_examples(x: torch.Tensor, what: str, channels_last: bool) -> torch.Tensor:
    """``(N, D)`` stays, ``(N, H, W)`` -> ``(N, 1, H, W)``, ``(N, C, H, W)`` stays (``(N, H, W, C)`` permuted)."""
    if x.dim() not in (2, 3, 4) or 0 in x.shape:
        raise ValueError(f"{what} must have shape (N, D), (N, H, W) or (N, C, H, W) "
                         f"({'(N, H, W, C) with channels_last' if not channels_last else 'channels_last: (N, H, W, C)'}) "
                         f"with no empty dimension; got {tuple(x.shape)}")
    if x.dim() == 3:
        return x.unsqueeze(1)
    if x.dim() == 4 and channels_last:
        return x.permute(0, 3, 1, 2).contiguous()
    return x


# ----------------------------------------------------------------------------- values
def _discrete(x: torch.Tensor, levels: int, what: str) -> torch.Tensor:
    if x.dtype.is_floating_point:
        if not bool(torch.isfinite(x).all()) or not torch.equal(x, x.round()):
            raise ValueError(f"{what} is declared discrete (levels={levels}) but holds non-integer values; "
                             "set levels to None for continuous data")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0 or hi > levels - 1:
        raise ValueError(f"{what}: values must lie in [0, levels - 1] = [0, {levels - 1}] (levels={levels}); "
                         f"got [{lo:g}, {hi:g}]")
    return x.to(torch.uint8 if levels <= 256 else torch.int64)


def _continuous(x: torch.Tensor, value_range, centered: bool, what: str) -> torch.Tensor:
    if _is_int(x.dtype) and value_range is None:
        warnings.warn(f"{what} holds integers ({x.dtype}) and is loaded as continuous data as given (levels=None, "
                      "no value_range); set levels to dequantise it, or value_range to rescale it", stacklevel=4)
    if x.dtype.is_floating_point and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{what} holds non-finite values (nan or inf)")
    if value_range is not None:
        lo, hi = value_range
        xmin, xmax = float(x.min()), float(x.max())
        if xmin < lo or xmax > hi:
            raise ValueError(f"{what}: values must lie in value_range [{lo:g}, {hi:g}]; got [{xmin:g}, {xmax:g}]")
        x = to_model_scale((x.to(torch.float64) - lo) / (hi - lo), centered)  # in float64, then the default dtype
    return x.to(torch.get_default_dtype())


def _check_value_range(value_range, levels):
    if value_range is None:
        return None
    if levels is not None:
        raise ValueError(f"value_range applies to continuous data (levels=None); discrete data (levels={levels}) "
                         f"lie in [0, levels - 1]; got value_range={value_range!r}")
    if not isinstance(value_range, (tuple, list)) or len(value_range) != 2:
        raise ValueError(f"value_range must be None or a pair (lo, hi) of finite numbers with lo < hi; got {value_range!r}")
    lo = check_in_range("value_range[0]", value_range[0], -math.inf, math.inf, False, False)
    hi = check_in_range("value_range[1]", value_range[1], -math.inf, math.inf, False, False)
    if not lo < hi:
        raise ValueError(f"value_range must be None or a pair (lo, hi) of finite numbers with lo < hi; got {value_range!r}")
    return lo, hi


def to_value_range(y: torch.Tensor, value_range: tuple[float, float], centered: bool = True) -> torch.Tensor:
    """Model-scale samples back to the file's scale: ``x = lo + (hi - lo) (y - b) / a`` (inverse of the rescaling
    ``load_tensor_file`` applies with ``value_range``); shape preserved."""
    lo, hi = _check_value_range(value_range, None)
    return lo + (hi - lo) * from_model_scale(y, centered)


# ----------------------------------------------------------------------------- splits
def _carve(n_total: int, val_fraction: float, test_fraction: float, split_seed: int, carve_val: bool, carve_test: bool,
           what: str) -> dict:
    """Index sets ``{"train", "val", "test"}`` carved from ``range(n_total)`` (module docstring)."""

    def size(frac, on):
        return 0 if not on or frac == 0 else max(1, round(frac * n_total))

    n_test, n_val = size(test_fraction, carve_test), size(val_fraction, carve_val)
    if n_total - n_test - n_val < 1:
        raise ValueError(f"{what} has {n_total} examples: too few to carve val_fraction={val_fraction:g} and "
                         f"test_fraction={test_fraction:g} and keep a training example")
    perm = torch.randperm(n_total, generator=torch.Generator().manual_seed(split_seed))
    return {
        "test": perm[:n_test].sort().values,
        "val": perm[n_test:n_test + n_val].sort().values,
        "train": perm[n_test + n_val:].sort().values,
    }


def load_tensor_file(
    path,
    split: str = "train",
    key: Optional[str] = None,
    levels: Optional[int] = None,
    value_range: Optional[tuple[float, float]] = None,
    centered: bool = True,
    channels_last: bool = False,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    split_seed: int = 0,
    n: Optional[int] = None,
):
    """One split of the user's array file as a ``DataSet`` named ``"tensor_file"`` (rules in the module docstring).

    Args:
        path: a ``.npy``, ``.npz`` or ``.pt`` file.
        split: "train", "val", "test" or "trainval".
        key: the array to use in a ``.npz`` / dict ``.pt`` (None: the split keys, or the first array).
        levels: ``L`` for discrete data with integer values in ``[0, L - 1]`` (``L >= 2``); None: continuous.
        value_range: ``(lo, hi)`` of continuous data, rescaled to the model's scale; None: used as given.
        centered: with ``value_range``: model scale ``[-1, 1]`` (True) or ``[0, 1]`` (False); use the run's scaler's.
        channels_last: 4-d arrays are ``(N, H, W, C)`` (permuted to ``(N, C, H, W)``); ignored for 2-d and 3-d.
        val_fraction, test_fraction: shares carved off for "val" / "test" when the file has no such array;
            each in ``[0, 1)``.
        split_seed: seed of the carving permutation.
        n: keep the first ``n`` examples of the split (None: all).

    Returns:
        ``DataSet`` (``x``: uint8/int64 ``(N, *shape)`` if ``levels`` else floats of the default dtype).
    """
    from .datasets import DataSet

    if path is None or not isinstance(path, (str, Path)) or str(path) == "":
        raise ValueError(f"path must name a {'/'.join(TENSOR_FILE_SUFFIXES)} file for data set 'tensor_file'; got {path!r}")
    path = Path(path).expanduser()
    check_choice("split", split, _SPLITS)
    if key is not None and not (isinstance(key, str) and key):
        raise ValueError(f"key must be None or the name of an array in the file; got {key!r}")
    if levels is not None:
        levels = check_int("levels", levels, 2)
    value_range = _check_value_range(value_range, levels)
    check_bool("centered", centered)
    check_bool("channels_last", channels_last)
    val_fraction = check_in_range("val_fraction", val_fraction, 0, 1, high_closed=False)
    test_fraction = check_in_range("test_fraction", test_fraction, 0, 1, high_closed=False)
    if val_fraction + test_fraction >= 1:
        raise ValueError(f"val_fraction + test_fraction must be < 1; got {val_fraction:g} + {test_fraction:g}")
    split_seed = check_int("split_seed", split_seed, 0)
    if n is not None:
        n = check_int("n", n, 1)
    if path.suffix.lower() not in TENSOR_FILE_SUFFIXES:
        raise ValueError(f"path must end in one of {TENSOR_FILE_SUFFIXES}; got {str(path)!r}")
    if not path.is_file():
        raise TensorFileNotFoundError(f"path {str(path)!r}: no such file")

    arrays = _read(path)
    names = [k for k in arrays if k is not None]
    if key is not None:
        if key not in arrays:
            raise ValueError(f"key {key!r} is not in {str(path)!r}; its arrays are {names or '(one unnamed array)'}")
        arrays = {key: arrays[key]}
    elif "train" in arrays:
        arrays = {k: arrays[k] for k in SPLIT_KEYS if k in arrays}
    else:
        if any(k in arrays for k in SPLIT_KEYS):
            raise ValueError(f"{str(path)!r} has {[k for k in SPLIT_KEYS if k in arrays]} but no 'train' array; "
                             f"give split arrays 'train' (and optionally 'val', 'test') or choose one array with key")
        first = next(iter(arrays))
        arrays = {first: arrays[first]}

    def prepared(name) -> torch.Tensor:
        what = f"{str(path)!r}" + (f" [{name!r}]" if name is not None else "")
        x = _as_examples(_to_tensor(arrays[name], what), what, channels_last)
        return _discrete(x, levels, what) if levels is not None else _continuous(x, value_range, centered, what)

    wanted = ("train", "val") if split == "trainval" else (split,)
    if "train" in arrays:  # split arrays in the file (missing ones carved off "train")
        pool_needed = any(s == "train" or s not in arrays for s in wanted)
        parts = {}
        pool = prepared("train") if pool_needed else None
        if pool_needed:
            idx = _carve(pool.shape[0], val_fraction, test_fraction, split_seed, "val" not in arrays,
                         "test" not in arrays, f"{str(path)!r} ['train']")
        for s in wanted:
            if s in arrays and s != "train":
                parts[s] = prepared(s)
            else:
                if idx[s].numel() == 0:
                    frac = "val_fraction" if s == "val" else "test_fraction"
                    raise ValueError(f"split {s!r} is empty: {str(path)!r} has no {s!r} array and {frac}=0")
                parts[s] = pool[idx[s]]
    else:
        x = prepared(next(iter(arrays)))
        idx = _carve(x.shape[0], val_fraction, test_fraction, split_seed, True, True, f"{str(path)!r}")
        parts = {}
        for s in wanted:
            if idx[s].numel() == 0:
                frac = "val_fraction" if s == "val" else "test_fraction"
                raise ValueError(f"split {s!r} is empty: {str(path)!r} has no split arrays and {frac}=0")
            parts[s] = x[idx[s]]

    shapes = {s: tuple(t.shape[1:]) for s, t in parts.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"{str(path)!r}: the splits' examples differ in shape: {shapes}")
    x = torch.cat([parts[s] for s in wanted]) if len(wanted) > 1 else parts[wanted[0]]
    if n is not None:
        x = x[:n]
    return DataSet(x=x, levels=levels, name="tensor_file", split=split)
