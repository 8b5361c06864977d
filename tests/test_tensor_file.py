"""data=tensor_file: the user's .npy / .npz / .pt array as a DataSet (shapes, declared values, splits, errors)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from scoresde.data import DataSet, TENSOR_FILE_OPTIONS, load_dataset, load_tensor_file, to_value_range, uniform_dequantize


def grey_images(n=50, levels=17, seed=0):
    """(n, 8, 8) uint8 in [0, levels - 1] (grey images without a channel axis), both ends present."""
    x = np.random.default_rng(seed).integers(0, levels, size=(n, 8, 8)).astype(np.uint8)
    x[0, 0, 0], x[0, 0, 1] = 0, levels - 1
    return x


def traced(n=40, d=3):
    """(n, d) floats whose first column is the row index, to trace which rows a split got."""
    x = np.random.default_rng(1).normal(size=(n, d))
    x[:, 0] = np.arange(n)
    return x


# ----------------------------------------------------------------------------- formats and shapes
def test_npy_vectors_continuous_as_given(tmp_path):
    x = traced()
    np.save(tmp_path / "v.npy", x)
    parts = {s: load_tensor_file(tmp_path / "v.npy", s) for s in ("train", "val", "test", "trainval")}
    for s, ds in parts.items():
        assert isinstance(ds, DataSet) and ds.name == "tensor_file" and ds.split == s
        assert not ds.is_discrete and ds.levels is None and ds.shape == (3,) and ds.x.dtype == torch.get_default_dtype()
        assert torch.equal(ds.model_scale(), ds.x)
    # 10 % val, 10 % test carved by a seeded permutation; every row exactly once; file order kept in each split
    assert (len(parts["train"]), len(parts["val"]), len(parts["test"])) == (32, 4, 4)
    rows = {s: parts[s].x[:, 0].long().tolist() for s in ("train", "val", "test")}
    assert sorted(sum(rows.values(), [])) == list(range(40))
    assert all(r == sorted(r) for r in rows.values())
    assert rows["train"] + rows["val"] == parts["trainval"].x[:, 0].long().tolist()
    torch.testing.assert_close(parts["train"].x, torch.as_tensor(x[rows["train"]], dtype=torch.get_default_dtype()))
    # deterministic; another split_seed gives another carving
    assert load_tensor_file(tmp_path / "v.npy", "test").x[:, 0].tolist() == parts["test"].x[:, 0].tolist()
    other = load_tensor_file(tmp_path / "v.npy", "test", split_seed=1).x[:, 0].long().tolist()
    assert other != rows["test"]
    assert len(load_tensor_file(tmp_path / "v.npy", "train", val_fraction=0.25, test_fraction=0.0)) == 30
    assert len(load_tensor_file(tmp_path / "v.npy", "train", n=5)) == 5


def test_npz_images_discrete_dequantised_like_the_digits(tmp_path):
    k = grey_images()
    np.savez(tmp_path / "d.npz", images=k)
    ds = load_tensor_file(tmp_path / "d.npz", "trainval", levels=17, test_fraction=0.2)
    assert ds.is_discrete and ds.levels == 17 and ds.shape == (1, 8, 8) and ds.x.dtype == torch.uint8
    assert len(ds) == 40 and ds.dim == 64
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    torch.testing.assert_close(ds.model_scale(generator=g1), uniform_dequantize(ds.x, 17, generator=g2), rtol=0, atol=0)
    y = ds.model_scale(dequantize=False)
    assert y.min() > -1 and y.max() < 1
    # floats holding whole numbers are accepted as discrete; more than 256 levels are stored as int64
    np.save(tmp_path / "f.npy", k.astype(np.float32))
    assert torch.equal(load_tensor_file(tmp_path / "f.npy", levels=17).x, load_tensor_file(tmp_path / "d.npz", levels=17).x)
    assert load_tensor_file(tmp_path / "f.npy", levels=1000).x.dtype == torch.int64


def test_npz_split_keys_and_a_carved_val(tmp_path):
    tr, te = traced(30), traced(7) + 100
    np.savez(tmp_path / "s.npz", train=tr, test=te)
    test = load_tensor_file(tmp_path / "s.npz", "test")
    torch.testing.assert_close(test.x, torch.as_tensor(te, dtype=torch.get_default_dtype()))
    train, val = load_tensor_file(tmp_path / "s.npz", "train"), load_tensor_file(tmp_path / "s.npz", "val")
    assert (len(train), len(val)) == (27, 3)  # val carved off train (10 %); test comes from the file, not carved
    assert sorted(train.x[:, 0].long().tolist() + val.x[:, 0].long().tolist()) == list(range(30))
    np.savez(tmp_path / "s3.npz", train=tr, val=traced(5), test=te)
    assert len(load_tensor_file(tmp_path / "s3.npz", "train")) == 30  # nothing carved
    assert len(load_tensor_file(tmp_path / "s3.npz", "trainval")) == 35
    # a named key wins over the split keys and is carved like a single array
    assert len(load_tensor_file(tmp_path / "s3.npz", "train", key="test")) == 5
    # no key, no split keys: the first array
    np.savez(tmp_path / "two.npz", a=traced(20), b=traced(10))
    assert len(load_tensor_file(tmp_path / "two.npz", "trainval", test_fraction=0.0)) == 20


def test_pt_tensor_and_dict_channels_last_and_value_range(tmp_path):
    rgb = torch.rand(12, 6, 6, 3, dtype=torch.float64) * 255  # channels-last, values in [0, 255]
    torch.save(rgb, tmp_path / "t.pt")
    ds = load_tensor_file(tmp_path / "t.pt", "trainval", channels_last=True, value_range=(0, 255), test_fraction=0.0)
    assert ds.shape == (3, 6, 6) and not ds.is_discrete
    y = ds.model_scale()
    assert y.min() >= -1 and y.max() <= 1
    # the rescaling y = 2 x / 255 - 1 and its inverse
    # as given (no value_range): the same examples, permuted to (N, C, H, W)
    x_all = load_tensor_file(tmp_path / "t.pt", "trainval", test_fraction=0.0, channels_last=True).x
    assert x_all.shape == (12, 3, 6, 6)
    assert sorted(x_all[:, 1, 2, 3].tolist()) == sorted(rgb[:, 2, 3, 1].to(x_all.dtype).tolist())
    # the rescaling y = 2 x / 255 - 1 and its inverse
    torch.testing.assert_close(ds.x, (2 * x_all.double() / 255 - 1).to(ds.x.dtype))
    torch.testing.assert_close(to_value_range(ds.x.double(), (0, 255)), x_all.double(), rtol=1e-6, atol=1e-4)
    un = load_tensor_file(tmp_path / "t.pt", "train", channels_last=True, value_range=(0, 255), centered=False)
    assert un.x.min() >= 0 and un.x.max() <= 1
    # a dict of tensors with split keys; int64 discrete data
    torch.save({"train": torch.randint(0, 4, (10, 5)), "test": torch.randint(0, 4, (3, 5))}, tmp_path / "d.pt")
    te = load_tensor_file(tmp_path / "d.pt", "test", levels=4)
    assert te.x.dtype == torch.uint8 and te.shape == (5,) and len(te) == 3


def test_load_dataset_dispatches_with_the_options(tmp_path):
    np.save(tmp_path / "g.npy", grey_images())
    a = load_dataset("tensor_file", "val", path=tmp_path / "g.npy", levels=17, split_seed=2, n=3)
    b = load_tensor_file(tmp_path / "g.npy", "val", levels=17, split_seed=2, n=3)
    assert torch.equal(a.x, b.x) and a.levels == 17 and len(a) == 3
    # the run's seed is not the carving seed
    assert torch.equal(load_dataset("tensor_file", "val", path=str(tmp_path / "g.npy"), seed=5, levels=17).x,
                       load_tensor_file(tmp_path / "g.npy", "val", levels=17).x)
    assert set(TENSOR_FILE_OPTIONS) == {"key", "levels", "value_range", "centered", "channels_last", "val_fraction",
                                        "test_fraction", "split_seed"}
    with pytest.raises(ValueError, match="apply only to 'tensor_file'"):
        load_dataset("moons", path=tmp_path / "g.npy")
    with pytest.raises(ValueError, match="levels apply only"):
        load_dataset("digits", levels=17)
    with pytest.raises(ValueError, match="unknown tensor_file option"):
        load_dataset("tensor_file", path=tmp_path / "g.npy", level=17)
    with pytest.raises(ValueError, match="path must name"):
        load_dataset("tensor_file")


# ----------------------------------------------------------------------------- errors name the field
def test_errors_name_the_field(tmp_path):
    np.save(tmp_path / "g.npy", grey_images())
    np.save(tmp_path / "v.npy", traced())
    with pytest.raises(ValueError, match="path .*no such file") as e:
        load_tensor_file(tmp_path / "missing.npy")
    assert isinstance(e.value, FileNotFoundError)
    (tmp_path / "x.csv").write_text("1,2\n")
    with pytest.raises(ValueError, match=r"path must end in one of \('.npy', '.npz', '.pt'\)"):
        load_tensor_file(tmp_path / "x.csv")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="path .* cannot be read"):
        load_tensor_file(tmp_path / "bad.npz")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="cannot be read"):
        load_tensor_file(tmp_path / "obj.npy")
    torch.save({"x": [1, 2]}, tmp_path / "list.pt")
    with pytest.raises(ValueError, match="path .* must hold a tensor or a non-empty dict"):
        load_tensor_file(tmp_path / "list.pt")
    np.save(tmp_path / "c.npy", np.ones((4, 2), dtype=np.complex64))
    with pytest.raises(ValueError, match="must hold integers or floats; got dtype complex64"):
        load_tensor_file(tmp_path / "c.npy")
    np.save(tmp_path / "b.npy", np.ones((4, 2), dtype=bool))
    with pytest.raises(ValueError, match="dtype bool"):
        load_tensor_file(tmp_path / "b.npy")
    with pytest.raises(ValueError, match="non-integer values"):
        load_tensor_file(tmp_path / "v.npy", levels=256)
    with pytest.raises(ValueError, match=r"values must lie in \[0, levels - 1\] = \[0, 9\] \(levels=10\); got \[0, 16\]"):
        load_tensor_file(tmp_path / "g.npy", levels=10)
    with pytest.raises(ValueError, match="levels must be an integer >= 2"):
        load_tensor_file(tmp_path / "g.npy", levels=1)
    with pytest.raises(ValueError, match="value_range applies to continuous data"):
        load_tensor_file(tmp_path / "g.npy", levels=17, value_range=(0, 16))
    with pytest.raises(ValueError, match="value_range must be None or a pair"):
        load_tensor_file(tmp_path / "v.npy", value_range=(1.0, 1.0))
    with pytest.raises(ValueError, match=r"values must lie in value_range \[0, 1\]"):
        load_tensor_file(tmp_path / "v.npy", value_range=(0, 1))
    np.save(tmp_path / "nan.npy", np.array([[0.0, np.nan], [1.0, 2.0]]))
    with pytest.raises(ValueError, match="non-finite"):
        load_tensor_file(tmp_path / "nan.npy")
    np.save(tmp_path / "1d.npy", np.arange(5.0))
    with pytest.raises(ValueError, match=r"must have shape \(N, D\), \(N, H, W\) or \(N, C, H, W\).*got \(5,\)"):
        load_tensor_file(tmp_path / "1d.npy")
    np.save(tmp_path / "5d.npy", np.zeros((2, 1, 1, 1, 1)))
    with pytest.raises(ValueError, match="must have shape"):
        load_tensor_file(tmp_path / "5d.npy")
    np.savez(tmp_path / "k.npz", a=traced(), b=traced())
    with pytest.raises(ValueError, match=r"key 'c' is not in .*\['a', 'b'\]"):
        load_tensor_file(tmp_path / "k.npz", key="c")
    np.savez(tmp_path / "t.npz", test=traced())
    with pytest.raises(ValueError, match="no 'train' array"):
        load_tensor_file(tmp_path / "t.npz")
    np.savez(tmp_path / "m.npz", train=traced(20, 3), val=traced(5, 4))
    with pytest.raises(ValueError, match="differ in shape"):
        load_tensor_file(tmp_path / "m.npz", "trainval")
    with pytest.raises(ValueError, match="split 'val' is empty: .*val_fraction=0"):
        load_tensor_file(tmp_path / "v.npy", "val", val_fraction=0.0)
    with pytest.raises(ValueError, match="too few to carve"):
        np.save(tmp_path / "two.npy", traced(2))
        load_tensor_file(tmp_path / "two.npy")
    with pytest.raises(ValueError, match="val_fraction must be a number in \\[0, 1\\)"):
        load_tensor_file(tmp_path / "v.npy", val_fraction=1.0)
    with pytest.raises(ValueError, match="val_fraction \\+ test_fraction must be < 1"):
        load_tensor_file(tmp_path / "v.npy", val_fraction=0.5, test_fraction=0.5)
    for field, kw in [("split", dict(split="dev")), ("channels_last", dict(channels_last=1)),
                      ("split_seed", dict(split_seed=-1)), ("n", dict(n=0)), ("key", dict(key=3))]:
        with pytest.raises(ValueError, match=field):
            load_tensor_file(tmp_path / "v.npy", **kw)


def test_integer_data_without_levels_warns(tmp_path):
    np.save(tmp_path / "g.npy", grey_images())
    with pytest.warns(UserWarning, match="set levels to dequantise"):
        ds = load_tensor_file(tmp_path / "g.npy")
    assert not ds.is_discrete and ds.x.dtype == torch.get_default_dtype() and ds.x.max() == 16
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_tensor_file(tmp_path / "g.npy", value_range=(0, 16))  # declared: no warning


def test_a_tensor_file_trains_like_a_built_in_set(tmp_path):
    """The DataSet of a file goes through the library's loss and loop like the digits (dequantised batches)."""
    from scoresde import VPSDE
    from scoresde.losses import get_loss_fn
    from scoresde.model import ScoreModel
    from scoresde.nets import MLPScoreNet
    from scoresde.train import TrainOptions, train

    np.save(tmp_path / "g.npy", grey_images(levels=5).reshape(50, 64) % 5)
    ds = load_dataset("tensor_file", "train", path=tmp_path / "g.npy", levels=5)
    model = ScoreModel(MLPScoreNet(64, hidden=16, depth=1), VPSDE(), "eps")
    prepare = lambda k, g: uniform_dequantize(k, ds.levels, generator=g)  # noqa: E731
    res = train(model, get_loss_fn(VPSDE()), ds.x, TrainOptions(n_steps=4, batch_size=8, warmup=0, log_every=2),
                tmp_path / "run", prepare=prepare, progress=False)
    assert res.step == 4 and np.isfinite(res.loss)
