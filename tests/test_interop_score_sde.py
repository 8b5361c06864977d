"""scoresde.interop.score_sde.load: score_sde_pytorch checkpoints -> (ScoreModel, SDE).

Golden outputs come from running the reference on the fixtures' checkpoints
(/work/shared/fixtures/score_sde, see its README; found next to the repository or through the
environment variable SCORESDE_FIXTURES; the tests skip when it is absent). Accuracy: max abs error
over max abs value <= 1e-4 (the reference and these networks agree to float32 round-off, ~1e-5).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ml_collections = pytest.importorskip("ml_collections")

from scoresde.interop import score_sde  # noqa: E402
from scoresde.interop.score_sde import ScoreSDEModel, load  # noqa: E402
from scoresde.model import ScoreModel  # noqa: E402
from scoresde.nets import DDPM, NCSNpp  # noqa: E402
from scoresde.sde import VESDE, SubVPSDE, VPSDE  # noqa: E402

FIXTURES = Path(os.environ.get("SCORESDE_FIXTURES") or Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "score_sde")
NAMES = ["ddpmpp_vp", "ddpmpp_deep_subvp", "ncsnpp_ve", "ddpm_vp"]
CONFIG_FILE = Path(__file__).resolve().parent / "data" / "score_sde" / "configs" / "ve" / "ncsnpp_small_continuous.py"
TOL = 1e-4

pytestmark = pytest.mark.skipif(
    not all((FIXTURES / f"{n}.pth").is_file() for n in NAMES),
    reason=f"score_sde reference fixtures not found at {FIXTURES} (set SCORESDE_FIXTURES to the fixtures folder)",
)

_cache: dict = {}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These networks are tiny: one intra-op thread is fastest, and on a shared machine it avoids
    OpenMP threads waiting on each other (which made single small ops take ~15 ms)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def golden(name):
    if name not in _cache:
        _cache[name] = torch.load(FIXTURES / f"{name}.golden.pt", weights_only=True)
    return _cache[name]


def checkpoint(name):
    key = ("ckpt", name)
    if key not in _cache:
        _cache[key] = torch.load(FIXTURES / f"{name}.pth", weights_only=True)
    return _cache[key]


def config_for(name, **training):
    """A score_sde ConfigDict from the golden's 'config' (data.centered as in the reference configs:
    False for VE NCSN++, True for the VP / sub-VP ones)."""
    c = golden(name)["config"]
    cfg = ml_collections.ConfigDict()
    cfg.model = {k: v for k, v in c.items() if k not in ("image_size", "num_channels", "sde", "continuous")}
    cfg.data = dict(image_size=c["image_size"], num_channels=c["num_channels"], centered=c["sde"] != "vesde")
    cfg.training = dict(sde=c["sde"], continuous=c["continuous"])
    cfg.training.update(training)
    return cfg


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


# --- the golden outputs -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_load_matches_reference_raw_output_and_score(name):
    g = golden(name)
    model, sde = load(FIXTURES / f"{name}.pth", config_for(name))
    assert isinstance(model, ScoreModel) and not model.training and model.continuous
    expected_sde = {"vpsde": VPSDE, "subvpsde": SubVPSDE, "vesde": VESDE}[g["config"]["sde"]]
    assert type(sde) is expected_sde and model.sde is sde and sde.N == 1000
    assert isinstance(model.net, NCSNpp if g["config"]["name"] == "ncsnpp" else DDPM)
    assert sum(p.numel() for p in model.net.parameters()) == g["n_params"]
    with torch.no_grad():
        torch.testing.assert_close(model.net_time(g["t"]), g["labels"], rtol=1e-6, atol=0)
        raw = model.net(g["x"], g["labels"])
        score = model.score_fn(g["x"], g["t"])
        forward = model(g["x"], g["t"])
    assert rel_err(raw, g["raw"]) <= TOL
    assert rel_err(forward, g["raw"]) <= TOL
    assert rel_err(score, g["score"]) <= TOL


@pytest.mark.parametrize("name", ["ddpmpp_vp", "ncsnpp_ve"])
def test_ema_weights_are_used_and_raw_weights_differ(name):
    g = golden(name)
    ckpt = checkpoint(name)
    raw_model, _ = load(FIXTURES / f"{name}.pth", config_for(name), ema=False)
    ema_model, _ = load(ckpt, config_for(name), ema=True)  # an already-loaded dict works too
    # ema=False holds exactly the checkpoint's 'model' weights
    for k, v in raw_model.net.state_dict().items():
        assert torch.equal(v, ckpt["model"]["module." + k])
    # ema=True: the trainable parameters are the shadow params, in order; the fixed Fourier W is the raw one
    trainable = [p for p in ema_model.net.parameters() if p.requires_grad]
    assert len(trainable) == len(ckpt["ema"]["shadow_params"])
    assert all(torch.equal(p, s) for p, s in zip(trainable, ckpt["ema"]["shadow_params"]))
    with torch.no_grad():
        out_raw = raw_model.net(g["x"], g["labels"])
        out_ema = ema_model.net(g["x"], g["labels"])
    assert rel_err(out_ema, g["raw"]) <= TOL
    assert rel_err(out_raw, g["raw"]) > 0.05  # swapping EMA and raw weights would fail the golden test


def test_config_from_a_score_sde_style_py_file():
    sentinel = type(sys)("configs")  # a foreign 'configs' package must neither shadow nor be clobbered
    sys.modules["configs"] = sentinel
    try:
        model, sde = load(FIXTURES / "ncsnpp_ve.pth", CONFIG_FILE)
        assert sys.modules["configs"] is sentinel
    finally:
        del sys.modules["configs"]
    assert isinstance(sde, VESDE) and model.net.embedding_type == "fourier" and model.net.fir
    g = golden("ncsnpp_ve")
    with torch.no_grad():
        assert rel_err(model.score_fn(g["x"], g["t"]), g["score"]) <= TOL
    assert score_sde.load_config(CONFIG_FILE).model.nf == 16


def test_device_argument_and_unprefixed_state_dict():
    ckpt = dict(checkpoint("ddpm_vp"))
    ckpt["model"] = {k.removeprefix("module."): v for k, v in ckpt["model"].items()}  # saved without DataParallel
    model, _ = load(ckpt, config_for("ddpm_vp"), device="cpu")
    assert next(model.net.parameters()).device.type == "cpu"
    g = golden("ddpm_vp")
    with torch.no_grad():
        assert rel_err(model.net(g["x"], g["labels"]), g["raw"]) <= TOL


# --- discrete-time conventions -------------------------------------------------------------------------
def test_discrete_vp_follows_the_reference_score_fn():
    """training.continuous=False (DDPM): labels = t (N-1) unrounded, std = sqrt(1 - alpha_bar[floor(t (N-1))])."""
    g = golden("ddpm_vp")
    model, sde = load(FIXTURES / "ddpm_vp.pth", config_for("ddpm_vp", continuous=False))
    assert isinstance(model, ScoreSDEModel) and not model.continuous
    t = torch.tensor([0.0104, 0.3707, 0.9999])  # off the grid i / 999
    labels = t * 999
    with torch.no_grad():
        net_out = model.net(g["x"], labels)
        std = torch.sqrt(1.0 - sde.alphas_cumprod[labels.long()]).float()
        expected = -net_out / std[:, None, None, None]
        got = model.score_fn(g["x"], t)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)
        # scoresde's own discrete ScoreModel rounds the step: different off the grid, equal on it
        plain = ScoreModel(model.net, sde, parameterization="eps", continuous=False)
        assert rel_err(plain.score_fn(g["x"], t), expected) > 1e-3
        grid = torch.tensor([10.0, 370.0, 998.0]) / 999
        torch.testing.assert_close(plain.score_fn(g["x"], grid), model.score_fn(g["x"], grid), rtol=1e-5, atol=1e-6)


def test_discrete_ve_and_sub_vp_time_inputs():
    model, sde = load(FIXTURES / "ddpm_vp.pth", config_for("ddpm_vp", sde="vesde", continuous=False))
    assert isinstance(sde, VESDE) and model.parameterization == "score"
    t = torch.tensor([0.0, 0.25, 1.0])
    torch.testing.assert_close(model.net_time(t), torch.round((1 - t) * 999))  # index into descending sigmas
    model, sde = load(FIXTURES / "ddpmpp_deep_subvp.pth", config_for("ddpmpp_deep_subvp", continuous=False))
    assert isinstance(sde, SubVPSDE) and model.continuous  # the reference always feeds sub-VP 999 t
    torch.testing.assert_close(model.net_time(t), 999 * t)


# --- errors --------------------------------------------------------------------------------------------
def test_missing_and_unexpected_keys_are_listed_with_counts():
    ckpt = dict(checkpoint("ddpmpp_vp"))
    sd = dict(ckpt["model"])
    dropped = [k for k in sd if "all_modules.5." in k]
    for k in dropped:
        del sd[k]
    sd["module.extra.weight"] = torch.zeros(1)
    ckpt["model"] = sd
    with pytest.raises(ValueError) as info:
        load(ckpt, config_for("ddpmpp_vp"), ema=False)
    msg = str(info.value)
    assert f"{len(dropped)} missing key(s)" in msg and dropped[0].removeprefix("module.") in msg
    assert "1 unexpected key(s)" in msg and "extra.weight" in msg
    # a network built from another config does not fit either
    with pytest.raises(ValueError, match=r"missing key\(s\)|unexpected key\(s\)"):
        load(FIXTURES / "ddpmpp_vp.pth", config_for("ddpmpp_deep_subvp"))


def test_shape_mismatch_names_the_key_and_both_shapes():
    ckpt = dict(checkpoint("ddpmpp_vp"))
    sd = dict(ckpt["model"])
    key = "module.all_modules.0.weight"
    sd[key] = torch.zeros(64, 7)
    ckpt["model"] = sd
    want = tuple(checkpoint("ddpmpp_vp")["model"][key].shape)
    with pytest.raises(ValueError, match=rf"all_modules\.0\.weight: checkpoint \(64, 7\) vs network \({want[0]}, {want[1]}\)"):
        load(ckpt, config_for("ddpmpp_vp"))


def test_files_that_are_not_score_sde_checkpoints(tmp_path):
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not a score_sde checkpoint"):
        load(text, config_for("ddpm_vp"))
    tensor = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), tensor)
    with pytest.raises(TypeError, match="not a score_sde checkpoint.*got Tensor"):
        load(tensor, config_for("ddpm_vp"))
    other = tmp_path / "other.pth"
    torch.save({"state_dict": {}, "epoch": 3}, other)
    with pytest.raises(ValueError, match=r"no 'model' entry.*'state_dict'"):
        load(other, config_for("ddpm_vp"))
    no_ema = dict(checkpoint("ddpm_vp"))
    del no_ema["ema"]
    with pytest.raises(ValueError, match="ema=False"):
        load(no_ema, config_for("ddpm_vp"))
    short_ema = dict(checkpoint("ddpm_vp"))
    short_ema["ema"] = dict(short_ema["ema"], shadow_params=short_ema["ema"]["shadow_params"][:-1])
    with pytest.raises(ValueError, match="shadow_params has 133 tensors but the network has 134"):
        load(short_ema, config_for("ddpm_vp"))
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "absent.pth", config_for("ddpm_vp"))


def test_bad_config_values_name_the_field():
    cfg = config_for("ddpm_vp", sde="edm")
    with pytest.raises(ValueError, match=r"config\.training\.sde must be one of \('vpsde', 'subvpsde', 'vesde'\)"):
        load(FIXTURES / "ddpm_vp.pth", cfg)
    cfg = config_for("ddpm_vp")
    cfg.model.name = "ncsnv2"
    with pytest.raises(ValueError, match=r"config\.model\.name must be one of \('ncsnpp', 'ddpm'\)"):
        load(FIXTURES / "ddpm_vp.pth", cfg)
    cfg = config_for("ncsnpp_ve")
    cfg.model.progressive_input = "pyramid"
    with pytest.raises(ValueError, match=r"config\.model\.progressive_input must be one of"):
        load(FIXTURES / "ncsnpp_ve.pth", cfg)
    cfg = config_for("ddpm_vp")
    cfg.model.num_scales = 10  # VPSDE needs N > beta_max = 20
    with pytest.raises(ValueError, match=r"config\.model\.num_scales"):
        load(FIXTURES / "ddpm_vp.pth", cfg)
    with pytest.raises(TypeError, match="config must be"):
        load(FIXTURES / "ddpm_vp.pth", 42)
