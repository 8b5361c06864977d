"""Score networks: shapes, parameter counts derived by hand, time-embedding properties, dtype, validation."""

import math

import pytest
import torch

from scoresde.nets import GaussianFourierEmbedding, MLPScoreNet, SinusoidalEmbedding, UNet, group_count
from scoresde.nets.layers import variance_scaling_


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def randomize_(net, seed=1):
    """Redraw every weight with unit variance scaling (undoes the near-zero init of residual/output layers)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("weight") and p.dim() > 1:
                variance_scaling_(p, 1.0, g)
    return net


# --- time embeddings --------------------------------------------------------------------------
def test_sinusoidal_embedding_values_and_properties():
    emb = SinusoidalEmbedding(8, max_period=10000)
    t = torch.tensor([0.0, 1.0, 3.5, 999.0], dtype=torch.float64)
    e = emb(t)
    assert e.shape == (4, 8) and e.dtype == torch.float64
    # frequencies w_k = 10000^(-k/3), k = 0..3: sin block then cos block
    w = torch.tensor([10000 ** (-k / 3) for k in range(4)], dtype=torch.float64)
    torch.testing.assert_close(e[:, :4], torch.sin(t[:, None] * w), rtol=0, atol=1e-12)
    torch.testing.assert_close(e[:, 4:], torch.cos(t[:, None] * w), rtol=0, atol=1e-12)
    # sin^2 + cos^2 = 1 per frequency, so every embedding has squared norm dim / 2
    torch.testing.assert_close(e.pow(2).sum(1), torch.full((4,), 4.0, dtype=torch.float64))
    # integer steps are accepted, odd dims are zero-padded
    e_int = SinusoidalEmbedding(7)(torch.tensor([0, 5]))
    assert e_int.shape == (2, 7) and torch.all(e_int[:, -1] == 0)
    # distinct integer steps get distinct embeddings (the lowest frequency separates them)
    steps = SinusoidalEmbedding(64)(torch.arange(1000, dtype=torch.float64))
    d = torch.cdist(steps, steps) + torch.eye(1000, dtype=torch.float64)
    assert d.min() > 1e-3


def test_gaussian_fourier_embedding_buffer_seed_and_log_input():
    emb = GaussianFourierEmbedding(2048, scale=16.0, seed=3)
    assert n_params(emb) == 0 and "W" in emb.state_dict()
    W = emb.W
    # W ~ N(0, 16^2): sample std within 5 standard errors (se of a std ~ sigma / sqrt(2n))
    n = W.numel()
    assert abs(W.std().item() - 16.0) < 5 * 16.0 / math.sqrt(2 * n)
    assert abs(W.mean().item()) < 5 * 16.0 / math.sqrt(n)
    assert torch.equal(GaussianFourierEmbedding(2048, seed=3).W, W)
    assert not torch.equal(GaussianFourierEmbedding(2048, seed=4).W, W)
    # log_input=True embeds log t: same numbers as log_input=False on log t
    e_log = GaussianFourierEmbedding(16, seed=0, log_input=True).double()
    e_lin = GaussianFourierEmbedding(16, seed=0, log_input=False).double()
    t = torch.tensor([0.01, 0.5, 50.0], dtype=torch.float64)
    torch.testing.assert_close(e_log(t), e_lin(torch.log(t)))
    W64 = e_lin.W.to(torch.float64)
    torch.testing.assert_close(e_lin(t)[:, :8], torch.sin(2 * math.pi * t[:, None] * W64))
    # t_in = 0 (discrete step 0) stays finite
    assert torch.isfinite(e_log(torch.zeros(2, dtype=torch.float64))).all()
    # the buffer follows .to()
    assert e_log.W.dtype == torch.float64


def test_embedding_validation():
    with pytest.raises(ValueError, match="dim"):
        SinusoidalEmbedding(1)
    with pytest.raises(ValueError, match="scale"):
        GaussianFourierEmbedding(8, scale=-1.0)
    with pytest.raises(ValueError, match="t_in"):
        SinusoidalEmbedding(8)(torch.zeros(3, 1))


# --- MLP ---------------------------------------------------------------------------------------
def mlp_param_count(d, H, depth, E):
    lin = lambda i, o: i * o + o  # noqa: E731
    return lin(E, H) + lin(H, H) + lin(d, H) + depth * 3 * lin(H, H) + lin(H, d)


@pytest.mark.parametrize("kind", ["fourier", "sinusoidal"])
def test_mlp_shapes_params_dtype_and_time_dependence(kind):
    net = MLPScoreNet(3, hidden=32, depth=2, time_embedding=kind, embed_dim=16).double()
    assert n_params(net) == mlp_param_count(3, 32, 2, 16)
    x = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    t = torch.linspace(0.0, 999.0, 5, dtype=torch.float64)
    out = net(x, t)
    assert out.shape == (5, 3) and out.dtype == torch.float64
    # near-zero residual and output layers at initialisation; once redrawn the output depends on t
    assert out.abs().max() < 1e-4
    a = randomize_(net)(x, t)
    b = net(x, t + 5.0)
    assert (a - b).abs().max() > 1e-3
    # every parameter receives a gradient (all modules are on the path)
    a.sum().backward()
    assert all(p.grad is not None for p in net.parameters())


def test_mlp_seed_determinism_global_rng_and_validation():
    state = torch.random.get_rng_state()
    n1, n2, n3 = MLPScoreNet(2, hidden=16, seed=7), MLPScoreNet(2, hidden=16, seed=7), MLPScoreNet(2, hidden=16, seed=8)
    assert torch.equal(torch.random.get_rng_state(), state)  # construction does not touch the global RNG
    for p, q in zip(n1.parameters(), n2.parameters()):
        assert torch.equal(p, q)
    assert not torch.equal(n1.inp.weight, n3.inp.weight)
    net = MLPScoreNet(2, hidden=16)
    with pytest.raises(ValueError, match="x must have shape"):
        net(torch.zeros(4, 3), torch.zeros(4))
    with pytest.raises(ValueError, match="t_in"):
        net(torch.zeros(4, 2), torch.zeros(3))
    with pytest.raises(ValueError, match="time_embedding"):
        MLPScoreNet(2, time_embedding="learned")
    with pytest.raises(ValueError, match="dropout"):
        MLPScoreNet(2, dropout=1.5)


# --- U-Net -------------------------------------------------------------------------------------
def unet_param_count(C, ch, ch_mult, nrb, attn_levels, updown, with_conv, embed):
    """Independent count of the DDPM++ layout described in scoresde/nets/unet.py."""
    conv = lambda i, o, k: i * o * k * k + o  # noqa: E731
    lin = lambda i, o: i * o + o  # noqa: E731
    gn = lambda c: 2 * c  # noqa: E731
    T = 4 * ch
    res = lambda i, o, resample=False: gn(i) + conv(i, o, 3) + lin(T, o) + gn(o) + conv(o, o, 3) + (  # noqa: E731
        conv(i, o, 1) if (i != o or resample) else 0
    )
    att = lambda c: gn(c) + 4 * conv(c, c, 1)  # noqa: E731
    E = ch if embed == "sinusoidal" else 2 * ch
    total = lin(E, T) + lin(T, T) + conv(C, ch, 3)
    skips, c = [ch], ch
    for lvl, mult in enumerate(ch_mult):
        for _ in range(nrb):
            total += res(c, ch * mult) + (att(ch * mult) if lvl in attn_levels else 0)
            c = ch * mult
            skips.append(c)
        if lvl < len(ch_mult) - 1:
            total += res(c, c, True) if updown else (conv(c, c, 3) if with_conv else 0)
            skips.append(c)
    total += 2 * res(c, c) + att(c)
    for lvl in reversed(range(len(ch_mult))):
        for _ in range(nrb + 1):
            total += res(c + skips.pop(), ch * ch_mult[lvl])
            c = ch * ch_mult[lvl]
        total += att(c) if lvl in attn_levels else 0
        if lvl > 0:
            total += res(c, c, True) if updown else (conv(c, c, 3) if with_conv else 0)
    return total + gn(c) + conv(c, C, 3)


def test_unet_tiny_shapes_params_float64_and_gradients():
    net = UNet(in_channels=1, image_size=8, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0)
    assert n_params(net) == unet_param_count(1, 8, (1, 2), 1, {1}, True, True, "sinusoidal")
    net = net.double()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([0.0, 10.0, 999.0], dtype=torch.float64)
    out = net(x, t)
    assert out.shape == x.shape and out.dtype == torch.float64 and torch.isfinite(out).all()
    # fully convolutional: any size divisible by 2^(len(ch_mult)-1) works (here 8 x 12)
    assert net(torch.randn(2, 1, 8, 12, generator=g, dtype=torch.float64), t[:2]).shape == (2, 1, 8, 12)
    out = randomize_(net)(x, t)
    assert (out - net(x, t + 7.0)).abs().max() > 1e-4  # time injection reaches the output
    out.square().sum().backward()
    assert all(p.grad is not None for p in net.parameters())


@pytest.mark.parametrize("updown,with_conv,embed", [(False, True, "fourier"), (False, False, "sinusoidal")])
def test_unet_variants_param_count_and_shapes(updown, with_conv, embed):
    kw = dict(in_channels=3, image_size=16, ch=4, ch_mult=(1, 2, 1), num_res_blocks=2, attn_resolutions=(8,),
              resblock_updown=updown, resamp_with_conv=with_conv, time_embedding=embed)
    net = UNet(**kw)  # ch = 4 < num_groups = 32: group count adapts
    assert n_params(net) == unet_param_count(3, 4, (1, 2, 1), 2, {1}, updown, with_conv, embed)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    assert net(x, torch.tensor([0.02, 30.0])).shape == x.shape


def test_unet_paper_size_parameter_count():
    """DDPM++ cont. (ch 128, ch_mult (1,2,2,2), 4 res blocks, attention at 16): the paper's ~62M."""
    with torch.device("meta"):  # count without allocating or running
        net = UNet(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=4, attn_resolutions=(16,))
    n = n_params(net)
    assert n == unet_param_count(3, 128, (1, 2, 2, 2), 4, {1}, True, True, "sinusoidal")
    assert abs(n - 62e6) / 62e6 < 0.01


