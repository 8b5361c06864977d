"""Class labels through the training loop (``train(..., labels=)``) and label dropout (``losses.class_conditional``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from scoresde.losses import class_conditional, dsm_loss
from scoresde.model import ScoreModel
from scoresde.sde import VPSDE
from scoresde.train import TrainOptions, train

DT = torch.float64


class LabelNet(nn.Module):
    """A tiny vector score net with a label table of K + 1 rows (the last the null label) added to its hidden layer;
    records the labels of every call."""

    def __init__(self, k=3, d=2, hidden=16):
        super().__init__()
        self.num_classes = k
        self.l1 = nn.Linear(d + 1, hidden, dtype=DT)
        self.emb = nn.Embedding(k + 1, hidden, dtype=DT)
        self.l2 = nn.Linear(hidden, d, dtype=DT)
        self.seen = []

    def forward(self, x, t_in, class_labels=None):
        if class_labels is None:
            class_labels = torch.full((x.shape[0],), self.num_classes, dtype=torch.long)
        self.seen.append(class_labels.clone())
        h = torch.tanh(self.l1(torch.cat([x, t_in[:, None] / 1000], 1)) + self.emb(class_labels))
        return self.l2(h)


def _model(k=3, seed=0):
    torch.manual_seed(seed)
    return ScoreModel(LabelNet(k), VPSDE())


def _data(n=40):
    g = torch.Generator().manual_seed(1)
    y = torch.arange(n) % 3
    x = torch.randn(n, 2, generator=g, dtype=DT) + 2.0 * y[:, None].to(DT)
    return x, y


def test_labels_reach_the_loss_row_by_row(tmp_path):
    """Every loss call gets the labels of exactly the rows it trains on (x encodes its own label here)."""
    x, y = _data()
    seen = []

    def loss(model, x0, g, yb):
        seen.append((x0.clone(), yb.clone()))
        return dsm_loss(model, x0, g)

    train(_model(), loss, x, TrainOptions(n_steps=6, batch_size=16, log_every=3), tmp_path, labels=y, progress=False)
    assert len(seen) == 6
    for x0, yb in seen:
        rows = [int(torch.nonzero((x == r).all(1))[0]) for r in x0]
        assert torch.equal(yb, y[rows])


def test_labels_do_not_change_the_data_order_or_the_loss_draws(tmp_path):
    """A conditional loss that ignores y trains bitwise like the same loss without labels."""
    x, y = _data()
    o = TrainOptions(n_steps=8, batch_size=16, log_every=4)
    a = train(_model(), dsm_loss, x, o, tmp_path / "a", progress=False)
    b = train(_model(), lambda m, x0, g, yb: dsm_loss(m, x0, g), x, o, tmp_path / "b", labels=y, progress=False)
    for p, q in zip(a.ema.module.parameters(), b.ema.module.parameters()):
        assert torch.equal(p, q)


def test_class_conditional_resume_is_bitwise(tmp_path):
    """A crash after the checkpoint at step 4 and a resume end bitwise equal to a straight run (labels and label
    dropout draws included)."""
    x, y = _data()
    loss = class_conditional(dsm_loss, 3, p_uncond=0.3)
    o = TrainOptions(n_steps=10, batch_size=8, log_every=5, checkpoint_every=4)
    straight = _model()
    train(straight, loss, x, o, tmp_path / "a", labels=y, progress=False)
    calls = {"n": 0}

    def crashing(model, x0, g, yb):
        calls["n"] += 1
        if calls["n"] == 7:
            raise RuntimeError("simulated crash")
        return loss(model, x0, g, yb)

    with pytest.raises(RuntimeError, match="simulated"):
        train(_model(), crashing, x, o, tmp_path / "b", labels=y, progress=False)
    resumed = _model(seed=5)
    r = train(resumed, loss, x, o, tmp_path / "b", labels=y, progress=False)
    assert r.step == 10
    for p, q in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(p, q)


def test_label_dropout_rate_and_null_label():
    """With p_uncond = 0.25 the null label K replaces a binomial(n, 0.25) number of labels, and only those."""
    model = _model()
    x, y = _data(4000)
    loss = class_conditional(dsm_loss, 3, p_uncond=0.25)
    model.net.seen.clear()
    loss(model, x, torch.Generator().manual_seed(0), y)
    got = model.net.seen[-1]
    null = got == 3
    n = y.numel()
    frac = null.double().mean().item()
    assert abs(frac - 0.25) < 4 * (0.25 * 0.75 / n) ** 0.5
    assert torch.equal(got[~null], y[~null])


def test_p_uncond_zero_draws_nothing_and_keeps_labels():
    model = _model()
    x, y = _data(50)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    model.net.seen.clear()
    with model.conditioned(class_labels=y):
        a = dsm_loss(model, x, g1)
    b = class_conditional(dsm_loss, 3, p_uncond=0.0)(model, x, g2, y)
    assert torch.equal(a, b)
    assert torch.equal(model.net.seen[-1], y)


def test_model_reports_num_classes():
    assert _model(k=5).num_classes == 5
    from scoresde.nets import MLPScoreNet

    assert ScoreModel(MLPScoreNet(2), VPSDE()).num_classes is None


@pytest.mark.parametrize("kw, match", [
    (dict(num_classes=0), "num_classes"), (dict(num_classes=2.0), "num_classes"),
    (dict(num_classes=3, p_uncond=1.0), "p_uncond"), (dict(num_classes=3, p_uncond=-0.1), "p_uncond"),
])
def test_class_conditional_options_are_checked(kw, match):
    with pytest.raises(ValueError, match=match):
        class_conditional(dsm_loss, **kw)


def test_bad_labels_are_refused(tmp_path):
    x, y = _data()
    loss = class_conditional(dsm_loss, 3)
    with pytest.raises(ValueError, match="labels must be an integer tensor of shape"):
        train(_model(), loss, x, TrainOptions(n_steps=2, batch_size=8), tmp_path, labels=y[:-1], progress=False)
    with pytest.raises(ValueError, match="labels must be an integer tensor"):
        train(_model(), loss, x, TrainOptions(n_steps=2, batch_size=8), tmp_path, labels=y.double(), progress=False)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, num_classes - 1\]"):
        loss(_model(), x, None, y + 1)
    with pytest.raises(ValueError, match="built with num_classes=3"):
        class_conditional(dsm_loss, 4)(_model(), x, None, y)
    with pytest.raises(ValueError, match="needs the batch's labels"):
        loss(_model(), x, None)
