"""Non-leaking noise-mixture augmentation: levels from noise_mixture, ScoreModel.conditioned, and the
conditioned loss (the network learns p_a = p * N(0, a^2) indexed by a; samplers use a = 0)."""

from __future__ import annotations

import math

import pytest
import torch

from scoresde.data.transforms import noise_mixture
from scoresde.losses import conditioned_noise_mixture, get_loss_fn
from scoresde.model import ScoreModel
from scoresde.nets import MLPScoreNet
from scoresde.nets.convnet import ConvScoreNet
from scoresde.samplers import sample
from scoresde.sde import VPSDE


def test_noise_mixture_levels_are_the_same_draws():
    y = torch.randn(500, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    plain = noise_mixture(y, 0.3, 0.05, 0.5, torch.Generator().manual_seed(1))
    aug, level = noise_mixture(y, 0.3, 0.05, 0.5, torch.Generator().manual_seed(1), return_level=True)
    assert torch.equal(plain, aug) and level.shape == (500,)
    clean = level == 0
    assert torch.equal(aug[clean], y[clean]) and not torch.equal(aug[~clean], y[~clean])
    assert float(level[~clean].min()) >= 0.05 and float(level.max()) <= 0.5
    # the fraction augmented is Binomial(500, 0.3): within 4 standard deviations
    assert abs(float((~clean).double().mean()) - 0.3) < 4 * (0.3 * 0.7 / 500) ** 0.5
    g = torch.Generator().manual_seed(2)
    state = g.get_state()
    out, lv = noise_mixture(y, 0.0, 0.05, 0.5, g, return_level=True)
    assert out is y and torch.equal(lv, torch.zeros(500)) and torch.equal(g.get_state(), state)


class _Recorder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x, t_in, **kw):
        self.seen.append(dict(kw))
        return torch.zeros_like(x)


def test_score_model_conditioned_block():
    net = _Recorder()
    model = ScoreModel(net, VPSDE())
    x, t = torch.zeros(2, 3), torch.full((2,), 0.5)
    model.score_fn(x, t)
    lv = torch.tensor([0.0, 0.2])
    with model.conditioned(aug_level=lv):
        model.eps_fn(x, t)
        with model.conditioned(extra=1):
            model(x, t)
    with pytest.raises(RuntimeError):
        with model.conditioned(aug_level=lv):
            raise RuntimeError("inside")
    model.denoise_fn(x, t)
    assert [sorted(k) for k in net.seen] == [[], ["aug_level"], ["aug_level", "extra"], []]
    assert net.seen[1]["aug_level"] is lv


