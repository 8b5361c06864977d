"""DiT: patchify/unpatchify, adaLN-Zero (exactly zero output at init), shapes, conditioning, presets, build and config."""

from pathlib import Path

import pytest
import torch

from scoresde import build
from scoresde.losses import get_loss_fn
from scoresde.model import ScoreModel
from scoresde.nets import DiT
from scoresde.nets.dit import PRESETS, patchify, sincos_pos_embed_2d, unpatchify
from scoresde.nets.layers import variance_scaling_
from scoresde.sde import VESDE, VPSDE

TINY = dict(hidden_size=16, depth=2, num_heads=2)


def randomize_(net, seed=1):
    """Redraw every weight with unit variance scaling (undoes the zero init of the adaLN-Zero layers)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.dim() > 1:
                variance_scaling_(p, 1.0, g)
    return net


@pytest.mark.parametrize("shape, p", [((2, 1, 8, 8), 2), ((3, 3, 12, 12), 3), ((1, 2, 8, 8), 4)])
def test_patchify_layout_and_inverse(shape, p):
    x = torch.randn(shape, dtype=torch.float64)
    tok = patchify(x, p)
    B, C, H, W = shape
    assert tok.shape == (B, (H // p) * (W // p), p * p * C)
    # token (i, j), entry (a p + b) C + c is pixel x[c, i p + a, j p + b]
    i, j, a, b, c = H // p - 1, 0, p - 1, 1 % p, C - 1
    assert tok[0, i * (W // p) + j, (a * p + b) * C + c] == x[0, c, i * p + a, j * p + b]
    assert torch.equal(unpatchify(tok, p, C, H // p, W // p), x)
    tok2 = torch.randn_like(tok)
    assert torch.equal(patchify(unpatchify(tok2, p, C, H // p, W // p), p), tok2)


def test_position_embedding_is_distinct_and_bounded():
    pe = sincos_pos_embed_2d(16, 4, 4)
    assert pe.shape == (16, 16) and pe.abs().max() <= 1
    assert torch.cdist(pe, pe).add(torch.eye(16) * 10).min() > 0.1  # 16 different positions


@pytest.mark.parametrize(
    "kwargs, shape",
    [
        (dict(**TINY), (3, 1, 8, 8)),
        (dict(**TINY, patch_size=4, time_embedding="fourier"), (2, 1, 8, 8)),
        (dict(**TINY, in_channels=3, image_size=12, patch_size=3, num_classes=10), (2, 3, 12, 12)),
    ],
)
def test_shapes_and_adaln_zero_output_is_exactly_zero_at_init(kwargs, shape):
    net = DiT(**{"in_channels": shape[1], "image_size": shape[2], **kwargs})
    x = torch.randn(shape)
    t = torch.rand(shape[0]) * 999
    out = net(x, t)
    assert out.shape == shape and out.dtype == x.dtype
    assert torch.equal(out, torch.zeros_like(out))  # adaLN-Zero: the final layer starts at exactly zero
    # and every block starts as the identity: its gates are zero, so the tokens pass through unchanged
    h = torch.randn(shape[0], net.grid**2, kwargs["hidden_size"])
    c = torch.randn(shape[0], kwargs["hidden_size"])
    assert all(torch.equal(blk(h, c), h) for blk in net.blocks)
    out = randomize_(net)(x, t)
    assert torch.isfinite(out).all() and out.std() > 1e-2


def test_float64_time_and_batch_dependence():
    net = randomize_(DiT(**TINY)).double()
    x = torch.randn(1, 1, 8, 8, dtype=torch.float64).expand(4, -1, -1, -1)
    t = torch.tensor([0.0, 10.0, 500.0, 999.0], dtype=torch.float64)
    out = net(x, t)
    assert out.dtype == torch.float64
    diffs = [(out[i] - out[j]).abs().max().item() for i in range(4) for j in range(i + 1, 4)]
    assert min(diffs) > 1e-3  # same image, different times: different outputs
    x2, t2 = torch.randn(5, 1, 8, 8, dtype=torch.float64), torch.rand(5, dtype=torch.float64) * 999
    torch.testing.assert_close(net(x2, t2)[2:3], net(x2[2:3], t2[2:3]), rtol=1e-12, atol=1e-12)


def test_class_conditioning_and_the_null_class():
    net = randomize_(DiT(**TINY, num_classes=10))
    x, t = torch.randn(3, 1, 8, 8), torch.rand(3) * 999
    null = net(x, t)
    torch.testing.assert_close(null, net(x, t, torch.full((3,), 10)))  # None == the null class (label num_classes)
    assert (net(x, t, torch.tensor([0, 1, 2])) - null).abs().max() > 1e-3
    assert net.y_embedder.weight.shape == (11, 16)
    with pytest.raises(ValueError, match="num_classes"):
        DiT(**TINY)(x, t, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="class_labels"):
        net(x, t, torch.zeros(3))


def test_seeded_init_is_reproducible_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = DiT(**TINY, num_classes=3, seed=3)
    assert torch.equal(torch.get_rng_state(), before)
    sa, sb, sc = a.state_dict(), DiT(**TINY, num_classes=3, seed=3).state_dict(), DiT(**TINY, num_classes=3, seed=4).state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_parameter_counts_of_the_presets():
    # pinned, so that a change of the layout is a visible change
    assert sum(p.numel() for p in DiT(**PRESETS["dit_tiny"]).parameters()) == 707_428
    # DiT-S/2 on 32x32x4 latents with 1000 classes: the paper's 33.0M (its table 4; it also learns Sigma: +6k)
    dit_s = DiT(**PRESETS["dit_s"], in_channels=4, image_size=32, num_classes=1000)
    assert sum(p.numel() for p in dit_s.parameters()) == 32_908_048


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(in_channels=0), "in_channels"),
        (dict(image_size=9), "image_size"),
        (dict(patch_size=0), "patch_size"),
        (dict(hidden_size=18, num_heads=4), "hidden_size"),
        (dict(hidden_size=6, num_heads=1), "hidden_size"),
        (dict(depth=0), "depth"),
        (dict(num_heads=0), "num_heads"),
        (dict(mlp_ratio=0.0), "mlp_ratio"),
        (dict(dropout=1.0), "dropout"),
        (dict(num_classes=0), "num_classes"),
        (dict(time_embedding="learned"), "time_embedding"),
        (dict(fourier_scale=float("nan")), "fourier_scale"),
        (dict(seed=1.5), "seed"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DiT(**kwargs)


def test_bad_inputs_raise():
    net = DiT(**TINY)
    with pytest.raises(ValueError, match="x must"):
        net(torch.randn(2, 3, 8, 8), torch.zeros(2))
    with pytest.raises(ValueError, match="x must"):
        net(torch.randn(2, 1, 6, 6), torch.zeros(2))
    with pytest.raises(ValueError, match="t_in"):
        net(torch.randn(2, 1, 8, 8), torch.zeros(3))


@pytest.mark.parametrize("sde, time_embedding", [(VPSDE(), "sinusoidal"), (VESDE(), "fourier")])
def test_a_training_step_gives_finite_gradients(sde, time_embedding):
    model = ScoreModel(DiT(**TINY, time_embedding=time_embedding), sde, "eps" if isinstance(sde, VPSDE) else "sigma_scaled")
    loss = get_loss_fn(sde)(model, torch.rand(8, 1, 8, 8) * 2 - 1, torch.Generator().manual_seed(0))
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    # adaLN-Zero: at init only the final layer's zero-initialised weights get a gradient through the output
    assert grads["net.final_layer.linear.weight"].abs().sum() > 0


def test_builds_through_build_net_and_a_spec():
    assert build.NETWORKS["dit"] is DiT
    net = build.build_net("dit", (1, 8, 8), seed=5, **TINY)
    assert isinstance(net, DiT) and net.in_channels == 1 and net.image_size == 8
    spec = build.model_spec(VPSDE(), "dit", dict(TINY, num_classes=None), (1, 8, 8), seed=5)
    model = build.build_model(spec)
    ref = net.state_dict()
    assert all(torch.equal(v, ref[k[len("net."):]]) for k, v in model.state_dict().items() if k.startswith("net."))
    with pytest.raises(ValueError, match="needs image data"):
        build.build_net("dit", (64,))


CONFIG_DIR = Path(build.__file__).parent / "configs" / "model"


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_configs_set_exactly_the_presets(preset):
    import yaml

    cfg = yaml.safe_load((CONFIG_DIR / f"{preset}.yaml").read_text())
    cfg.pop("defaults")
    assert cfg == PRESETS[preset]


def test_composes_and_validates_from_config():
    pytest.importorskip("hydra")
    from hydra import compose, initialize_config_module

    from scoresde.config import register_configs, to_run, validate

    register_configs()
    with initialize_config_module(config_module="scoresde.configs", version_base=None):
        cfg = compose("train", overrides=["model=dit_tiny", "data=digits", "sde=vp", "model.depth=2"])
    run = to_run(validate(cfg))
    assert run.net["name"] == "dit" and run.net["kwargs"]["depth"] == 2 and run.net["kwargs"]["hidden_size"] == 96
    net = build.build_net(run.net["name"], (1, 8, 8), **run.net["kwargs"])
    assert sum(p.numel() for p in net.parameters()) < 707_428
