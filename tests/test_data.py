"""Data sets: toy generators (exact moments), the GMM, digits splits, CIFAR-10 / MNIST archive readers."""

from __future__ import annotations

import gzip
import math
import pickle
import struct
import tarfile

import numpy as np
import pytest
import torch

from scoresde.data import (
    DataSet,
    checkerboard,
    default_gmm,
    eight_gaussians,
    eight_gaussians_gmm,
    load_cifar10,
    load_dataset,
    load_mnist,
    read_idx,
    swiss_roll,
    two_moons,
)
from scoresde.data.digits import DIGITS_SPLIT_SIZES, digits_split_indices
from scoresde.data.toy import raw_moments

TOY = {"swissroll": swiss_roll, "moons": two_moons, "eight_gaussians": eight_gaussians, "checkerboard": checkerboard}
N = 20000
Z = 5.0  # z-score bound for statistical checks (fixed seeds, so deterministic)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# --- toy sets ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(TOY))
def test_toy_shape_dtype_determinism(name):
    f = TOY[name]
    a = f(100, generator=_gen(1), dtype=torch.float64)
    b = f(100, generator=_gen(1), dtype=torch.float64)
    c = f(100, generator=_gen(2), dtype=torch.float64)
    assert a.shape == (100, 2) and a.dtype == torch.float64
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert f(7, generator=_gen(0)).dtype == torch.get_default_dtype()
    assert f(0, generator=_gen(0)).shape == (0, 2)


@pytest.mark.parametrize("name", list(TOY))
def test_toy_standardised_moments(name):
    """Each coordinate has mean 0 and variance 1: z-scores with the sample's own 4th moment."""
    x = TOY[name](N, generator=_gen(3), dtype=torch.float64)
    mean = x.mean(0)
    assert (mean.abs() * math.sqrt(N) < Z).all(), mean
    c = x - mean
    var = c.pow(2).mean(0)
    se_var = torch.sqrt((c.pow(4).mean(0) - var**2) / N)
    assert ((var - 1).abs() < Z * se_var).all(), (var, se_var)


def test_swiss_roll_closed_form_moments_match_quadrature():
    from scipy.integrate import quad

    a, b = 1.5 * math.pi, 4.5 * math.pi
    L = b - a
    (mx, my), (sx, sy) = raw_moments("swissroll")
    ex = quad(lambda t: t * math.cos(t), a, b)[0] / L
    ey = quad(lambda t: t * math.sin(t), a, b)[0] / L
    exx = quad(lambda t: (t * math.cos(t)) ** 2, a, b)[0] / L
    eyy = quad(lambda t: (t * math.sin(t)) ** 2, a, b)[0] / L
    assert mx == pytest.approx(ex, abs=1e-10) and my == pytest.approx(ey, abs=1e-10)
    assert sx**2 == pytest.approx(exx - ex**2 + 0.25, rel=1e-10)
    assert sy**2 == pytest.approx(eyy - ey**2 + 0.25, rel=1e-10)


def test_checkerboard_support():
    x = checkerboard(N, generator=_gen(4), dtype=torch.float64)
    raw = x * math.sqrt(4 / 3)
    assert raw.abs().max() <= 2
    col, row = torch.floor(raw[:, 0]) + 2, torch.floor(raw[:, 1]) + 2
    assert bool((torch.remainder(col + row, 2) == 0).all())
    counts = torch.bincount((4 * col + row).long(), minlength=16).double()
    filled = counts[counts > 0]
    assert len(filled) == 8
    # each of 8 squares has probability 1/8: binomial z-scores
    assert ((filled - N / 8).abs() < Z * math.sqrt(N / 8 * 7 / 8)).all()


def test_moons_lie_on_half_circles():
    x = two_moons(N, generator=_gen(5), dtype=torch.float64)
    (mx, my), (sx, sy) = raw_moments("moons")
    raw = x * torch.tensor([sx, sy], dtype=x.dtype) + torch.tensor([mx, my], dtype=x.dtype)
    d_up = (raw.norm(dim=1) - 1).abs()
    d_lo = ((raw - torch.tensor([1.0, 0.5], dtype=x.dtype)).norm(dim=1) - 1).abs()
    d = torch.minimum(d_up, d_lo)
    assert d.max() < 8 * 0.1  # noise std 0.1 per coordinate
    # the distance to the arc is about |N(0, 0.1^2)|: mean 0.1 sqrt(2/pi), slightly less near the ends
    assert d.mean().item() == pytest.approx(0.1 * math.sqrt(2 / math.pi), rel=0.1)


