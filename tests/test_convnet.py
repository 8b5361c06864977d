"""ConvScoreNet: shapes on 8x8 / 28x28 / 32x32, time dependence, seeded initialisation, argument checks, training step."""

import pytest
import torch

from scoresde.losses import get_loss_fn
from scoresde.model import ScoreModel
from scoresde.nets import ConvScoreNet
from scoresde.nets.layers import variance_scaling_
from scoresde.sde import VESDE, VPSDE


def randomize_(net, seed=1):
    """Redraw every weight with unit variance scaling (undoes the near-zero init of residual/output layers)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("weight") and p.dim() > 1:
                variance_scaling_(p, 1.0, g)
    return net


@pytest.mark.parametrize(
    "kwargs, shape",
    [
        (dict(in_channels=1, image_size=8, ch=8), (3, 1, 8, 8)),
        (dict(in_channels=1, image_size=8, ch=8, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(4,)), (2, 1, 8, 8)),
        (dict(in_channels=1, image_size=28, ch=8, ch_mult=(1, 2, 2), attn_resolutions=(7,)), (2, 1, 28, 28)),
        (dict(in_channels=3, image_size=32, ch=8, ch_mult=(1, 2, 2, 2), attn_resolutions=(8,), time_embedding="fourier"),
         (2, 3, 32, 32)),
    ],
)
def test_shapes_and_initial_output(kwargs, shape):
    net = ConvScoreNet(**kwargs, dropout=0.0)
    x = torch.randn(shape)
    t = torch.rand(shape[0]) * 999
    out = net(x, t)
    assert out.shape == shape and out.dtype == x.dtype
    assert out.abs().max() < 1e-3  # the output conv starts near zero
    out = randomize_(net)(x, t)
    assert torch.isfinite(out).all() and out.std() > 1e-2


def test_other_divisible_sizes_and_float64():
    net = ConvScoreNet(ch=8, ch_mult=(1, 2), dropout=0.0).double()
    out = net(torch.randn(2, 1, 6, 10, dtype=torch.float64), torch.tensor([1.0, 500.0], dtype=torch.float64))
    assert out.shape == (2, 1, 6, 10) and out.dtype == torch.float64


def test_time_dependence_and_batch_independence():
    net = randomize_(ConvScoreNet(ch=8, dropout=0.0))
    x = torch.randn(1, 1, 8, 8).expand(4, -1, -1, -1)
    t = torch.tensor([0.0, 10.0, 500.0, 999.0])
    out = net(x, t)
    diffs = [(out[i] - out[j]).abs().max().item() for i in range(4) for j in range(i + 1, 4)]
    assert min(diffs) > 1e-3  # same image, different times: different outputs
    # each sample's output does not depend on the rest of its batch (GroupNorm, not BatchNorm)
    x2 = torch.randn(5, 1, 8, 8)
    t2 = torch.rand(5) * 999
    torch.testing.assert_close(net(x2, t2)[2:3], net(x2[2:3], t2[2:3]), rtol=1e-5, atol=1e-6)


def test_seeded_init_is_reproducible_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = ConvScoreNet(ch=8, seed=3)
    assert torch.equal(torch.get_rng_state(), before)
    b = ConvScoreNet(ch=8, seed=3)
    c = ConvScoreNet(ch=8, seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys() == sc.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_parameter_count_of_the_quickstart_width():
    # ch 32, (1, 2), one block per level: pinned so that a change of the layout is a visible change
    assert sum(p.numel() for p in ConvScoreNet().parameters()) == 151_489


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(in_channels=0), "in_channels"),
        (dict(image_size=6, ch_mult=(1, 2, 2)), "image_size"),
        (dict(ch=0), "ch"),
        (dict(ch_mult=()), "ch_mult"),
        (dict(ch_mult=(1, 0)), "ch_mult"),
        (dict(num_res_blocks=0), "num_res_blocks"),
        (dict(attn_resolutions=(4, -1)), "attn_resolutions"),
        (dict(dropout=1.0), "dropout"),
        (dict(time_embedding="learned"), "time_embedding"),
        (dict(fourier_scale=0.0), "fourier_scale"),
        (dict(num_groups=0), "num_groups"),
        (dict(seed=1.5), "seed"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ConvScoreNet(**kwargs)


def test_bad_inputs_raise():
    net = ConvScoreNet(ch=8)
    with pytest.raises(ValueError, match="in_channels"):
        net(torch.randn(2, 3, 8, 8), torch.zeros(2))
    with pytest.raises(ValueError, match="divisible"):
        net(torch.randn(2, 1, 7, 8), torch.zeros(2))
    with pytest.raises(ValueError, match="t_in"):
        net(torch.randn(2, 1, 8, 8), torch.zeros(3))


@pytest.mark.parametrize("sde, time_embedding", [(VPSDE(), "sinusoidal"), (VESDE(), "fourier")])
def test_a_training_step_reduces_nothing_to_nan(sde, time_embedding):
    model = ScoreModel(ConvScoreNet(ch=8, time_embedding=time_embedding), sde, "eps")
    loss_fn = get_loss_fn(sde)
    x0 = torch.rand(16, 1, 8, 8) * 2 - 1
    loss = loss_fn(model, x0, torch.Generator().manual_seed(0))
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert torch.isfinite(loss) and all(g is not None and torch.isfinite(g).all() for g in grads)
