"""evaluate_run on image data: FD, k-NN precision / recall with their floors, FID against a statistics file,
PNG-folder and uint8 .npz export of the samples."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from scoresde.evaluate import EvalOptions, evaluate_run
from scoresde.plots import to_uint8
from scoresde.runs import DataOptions, LoadedRun
from scoresde.sde import VPSDE

FAST_SAMPLER = {"method": "dpm_solver", "steps": 4, "order": 2}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A feature-classifier cache holding a small classifier (trained once for the module; the evaluation loads it)."""
    from scoresde.features import FeatureExtractor

    d = tmp_path_factory.mktemp("features")
    FeatureExtractor.load_or_train("digits", cache_dir=d, seed=0, epochs=8, width=16, feature_dim=64)
    return str(d)


def _noise_run(tmp_path) -> LoadedRun:
    """A 'model' whose samples are N(0, I) images: the exact score of VP-perturbed N(0, I) data is -x at every t."""
    data = DataOptions(name="digits")
    return LoadedRun(sde=VPSDE(), score_fn=lambda x, t: -x, model=None, oracle=None, shape=(1, 8, 8), data=data, seed=0,
                     run_dir=tmp_path, checkpoint=None, step=None)


def test_image_quality_and_export(tmp_path, cache):
    opts = EvalOptions(n_samples=40, batch_size=40, nll=False, feature_cache=cache,
                       export_png=True, export_npz=True).check()
    m = evaluate_run(_noise_run(tmp_path), FAST_SAMPLER, opts, tmp_path, seed=0, device="cpu", dtype=torch.float32,
                     progress=False)
    s = m["samples"]
    # noise images are far from digits; the data's own floor at the same N is much lower and realistic
    assert s["n_floor"] == 40 and s["fd"] > 5 * s["fd_floor"] >= 0
    assert s["precision"] < s["precision_floor"] and s["pr_k"] == 3
    assert 0.5 < s["precision_floor"] <= 1 and 0.3 < s["recall_floor"] <= 1
    json.dumps(m)  # metrics.json-ready
    x = torch.load(tmp_path / "samples.pt")
    pix = to_uint8(x, centered=True)
    assert s["png_dir"] == "samples_png" and s["npz"] == "samples.npz"
    pngs = sorted((tmp_path / "samples_png").glob("*.png"))
    assert len(pngs) == 40 and pngs[0].name == "000000.png"
    img = Image.open(pngs[7])
    assert img.mode == "L" and img.size == (8, 8)
    assert np.array_equal(np.asarray(img), pix[7, :, :, 0].numpy())
    with np.load(tmp_path / "samples.npz") as f:
        arr = f["arr_0"]
    assert arr.dtype == np.uint8 and arr.shape == (40, 8, 8, 1) and np.array_equal(arr, pix.numpy())


def test_to_uint8_mapping():
    y = torch.tensor([-1.0, -0.5, 0.0, 0.999, 1.0, 3.0, -7.0, float("nan")]).reshape(1, 1, 2, 4)
    # u = (y + 1) / 2 -> floor(256 u) clamped to [0, 255]; NaN -> 0
    assert to_uint8(y).flatten().tolist() == [0, 64, 128, 255, 255, 255, 0, 0]
    assert to_uint8(torch.tensor([[[[0.5]]]]), centered=False).item() == 128


def test_fid_options_are_checked_before_work(tmp_path):
    with pytest.raises(ValueError, match="fid_stats and inception_weights go together"):
        EvalOptions(fid_stats=str(tmp_path / "s.npz")).check()
    with pytest.raises(ValueError, match="fid_stats: file .* not found"):
        EvalOptions(fid_stats=str(tmp_path / "s.npz"), inception_weights=str(tmp_path / "w.pt")).check()


def test_export_needs_images(tmp_path):
    run = LoadedRun(sde=VPSDE(), score_fn=lambda x, t: -x, model=None, oracle=None, shape=(2,),
                    data=DataOptions(name="gmm"), seed=0, run_dir=tmp_path, checkpoint=None, step=None)
    with pytest.raises(ValueError, match="export_png / eval.export_npz write images"):
        evaluate_run(run, FAST_SAMPLER, EvalOptions(n_samples=4, export_npz=True), tmp_path, seed=0, device="cpu",
                     dtype=torch.float32)
    assert not (tmp_path / "samples.pt").exists()


def test_fid_against_a_statistics_file_with_user_inception(tmp_path, cache):
    """FID path end to end with a stand-in TorchScript "Inception" with NVlabs' interface (32 features, for speed)."""
    from scoresde.data import load_dataset
    from scoresde.features import InceptionFeatures, save_reference_stats

    class Stub(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(3 * 64, 32, generator=torch.Generator().manual_seed(0)) / 50)

        def forward(self, images: torch.Tensor, return_features: bool = True) -> torch.Tensor:
            return images.float().flatten(1) @ self.w

    weights = tmp_path / "inception.pt"
    torch.jit.script(Stub()).save(str(weights))
    ref = load_dataset("digits", "train").model_scale(dequantize=False)
    stats = save_reference_stats(tmp_path / "ref", ref, InceptionFeatures(weights))
    opts = EvalOptions(n_samples=40, batch_size=40, nll=False, feature_cache=cache,
                       fid_stats=str(stats), inception_weights=str(weights)).check()
    m = evaluate_run(_noise_run(tmp_path), FAST_SAMPLER, opts, tmp_path, seed=0, device="cpu", dtype=torch.float32)
    assert m["samples"]["fid"] > 0