def test_eight_gaussians_is_its_mixture():
    g = eight_gaussians_gmm()
    assert torch.equal(eight_gaussians(50, generator=_gen(6), dtype=torch.float64), g.sample(50, generator=_gen(6)))
    x = eight_gaussians(N, generator=_gen(7), dtype=torch.float64)
    d = torch.cdist(x, g.means).min(dim=1).values
    assert d.max() < 6 * g.stds[0] * math.sqrt(2)
    assert float(g.stds[0]) ** 2 + float((g.means**2).sum(1).mean()) / 2 == pytest.approx(1.0, rel=1e-12)


# --- Gaussian mixture --------------------------------------------------------------------
def _mixture_moments(g):
    w, mu, sd = g.weights, g.means, g.stds
    mean = w @ mu
    second = (w[:, None, None] * (mu[:, :, None] * mu[:, None, :])).sum(0) + torch.eye(g.D, dtype=mu.dtype) * (w @ sd**2)
    return mean, second - torch.outer(mean, mean)


def test_gmm_dataset_matches_default_gmm_moments():
    torch.set_default_dtype(torch.float64)
    try:
        x = load_dataset("gmm", n=N, seed=3).x
    finally:
        torch.set_default_dtype(torch.float32)
    assert x.dtype == torch.float64 and x.shape == (N, 2)
    mean, cov = _mixture_moments(default_gmm(2))
    se = torch.sqrt(torch.diag(cov) / N)
    assert ((x.mean(0) - mean).abs() < Z * se).all()
    c = x - x.mean(0)
    emp = c.T @ c / N
    se_cov = torch.sqrt(((c[:, :, None] * c[:, None, :]) ** 2).mean(0) / N)
    assert ((emp - cov).abs() < Z * se_cov + 1e-12).all()


def test_default_gmm_high_dim():
    g = default_gmm(64)
    assert g.K == 4 and g.D == 64 and g.means.dtype == torch.float64
    assert torch.allclose(g.weights @ g.means, torch.zeros(64, dtype=torch.float64), atol=1e-12)
    assert torch.equal(default_gmm(64).means, g.means)  # deterministic
    assert not torch.equal(default_gmm(64, seed=1).means, g.means)
    x = g.sample(8, generator=_gen(0)).reshape(8, 1, 8, 8)  # image-shaped input works with the oracle
    assert g.score(x).shape == x.shape and g.log_prob(x).shape == (8,)
    # well separated: minimal distance between means >> component stds
    d = torch.cdist(g.means, g.means) + 1e3 * torch.eye(4, dtype=torch.float64)
    assert d.min() > 10 * g.stds.max()
    assert default_gmm(3, n_components=2).K == 2
    with pytest.raises(ValueError, match="dim"):
        default_gmm(0)
    with pytest.raises(ValueError, match="n_components"):
        default_gmm(2, n_components=0)


# --- load_dataset: toy ------------------------------------------------------------------
def test_toy_splits_sizes_determinism_and_difference():
    tr = load_dataset("moons")
    assert len(tr) == 20000 and len(load_dataset("moons", "val")) == 2000 and len(load_dataset("moons", "test")) == 5000
    assert tr.levels is None and not tr.is_discrete and tr.shape == (2,) and tr.dim == 2 and tr.labels is None
    small = load_dataset("moons", "train", n=64)
    assert torch.equal(small.x, load_dataset("moons", "train", n=64).x)
    assert not torch.allclose(small.x, load_dataset("moons", "val", n=64).x)
    assert not torch.allclose(small.x, load_dataset("moons", "train", n=64, seed=1).x)
    tv = load_dataset("checkerboard", "trainval")
    assert len(tv) == 22000
    assert torch.equal(tv.x[20000:], load_dataset("checkerboard", "val").x)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="name must be one of"):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match="split must be one of"):
        load_dataset("moons", split="valid")
    with pytest.raises(ValueError, match="n must be"):
        load_dataset("moons", n=0)
    with pytest.raises(ValueError, match="seed"):
        load_dataset("moons", seed=-1)
    with pytest.raises(ValueError, match="val_size"):
        load_dataset("digits", val_size=10)
    with pytest.raises(ValueError, match="n must be"):
        swiss_roll(-1)
    with pytest.raises(TypeError, match="integer dtype"):
        DataSet(x=torch.zeros(3, 2), levels=4, name="x")
    with pytest.raises(TypeError, match="floating dtype"):
        DataSet(x=torch.zeros(3, 2, dtype=torch.long), levels=None, name="x")


