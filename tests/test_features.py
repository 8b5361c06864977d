"""Feature classifier for image sample quality, Fréchet distance on its features, Inception plumbing."""

from __future__ import annotations

import warnings

import pytest
import torch

import scoresde.features as features
from scoresde.data import load_dataset
from scoresde.features import FeatureExtractor, InceptionFeatures, frechet_distance_images, image_features, train_feature_classifier

FAST = dict(epochs=8, width=16, feature_dim=64)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("features")


@pytest.fixture(scope="module")
def extractor(cache):
    return FeatureExtractor.load_or_train("digits", cache_dir=cache, seed=0, **FAST)


def test_classifier_accuracy_and_checkpoint(extractor, cache):
    assert extractor.test_accuracy > 0.90 and extractor.val_accuracy > 0.85
    path = FeatureExtractor.cache_path("digits", cache, seed=0)
    st = torch.load(path, weights_only=True)
    assert st["dataset"] == "digits" and st["arch"] == dict(in_channels=1, num_classes=10, width=16, feature_dim=64)
    assert st["test_accuracy"] == extractor.test_accuracy and st["levels"] == 17 and st["shape"] == [1, 8, 8]


def test_load_or_train_uses_the_cache(extractor, cache, monkeypatch):
    def no_training(*a, **k):
        raise AssertionError("should have loaded the cached classifier")

    monkeypatch.setattr(features, "train_feature_classifier", no_training)
    again = FeatureExtractor.load_or_train("digits", cache_dir=cache, seed=0)
    y = load_dataset("digits", "val", n=16).model_scale(generator=torch.Generator().manual_seed(0))
    assert torch.equal(again(y), extractor(y))
    assert again(y).shape == (16, 64)


def test_training_is_reproducible():
    a = train_feature_classifier("digits", epochs=1, n_train=128, width=8, feature_dim=16)
    b = train_feature_classifier("digits", epochs=1, n_train=128, width=8, feature_dim=16)
    c = train_feature_classifier("digits", epochs=1, n_train=128, width=8, feature_dim=16, seed=1)
    sa, sb, sc = a.classifier.state_dict(), b.classifier.state_dict(), c.classifier.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_frechet_distance_data_vs_noise(extractor):
    test, train = load_dataset("digits", "test"), load_dataset("digits", "train")
    fd_data = frechet_distance_images(test, train, extractor)
    noise = 2 * torch.rand(300, 1, 8, 8, generator=torch.Generator().manual_seed(0)) - 1
    fd_noise = frechet_distance_images(test, noise, extractor)
    # dequantised (continuous) test images are as close to the training set as the bin centres
    deq = test.model_scale(generator=torch.Generator().manual_seed(1))
    fd_deq = frechet_distance_images(deq, train, extractor)
    assert 0 <= fd_data < fd_noise / 10 and fd_deq < fd_noise / 10
    # integer input and its bin-centre model scale give the same features
    assert torch.allclose(image_features(test, extractor), image_features(test.model_scale(dequantize=False), extractor))


def test_bad_inputs_raise(extractor, tmp_path):
    with pytest.raises(ValueError, match="shape"):
        frechet_distance_images(torch.zeros(4, 1, 28, 28), torch.zeros(4, 1, 8, 8), extractor)
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance_images(torch.zeros(1, 1, 8, 8), torch.zeros(4, 1, 8, 8), extractor)
    with pytest.raises(ValueError, match="dataset_name"):
        FeatureExtractor.load_or_train("svhn", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="epochs"):
        train_feature_classifier("digits", epochs=0)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="corrupt"):
        FeatureExtractor.load(bad)
    with pytest.raises(FileNotFoundError, match="does not download"):
        InceptionFeatures(tmp_path / "missing.pt")


class _FakeInception(torch.nn.Module):
    """Stands in for a TorchScript Inception with the NVlabs call signature; returns the pixels it got."""

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        assert x.dtype == torch.uint8
        return x.float().flatten(1)


def test_inception_path_pixel_mapping(tmp_path):
    path = tmp_path / "fake_inception.pt"
    with warnings.catch_warnings():  # torch.jit is deprecated, but the published Inception files are TorchScript
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(_FakeInception()).save(str(path))
        inc = InceptionFeatures(path)
    k = torch.randint(0, 256, (100, 1, 4, 4), generator=torch.Generator().manual_seed(0))
    y = 2 * (k + torch.rand(k.shape, generator=torch.Generator().manual_seed(1))) / 256 - 1  # dequantised, centred
    f = inc(y)
    assert f.shape == (100, 48)
    assert torch.equal(f.reshape(100, 3, 4, 4), k.expand(-1, 3, -1, -1).float())
    # the same set in another order: distance 0 up to round-off; the grey channels are copied, so the
    # feature covariance is singular and the matrix square root loses ~sqrt(eps) relative to tr(cov)
    fd = frechet_distance_images(y, y.flip(0), inc)
    assert abs(fd) < 1e-6 * 48 * 256**2 / 12


def test_reference_stats_file_gives_the_same_distance(extractor, tmp_path):
    test, train = load_dataset("digits", "test"), load_dataset("digits", "train")
    path = features.save_reference_stats(tmp_path / "digits_train", train, extractor)
    assert path.name == "digits_train.npz"
    mu, sigma = features.load_reference_stats(path)
    assert mu.shape == (64,) and sigma.shape == (64, 64)
    direct = frechet_distance_images(test, train, extractor)
    assert features.frechet_distance_to_stats(test, path, extractor) == pytest.approx(direct, rel=1e-9, abs=1e-9)
    assert features.frechet_distance_to_stats(test, (mu, sigma), extractor) == pytest.approx(direct, rel=1e-9, abs=1e-9)


def test_reference_stats_errors_name_the_file(extractor, tmp_path):
    import numpy as np

    with pytest.raises(FileNotFoundError, match="nope.npz"):
        features.load_reference_stats(tmp_path / "nope.npz")
    np.savez(tmp_path / "bad.npz", mean=np.zeros(3))
    with pytest.raises(ValueError, match=r"bad\.npz.*lack \['mu', 'sigma'\]"):
        features.load_reference_stats(tmp_path / "bad.npz")
    np.savez(tmp_path / "dims.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    with pytest.raises(ValueError, match="2048 features but the extractor gives 64"):
        features.frechet_distance_to_stats(load_dataset("digits", "test"), tmp_path / "dims.npz", extractor)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="junk.npz.*not a readable"):
        features.load_reference_stats(tmp_path / "junk.npz")
