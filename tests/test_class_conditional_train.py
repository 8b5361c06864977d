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


@pytest.mark.slow
def test_null_label_reproduces_an_unconditional_model(tmp_path):
    """A class-conditional MLP trained with label dropout 0.5 on the gmm (5 components = 5 classes), sampled with the
    null label, draws what an unconditional MLP trained on the same data draws: both at the data's MMD^2 floor and at
    each other's (N = 1000, z = MMD^2 / sd of data-vs-data MMD^2 < 5). The unconditional model gets as many steps as
    the null branch sees examples (half of the conditional run's). Measured (loaded machine, N = 2000): null vs data
    z -0.7, unconditional vs data 2.9, null vs unconditional 4.7."""
    from scoresde.build import build_net
    from scoresde.data import default_gmm, load_dataset
    from scoresde.losses import get_loss_fn
    from scoresde.metrics import median_bandwidth, mmd2_unbiased
    from scoresde.samplers import model_label_score, sample

    ds = load_dataset("gmm", "train")
    sde = VPSDE()

    def opts(n):
        return TrainOptions(n_steps=n, batch_size=256, lr=2e-3, warmup=100, ema_rate=0.999, log_every=n,
                            lr_schedule="cosine", lr_final_ratio=0.05)

    cond = ScoreModel(build_net("mlp", (2,), seed=0, hidden=128, depth=2, num_classes=5), sde)
    r1 = train(cond, class_conditional(get_loss_fn(sde), 5, p_uncond=0.5), ds.x, opts(5000), tmp_path / "c",
               labels=ds.labels, progress=False)
    unc = ScoreModel(build_net("mlp", (2,), seed=0, hidden=128, depth=2), sde)
    r2 = train(unc, get_loss_fn(sde), ds.x, opts(2500), tmp_path / "u", progress=False)
    cs = model_label_score(r1.ema.module)
    n = 1000

    def null_score(x, t):
        return cs(x, t, torch.full((x.shape[0],), 5))

    g = [torch.Generator().manual_seed(s) for s in (1, 2)]
    x_null = sample(null_score, sde, (n, 2), method="dpm_solver", steps=20, generator=g[0]).x
    x_unc = sample(r2.ema.module.score_fn, sde, (n, 2), method="dpm_solver", steps=20, generator=g[1]).x
    gm = default_gmm(2)
    data = [gm.sample(n, torch.Generator().manual_seed(100 + i), dtype=torch.float32) for i in range(11)]
    bw = [median_bandwidth(data[0], data[1]) * c for c in (0.25, 0.5, 1.0, 2.0, 4.0)]
    sd = float(torch.stack([mmd2_unbiased(data[0], d, bw) for d in data[1:]]).std())
    z = {k: float(mmd2_unbiased(a, b, bw)) / sd for k, (a, b) in
         {"null-data": (x_null, data[0]), "unc-data": (x_unc, data[0]), "null-unc": (x_null, x_unc)}.items()}
    assert max(z.values()) < 5, z


def test_guided_score_fn_is_classifier_free_guidance_of_the_model():
    """``model.guided_score_fn(y, w)``: w = 0 is the conditional score bitwise, w > 0 is (1 + w) s_y - w s_null,
    ``y = K`` the null label's score; guidance with the null label is refused."""
    torch.manual_seed(0)
    model = _model()
    with torch.no_grad():
        model.net.emb.weight.normal_()
    x, t = torch.randn(6, 2, dtype=DT), torch.rand(6, dtype=DT) * 0.9 + 0.05
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    with model.conditioned(class_labels=y):
        s_y = model.score_fn(x, t)
    with model.conditioned(class_labels=torch.full((6,), 3)):
        s_null = model.score_fn(x, t)
    assert torch.equal(model.guided_score_fn(y)(x, t), s_y)
    assert torch.allclose(model.guided_score_fn(y, 2.0)(x, t), 3 * s_y - 2 * s_null, rtol=1e-12, atol=1e-12)
    assert torch.equal(model.guided_score_fn(3)(x, t), s_null)
    assert torch.equal(model.guided_score_fn(torch.full((6,), 3))(x, t), s_null)
    with pytest.raises(ValueError, match="null label: guidance must be 0"):
        model.guided_score_fn(3, 1.0)
    with pytest.raises(ValueError, match="num_classes is None"):
        from scoresde.nets import MLPScoreNet

        ScoreModel(MLPScoreNet(2), VPSDE()).guided_score_fn(0)