def test_missing_archives_explain_download(tmp_path):
    with pytest.raises(FileNotFoundError, match="download=True") as e:
        load_dataset("cifar10", root=tmp_path)
    assert str(tmp_path / "cifar-10-batches-py") in str(e.value)
    with pytest.raises(FileNotFoundError, match="download=True") as e:
        load_dataset("mnist", "test", root=tmp_path)
    assert str(tmp_path / "mnist") in str(e.value) and "t10k-images-idx3-ubyte" in str(e.value)


# --- digits -----------------------------------------------------------------------------
def test_digits_splits():
    from sklearn.datasets import load_digits

    sets = {s: load_dataset("digits", s) for s in ("train", "val", "test")}
    for s, d in sets.items():
        assert len(d) == DIGITS_SPLIT_SIZES[s]
        assert d.x.dtype == torch.uint8 and d.shape == (1, 8, 8) and d.dim == 64
        assert d.levels == 17 and d.is_discrete and int(d.x.max()) == 16 and int(d.x.min()) == 0
        assert d.labels.dtype == torch.long and set(d.labels.tolist()) == set(range(10))
    idx = {s: set(digits_split_indices(s).tolist()) for s in sets}
    assert not (idx["train"] & idx["val"]) and not (idx["train"] & idx["test"]) and not (idx["val"] & idx["test"])
    assert idx["train"] | idx["val"] | idx["test"] == set(range(1797))
    # contents are the sklearn images at those indices, in that order
    ref = load_digits()
    i = digits_split_indices("test")
    assert np.array_equal(sets["test"].x[:, 0].numpy(), ref.images[i].astype(np.uint8))
    assert np.array_equal(sets["test"].labels.numpy(), ref.target[i])
    # deterministic, independent of seed; n takes a prefix; trainval = train + val
    assert torch.equal(load_dataset("digits", "test", seed=5).x, sets["test"].x)
    assert torch.equal(load_dataset("digits", "train", n=10).x, sets["train"].x[:10])
    assert torch.equal(load_dataset("digits", "trainval").x, torch.cat([sets["train"].x, sets["val"].x]))


def test_model_scale_of_discrete_data():
    d = load_dataset("digits", "val")
    y = d.model_scale(centered=True, generator=_gen(0), dtype=torch.float64)
    assert y.shape == d.x.shape and y.dtype == torch.float64
    k = torch.floor((y + 1) / 2 * 17)
    assert torch.equal(k.to(torch.uint8), d.x)  # dequantised value stays in its bin
    mid = d.model_scale(centered=False, dequantize=False, dtype=torch.float64)
    assert torch.allclose(mid, (d.x.double() + 0.5) / 17)


# --- CIFAR-10 ---------------------------------------------------------------------------
def _cifar_batches(rng, sizes):
    return [
        {b"batch_label": f"batch {i}".encode(), b"labels": rng.integers(0, 10, n).tolist(), b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8)}
        for i, n in enumerate(sizes)
    ]