def test_group_count_adapts():
    assert group_count(128, 32) == 32
    assert group_count(256, 32) == 32
    assert group_count(8, 32) == 2
    assert group_count(12, 32) == 3
    assert group_count(3, 32) == 1
    for c in range(1, 300):
        k = group_count(c, 32)
        assert c % k == 0 and 1 <= k <= 32


def test_unet_validation():
    with pytest.raises(ValueError, match="image_size must be divisible"):
        UNet(image_size=30, ch=8, ch_mult=(1, 2, 2))
    net = UNet(in_channels=1, image_size=8, ch=4, ch_mult=(1, 2, 2), num_res_blocks=1)
    with pytest.raises(ValueError, match="divisible by 2"):
        net(torch.zeros(1, 1, 8, 6), torch.zeros(1))
    with pytest.raises(ValueError, match="in_channels"):
        net(torch.zeros(1, 3, 8, 8), torch.zeros(1))
    with pytest.raises(ValueError, match="t_in"):
        net(torch.zeros(2, 1, 8, 8), torch.zeros(1))
    with pytest.raises(ValueError, match="ch_mult"):
        UNet(ch_mult=())
    with pytest.raises(ValueError, match="dropout"):
        UNet(dropout=-0.1)
    with pytest.raises(ValueError, match="time_embedding"):
        UNet(in_channels=1, image_size=8, ch=4, ch_mult=(1,), time_embedding="none")


def test_attention_block_matches_formula():
    from scoresde.nets.unet import AttnBlock

    g = torch.Generator().manual_seed(0)
    blk = randomize_(AttnBlock(8, skip_rescale=True, num_groups=32, g=g)).double()
    x = torch.randn(2, 8, 4, 3, generator=g, dtype=torch.float64)
    h = blk.norm(x)
    q, k, v = (p(h).flatten(2) for p in (blk.q, blk.k, blk.v))  # (B, C, HW)
    w = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / math.sqrt(8), dim=-1)
    ref = (x + blk.out(torch.einsum("bij,bcj->bci", w, v).reshape(x.shape))) / math.sqrt(2)
    torch.testing.assert_close(blk(x), ref, rtol=1e-12, atol=1e-12)
