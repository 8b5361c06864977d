"""NCSN++ / DDPM++ / DDPM networks with score_sde_pytorch's parameter names, and the FIR resampling they use.

Golden data: /work/shared/fixtures/score_sde (made by running the reference; see its README). The
directory is found next to the repository (``<repo>/../shared/fixtures/score_sde``) or through the
environment variable SCORESDE_FIXTURES; tests that need it are skipped when it is absent.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from scoresde.nets import DDPM, NCSNpp
from scoresde.nets import fir

# --- fixtures -----------------------------------------------------------------------------------
FIXTURES = Path(os.environ.get("SCORESDE_FIXTURES") or Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "score_sde")
NAMES = ["ddpmpp_vp", "ddpmpp_deep_subvp", "ncsnpp_ve", "ddpm_vp"]
needs_fixtures = pytest.mark.skipif(
    not (FIXTURES / "full_size_keys.json").is_file(),
    reason=f"score_sde reference fixtures not found at {FIXTURES} (set SCORESDE_FIXTURES to the fixtures folder)",
)

VE_NCSNPP = dict(fir=True, progressive_input="residual", embedding_type="fourier", scale_by_sigma=True, centered=False)
FULL_SIZE = {  # key in full_size_keys.json -> (constructor, parameter count from the reference)
    "configs.vp.cifar10_ddpmpp_continuous": (lambda: NCSNpp(), 61_804_419),
    "configs.vp.cifar10_ddpmpp_deep_continuous": (lambda: NCSNpp(num_res_blocks=8), 106_632_579),
    "configs.ve.cifar10_ncsnpp_continuous": (lambda: NCSNpp(**VE_NCSNPP), 62_758_915),
    "configs.ve.cifar10_ncsnpp_deep_continuous": (lambda: NCSNpp(num_res_blocks=8, **VE_NCSNPP), 107_587_075),
    "configs.vp.ddpm.cifar10_continuous": (lambda: DDPM(), 35_218_947),
}

TINY = dict(image_size=8, nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These networks are tiny: one intra-op thread is fastest, and on a shared machine it avoids
    OpenMP threads waiting on each other (which made single small ops take ~15 ms)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def n_params(net):
    return sum(p.numel() for p in net.parameters())


def golden_kwargs(cfg: dict) -> dict:
    """Constructor keywords from a golden file's 'config' (data.centered follows the reference configs:
    False for the VE NCSN++ config, True for the VP / sub-VP ones)."""
    skip = {"name", "sde", "continuous", "beta_min", "beta_max", "ema_rate", "normalization"}
    kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in cfg.items() if k not in skip}
    if cfg["name"] == "ddpm":
        kw.pop("embedding_type", None)
    kw["centered"] = cfg["sde"] != "vesde"
    for f in ("sigma_min", "sigma_max", "fourier_scale"):
        if f in kw:
            kw[f] = float(kw[f])
    return kw


# --- FIR resampling ------------------------------------------------------------------------------
def upfirdn_by_taps(x, k, up, down, pad):
    """The definition written tap by tap: zero insertion, padding, true convolution, decimation."""
    B, C, H, W = x.shape
    u = x.new_zeros(B, C, H * up, W * up)
    u[:, :, ::up, ::up] = x
    v = F.pad(u, (pad[0], pad[1], pad[0], pad[1]))
    K = k.shape[0]
    Ho, Wo = v.shape[2] - K + 1, v.shape[3] - K + 1
    out = x.new_zeros(B, C, Ho, Wo)
    for a in range(K):
        for b in range(K):
            out += v[:, :, a : a + Ho, b : b + Wo] * k[K - 1 - a, K - 1 - b]
    return out[:, :, ::down, ::down]


@pytest.mark.parametrize("kernel", [(1, 3, 3, 1), (1, 1), (1, 2, 1), (1, 3, 3, 1, 2, 5)])
@pytest.mark.parametrize("up,down,pad", [(1, 2, (1, 1)), (2, 1, (2, 1)), (1, 1, (2, 2)), (2, 1, (1, 1)), (1, 2, (0, 1)), (2, 2, (1, 2))])
def test_upfirdn2d_and_fast_paths_match_the_definition(kernel, up, down, pad):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64)
    k = fir.setup_kernel(kernel, dtype=torch.float64)
    k = k + 0.01 * torch.arange(k.numel(), dtype=torch.float64).reshape(k.shape)  # break the symmetry: flips matter
    ref = upfirdn_by_taps(x, k, up, down, pad)
    torch.testing.assert_close(fir.upfirdn2d(x, k, up, down, pad), ref, rtol=0, atol=1e-12)
    if up == 1:
        torch.testing.assert_close(fir._fir_down(x, k, down, *pad), ref, rtol=0, atol=1e-12)
    elif down == 1:
        torch.testing.assert_close(fir._fir_up(x, k, up, *pad), ref, rtol=0, atol=1e-12)


def test_resampling_helpers_shapes_constants_and_fused_convs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    k = fir.setup_kernel((1, 3, 3, 1), dtype=torch.float64)
    assert fir.setup_kernel((1, 3, 3, 1)).sum().item() == pytest.approx(1.0)
    up, down = fir.upsample_2d(x), fir.downsample_2d(x)
    assert up.shape == (2, 4, 16, 16) and down.shape == (2, 4, 4, 4)
    torch.testing.assert_close(up, upfirdn_by_taps(x, 4 * k, 2, 1, (2, 1)), rtol=0, atol=1e-12)
    torch.testing.assert_close(down, upfirdn_by_taps(x, k, 1, 2, (1, 1)), rtol=0, atol=1e-12)
    # a constant image stays constant away from the border; kernel (1, 1) is 2x2 mean pooling
    c = torch.ones(1, 1, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(fir.upsample_2d(c)[..., 2:-2, 2:-2], torch.ones(1, 1, 12, 12, dtype=torch.float64))
    torch.testing.assert_close(fir.downsample_2d(x, (1, 1)), fir.naive_downsample_2d(x))
    torch.testing.assert_close(fir.naive_upsample_2d(x), x.repeat_interleave(2, 2).repeat_interleave(2, 3))
    # fused conv + resampling = the definition composed with an ordinary convolution
    w = torch.randn(5, 4, 3, 3, generator=g, dtype=torch.float64)
    y = fir.conv_downsample_2d(x, w)
    torch.testing.assert_close(y, F.conv2d(upfirdn_by_taps(x, k, 1, 1, (2, 2)), w, stride=2), rtol=0, atol=1e-12)
    z = fir.upsample_conv_2d(x, w)
    wt = torch.flip(w, (2, 3)).transpose(0, 1)
    torch.testing.assert_close(z, upfirdn_by_taps(F.conv_transpose2d(x, wt, stride=2), 4 * k, 1, 1, (1, 1)), rtol=0, atol=1e-12)
    assert y.shape == (2, 5, 4, 4) and z.shape == (2, 5, 16, 16)
    with pytest.raises(ValueError, match="fir_kernel"):
        fir.setup_kernel((1, -1))


# --- the reference's structure --------------------------------------------------------------------
@needs_fixtures
@pytest.mark.parametrize("config_name", list(FULL_SIZE))
def test_full_size_networks_have_the_reference_keys_shapes_and_counts(config_name):
    reference = json.loads((FIXTURES / "full_size_keys.json").read_text())[config_name]
    build, count = FULL_SIZE[config_name]
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        net = build()
    got = {"module." + k: list(v.shape) for k, v in net.state_dict().items()}
    assert list(got) == list(reference)  # same keys in the same order
    assert got == reference
    assert n_params(net) == count


@needs_fixtures
@pytest.mark.parametrize("name", NAMES)
def test_reference_state_dict_loads_strict_and_parameters_come_in_its_order(name):
    golden = torch.load(FIXTURES / f"{name}.golden.pt", weights_only=True)
    ckpt = torch.load(FIXTURES / f"{name}.pth", weights_only=True)
    cls = NCSNpp if golden["config"]["name"] == "ncsnpp" else DDPM
    net = cls(**golden_kwargs(golden["config"]))
    sd = {k.removeprefix("module."): v for k, v in ckpt["model"].items()}
    net.load_state_dict(sd, strict=True)
    assert n_params(net) == golden["n_params"]
    # our parameters() order is the reference's (the order its EMA shadow_params follow)
    trainable = [k for k, p in net.named_parameters() if p.requires_grad]
    assert trainable == [k for k in sd if k in trainable]
    shadow = ckpt["ema"]["shadow_params"]
    assert [tuple(s.shape) for s in shadow] == [tuple(sd[k].shape) for k in trainable]


# --- every option builds and runs -----------------------------------------------------------------
# each value of every option, and each progressive x progressive_input pair, at least once
COMBOS = [  # resblock_type, progressive, progressive_input, progressive_combine, fir
    ("biggan", "none", "none", "sum", False),
    ("biggan", "output_skip", "input_skip", "sum", True),
    ("biggan", "residual", "residual", "sum", True),
    ("biggan", "output_skip", "input_skip", "cat", False),
    ("ddpm", "none", "input_skip", "cat", True),
    ("ddpm", "output_skip", "residual", "sum", False),
    ("ddpm", "residual", "none", "sum", True),
    ("ddpm", "residual", "input_skip", "sum", False),
    ("biggan", "none", "residual", "cat", False),
    ("ddpm", "output_skip", "none", "sum", True),
    ("biggan", "residual", "input_skip", "cat", True),
    ("ddpm", "none", "residual", "sum", True),
]


@pytest.mark.parametrize("resblock_type,progressive,progressive_input,combine,fir_on", COMBOS)
def test_option_combinations_build_and_run(resblock_type, progressive, progressive_input, combine, fir_on):
    net = NCSNpp(**TINY, resblock_type=resblock_type, progressive=progressive, progressive_input=progressive_input,
                 progressive_combine=combine, fir=fir_on, embedding_type="fourier" if fir_on else "positional",
                 scale_by_sigma=fir_on).eval()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0.5, 20.0]) if fir_on else torch.tensor([3.0, 700.0])
    with torch.no_grad():
        out = net(x, labels)
    assert out.shape == x.shape and torch.isfinite(out).all()
    names = {type(m).__name__ for m in net.all_modules}
    assert ("Combine" in names) == (progressive_input == "input_skip")
    # the pyramids' parameter-free resamplers are not in all_modules (as in the reference)
    assert "Upsample" not in names or resblock_type == "ddpm" or progressive == "residual"


def test_output_skip_and_input_skip_module_layout():
    net = NCSNpp(**TINY, progressive="output_skip", progressive_input="input_skip", progressive_combine="cat")
    keys = list(net.state_dict())
    # level-1 down: BigGAN down block, then one Combine (1x1 conv from the 3-channel pyramid to 8 channels)
    combine = [k for k in keys if ".Conv.weight" in k]
    assert len(combine) == 1 and tuple(net.state_dict()[combine[0]].shape) == (8, 3, 1, 1)
    # output_skip ends with the last pyramid conv to 3 channels and has no separate head
    last = net.all_modules[-1]
    assert isinstance(last, torch.nn.Conv2d) and last.out_channels == 3
    assert isinstance(net.all_modules[-2], torch.nn.GroupNorm)


def test_scale_by_sigma_divides_by_the_noise_level():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, 8, generator=g)
    a = NCSNpp(**TINY, embedding_type="fourier", scale_by_sigma=True, init_scale=1.0).eval()
    b = NCSNpp(**TINY, embedding_type="fourier", scale_by_sigma=False, init_scale=1.0).eval()
    sig = torch.tensor([0.3, 7.0])
    with torch.no_grad():
        torch.testing.assert_close(a(x, sig), b(x, sig) / sig[:, None, None, None])
    # positional embedding: sigmas[labels.long()] from the descending buffer
    c = NCSNpp(**TINY, scale_by_sigma=True, init_scale=1.0, num_scales=10).eval()
    d = NCSNpp(**TINY, scale_by_sigma=False, init_scale=1.0, num_scales=10).eval()
    lab = torch.tensor([0.0, 9.0])
    assert c.sigmas[0] == pytest.approx(50.0) and c.sigmas[-1] == pytest.approx(0.01)
    with torch.no_grad():
        torch.testing.assert_close(c(x, lab), d(x, lab) / c.sigmas[[0, 9]].float()[:, None, None, None])


def test_seeded_construction_leaves_global_rng_alone_and_float64_runs():
    state = torch.get_rng_state()
    a, b = NCSNpp(**TINY, seed=3), NCSNpp(**TINY, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(next(iter(NCSNpp(**TINY, seed=4).parameters())), next(iter(a.parameters())))
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    net = DDPM(image_size=8, nf=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,)).eval()
    with torch.no_grad():
        y32 = net(x, torch.tensor([1.0, 500.0]))
        y64 = net.double()(x.double(), torch.tensor([1.0, 500.0], dtype=torch.float64))
    assert y64.dtype == torch.float64
    torch.testing.assert_close(y64.float(), y32, rtol=1e-4, atol=1e-6)


# --- validation ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        (dict(progressive="skip"), r"progressive must be one of \('none', 'output_skip', 'residual'\)"),
        (dict(progressive_input="output_skip"), r"progressive_input must be one of \('none', 'input_skip', 'residual'\)"),
        (dict(progressive_combine="max"), r"progressive_combine must be one of \('sum', 'cat'\)"),
        (dict(resblock_type="resnet"), r"resblock_type must be one of \('ddpm', 'biggan'\)"),
        (dict(embedding_type="learned"), r"embedding_type must be one of \('positional', 'fourier'\)"),
        (dict(attention_type="legacy"), r"attention_type must be one of \('ddpm',\)"),
        (dict(nonlinearity="gelu"), r"nonlinearity must be one of"),
        (dict(conv_size=5), r"conv_size must be one of \(3,\)"),
        (dict(image_size=12), r"image_size must be divisible by 2\^\(len\(ch_mult\)-1\) = 8"),
        (dict(nf=6, ch_mult=(1, 2)), r"nf and ch_mult .*GroupNorm"),
        (dict(ch_mult=()), r"ch_mult must be a non-empty sequence"),
        (dict(dropout=1.5), r"dropout must be a number in \[0, 1\)"),
        (dict(fir_kernel=()), r"fir_kernel must be"),
        (dict(sigma_min=60.0), r"sigma_min must be < sigma_max"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_field(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        NCSNpp(**kwargs)


def test_from_config_names_config_fields_and_ddpm_checks():
    ml_collections = pytest.importorskip("ml_collections")
    cfg = ml_collections.ConfigDict()
    cfg.data = dict(image_size=8, num_channels=3, centered=True)
    cfg.training = dict(continuous=True, sde="vpsde")
    cfg.model = dict(name="ncsnpp", nf=16, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[4], dropout=0.1,
                     resamp_with_conv=True, conditional=True, fir=False, fir_kernel=[1, 3, 3, 1], skip_rescale=True,
                     resblock_type="biggan", progressive="none", progressive_input="none", progressive_combine="sum",
                     attention_type="ddpm", embedding_type="positional", fourier_scale=16, init_scale=0.0,
                     scale_by_sigma=False, conv_size=3, nonlinearity="swish", sigma_min=0.01, sigma_max=50,
                     num_scales=1000, normalization="GroupNorm")
    net = NCSNpp.from_config(cfg)
    assert net.ch_mult == (1, 2) and net.nf == 16
    cfg.model.progressive = "sideways"
    with pytest.raises(ValueError, match=r"config\.model\.progressive must be one of"):
        NCSNpp.from_config(cfg)
    cfg.model.progressive = "none"
    cfg.data.image_size = 9
    with pytest.raises(ValueError, match=r"config\.data\.image_size must be divisible"):
        NCSNpp.from_config(cfg)
    cfg.data.image_size = 8
    cfg.model.embedding_type = "fourier"
    cfg.training.continuous = False
    with pytest.raises(ValueError, match=r"fourier.*training\.continuous"):
        NCSNpp.from_config(cfg)
    del cfg.model["fir"]
    with pytest.raises(ValueError, match=r"config\.model\.fir is missing"):
        NCSNpp.from_config(cfg)
    with pytest.raises(ValueError, match=r"config\.model\.name must be 'ddpm'"):
        DDPM.from_config(cfg)
    with pytest.raises(ValueError, match=r"conditional must be True"):
        DDPM(conditional=False)
    with pytest.raises(ValueError, match=r"multiple of 32"):
        DDPM(nf=16)