def _write_cifar_dir(folder, batches, protocol):
    folder.mkdir(parents=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name, b in zip(names, batches):
        with open(folder / name, "wb") as f:
            pickle.dump(b, f, protocol=protocol)


def _check_cifar(x, y, batches):
    data = np.concatenate([b[b"data"] for b in batches])
    labels = np.concatenate([b[b"labels"] for b in batches])
    assert x.dtype == torch.uint8 and x.shape == (len(data), 3, 32, 32)
    # channel c, row h, column w is byte c * 1024 + h * 32 + w of a row
    assert int(x[1, 2, 3, 4]) == int(data[1, 2 * 1024 + 3 * 32 + 4])
    assert np.array_equal(x.reshape(len(data), -1).numpy(), data)
    assert np.array_equal(y.numpy(), labels)


@pytest.mark.parametrize("packed", [False, True])
def test_cifar10_from_tiny_archive(tmp_path, packed):
    rng = np.random.default_rng(0)
    batches = _cifar_batches(rng, [4, 4, 4, 4, 4, 3])
    _write_cifar_dir(tmp_path / "src" / "cifar-10-batches-py", batches, protocol=2 if packed else pickle.HIGHEST_PROTOCOL)
    root = tmp_path / "root"
    root.mkdir()
    if packed:
        with tarfile.open(root / "cifar-10-python.tar.gz", "w:gz") as tar:
            tar.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    else:
        (tmp_path / "src" / "cifar-10-batches-py").rename(root / "cifar-10-batches-py")
    xtr, ytr = load_cifar10(root, "trainval")
    _check_cifar(xtr, ytr, batches[:5])
    xte, yte = load_cifar10(root, "test")
    _check_cifar(xte, yte, batches[5:])
    x_train, _ = load_cifar10(root, "train", val_size=3)
    x_val, _ = load_cifar10(root, "val", val_size=3)
    assert torch.equal(torch.cat([x_train, x_val]), xtr) and len(x_val) == 3
    d = load_dataset("cifar10", "val", root=root, val_size=3)
    assert d.levels == 256 and d.shape == (3, 32, 32) and torch.equal(d.x, x_val)
    with pytest.raises(ValueError, match="val_size"):
        load_cifar10(root, "train")  # default 5000 >= 20 training images


def test_cifar10_rejects_foreign_pickles(tmp_path):
    batches = _cifar_batches(np.random.default_rng(1), [2] * 6)
    batches[0][b"evil"] = print  # a global that is not a numpy array constructor
    _write_cifar_dir(tmp_path / "cifar-10-batches-py", batches, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="not allowed"):
        load_cifar10(tmp_path, "trainval")


# --- MNIST ------------------------------------------------------------------------------
def _idx_bytes(arr: np.ndarray) -> bytes:
    magic = {1: 2049, 3: 2051}[arr.ndim]
    return struct.pack(">I", magic) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(np.uint8).tobytes()


def _write_mnist(folder, gz, rng, n_train=12, n_test=5):
    folder.mkdir(parents=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for name, arr in arrays.items():
        if gz:
            with gzip.open(folder / f"{name}.gz", "wb") as f:
                f.write(_idx_bytes(arr))
        else:
            (folder / name).write_bytes(_idx_bytes(arr))
    return arrays


@pytest.mark.parametrize("gz,layout", [(True, "mnist"), (False, "mnist"), (True, "MNIST/raw")])
def test_mnist_from_tiny_idx_files(tmp_path, gz, layout):
    arrays = _write_mnist(tmp_path / layout, gz, np.random.default_rng(2))
    x, y = load_mnist(tmp_path, "trainval")
    assert x.dtype == torch.uint8 and x.shape == (12, 1, 28, 28) and y.dtype == torch.long
    assert np.array_equal(x[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    assert np.array_equal(y.numpy(), arrays["train-labels-idx1-ubyte"])
    xt, yt = load_mnist(tmp_path, "test")
    assert np.array_equal(xt[:, 0].numpy(), arrays["t10k-images-idx3-ubyte"])
    assert np.array_equal(yt.numpy(), arrays["t10k-labels-idx1-ubyte"])
    d_tr = load_dataset("mnist", "train", root=tmp_path, val_size=2)
    d_va = load_dataset("mnist", "val", root=tmp_path, val_size=2, n=1)
    assert len(d_tr) == 10 and d_tr.levels == 256 and d_tr.shape == (1, 28, 28)
    assert torch.equal(d_va.x, x[10:11])


def test_read_idx_rejects_bad_files(tmp_path):
    good = _idx_bytes(np.arange(6, dtype=np.uint8).reshape(1, 2, 3))
    (tmp_path / "ok").write_bytes(good)
    assert read_idx(tmp_path / "ok").tolist() == [[[0, 1, 2], [3, 4, 5]]]
    (tmp_path / "magic").write_bytes(b"\x01" + good[1:])
    with pytest.raises(ValueError, match="magic"):
        read_idx(tmp_path / "magic")
    (tmp_path / "short").write_bytes(good[:-1])
    with pytest.raises(ValueError, match="bytes"):
        read_idx(tmp_path / "short")
    # big-endian multi-byte elements (type 0x0C = int32)
    arr = np.array([1, -2, 70000], dtype=">i4")
    (tmp_path / "i4").write_bytes(bytes([0, 0, 0x0C, 1]) + struct.pack(">I", 3) + arr.tobytes())
    assert read_idx(tmp_path / "i4").tolist() == [1, -2, 70000]


def test_gmm_labels_are_the_components_and_keep_the_draws():
    """``gmm`` data carry the component each point came from (``NUM_CLASSES["gmm"]`` of them); the points are the
    same draws as without labels."""
    from scoresde.data import default_gmm
    from scoresde.data.datasets import NUM_CLASSES

    ds = load_dataset("gmm", "val", n=500, seed=3)
    gm = default_gmm(2)
    x, k = gm.sample(500, generator=torch.Generator().manual_seed(4 * 3 + 1), dtype=torch.get_default_dtype(),
                     return_labels=True)
    assert torch.equal(ds.x, x) and torch.equal(ds.labels, k)
    assert ds.labels.dtype == torch.long and int(ds.labels.max()) < NUM_CLASSES["gmm"] == gm.K
    tv = load_dataset("gmm", "trainval", n=30)
    assert tv.labels.shape == (30,)
    assert load_dataset("moons", "val", n=10).labels is None