def _with_live_aug_branch(net):
    """A fresh net's output layer (and so the augmentation branch's effect) starts at zero: randomise all weights."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return net


def test_conditioned_loss_is_the_base_loss_on_the_augmented_batch_with_levels():
    sde = VPSDE()
    net = _with_live_aug_branch(ConvScoreNet(aug_cond=True, ch=8, ch_mult=(1, 2), num_groups=4).eval())  # eval: no dropout
    model = ScoreModel(net, sde)
    base = get_loss_fn(sde)
    aug = conditioned_noise_mixture(base, 0.5, 0.03, 0.5)
    x0 = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    got = aug(model, x0, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    y, level = noise_mixture(x0, 0.5, 0.03, 0.5, g, return_level=True)
    with model.conditioned(aug_level=level):
        want = base(model, y, g)
    assert torch.equal(got, want)
    # the condition matters: the same batch without it gives another loss
    g = torch.Generator().manual_seed(3)
    y, level = noise_mixture(x0, 0.5, 0.03, 0.5, g, return_level=True)
    assert not torch.equal(base(model, y, g), want)
    assert model._net_kwargs == {}  # restored after the call


def test_clean_condition_equals_the_unconditioned_call_so_samplers_see_a_zero():
    net = _with_live_aug_branch(ConvScoreNet(aug_cond=True, ch=8, ch_mult=(1, 2), num_groups=4).eval())
    x, t = torch.randn(4, 1, 8, 8), torch.rand(4) * 999
    assert torch.equal(net(x, t), net(x, t, aug_level=torch.zeros(4)))
    assert not torch.equal(net(x, t), net(x, t, aug_level=torch.full((4,), 0.2)))
    model = ScoreModel(net, VPSDE())
    res = sample(model.score_fn, model.sde, (3, 1, 8, 8), method="ddim", steps=3, generator=torch.Generator().manual_seed(0))
    assert res.x.isfinite().all()


def test_conditioned_loss_refuses_bad_input():
    sde = VPSDE()
    with pytest.raises(ValueError, match="prob > 0"):
        conditioned_noise_mixture(get_loss_fn(sde), 0.0, 0.03, 0.5)
    with pytest.raises(ValueError, match="std_min must be <= std_max"):
        conditioned_noise_mixture(get_loss_fn(sde), 0.2, 0.5, 0.03)
    aug = conditioned_noise_mixture(get_loss_fn(sde), 0.2, 0.03, 0.5)
    mlp = ScoreModel(MLPScoreNet(4, hidden=8, depth=1), sde)
    with pytest.raises(ValueError, match="aug_cond=True"):
        aug(mlp, torch.zeros(2, 4), torch.Generator().manual_seed(0))


def test_cli_trains_the_conditioned_augmentation_and_refuses_it_without_augmentation(tmp_path, capsys):
    import json

    from scoresde import load
    from scoresde.cli import train_main

    common = ["train=tiny", "eval=tiny", "progress=false", "data=digits", "data.n_train=64", "data.n_eval=8",
              "model=convnet", "model.ch=8", "model.num_groups=4", "model.aug_cond=true", "eval.nll=false"]
    with pytest.raises(SystemExit) as e:
        train_main(common + ["data.noise_mixture_prob=0", f"hydra.run.dir={tmp_path / 'bad'}"])
    assert e.value.code == 2
    assert "model.aug_cond=true" in capsys.readouterr().err and not (tmp_path / "bad" / "checkpoint.pt").exists()
    run = tmp_path / "run"
    train_main(common + ["data.noise_mixture_prob=0.5", f"hydra.run.dir={run}"])
    m = json.loads((run / "metrics.json").read_text())
    assert math.isfinite(m["train"]["final_loss"]) and m["samples"]["nonfinite"] == 0
    model, _ = load(run)
    assert model.net.aug_cond and model._net_kwargs == {}
    # scoresde-sample exports the samples for external FID tools: a folder of PNGs and a uint8 .npz
    from scoresde.cli import sample_main

    out = tmp_path / "exported"
    sample_main([f"ckpt={run}", "eval=tiny", "eval.nll=false", "eval.n_samples=5", "eval.export_png=true",
                 "eval.export_npz=true", "progress=false", f"hydra.run.dir={out}"])
    s = json.loads((out / "metrics.json").read_text())["samples"]
    assert s["png_dir"] == "samples_png" and len(list((out / "samples_png").glob("*.png"))) == 5
    import numpy as np

    with np.load(out / "samples.npz") as f:
        assert f["arr_0"].shape == (5, 8, 8, 1) and f["arr_0"].dtype == np.uint8


def test_prepare_leaves_the_augmentation_to_the_conditioned_loss():
    from scoresde.runs import DataOptions, make_prepare

    data = DataOptions(name="digits", noise_mixture_prob=1.0)
    batch = torch.randint(0, 17, (32, 1, 8, 8))
    plain = make_prepare(data, 17, torch.float32)(batch, torch.Generator().manual_seed(0))
    cond = make_prepare(data, 17, torch.float32, conditioned=True)(batch, torch.Generator().manual_seed(0))
    deq = make_prepare(DataOptions(name="digits"), 17, torch.float32)(batch, torch.Generator().manual_seed(0))
    assert torch.equal(cond, deq) and not torch.equal(plain, deq)
