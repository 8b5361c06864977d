"""Noise-conditional classifiers (scoresde.classifier, scoresde.nets.classifier): the loss is the cross-entropy at
the right x_t, a tiny classifier on a 2-D Gaussian mixture approaches the exact posterior p_t(y | x_t) (the oracle's
responsibilities), exact resume and the checkpoint round trip of the app, validation of the options."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.nn import functional as F

from scoresde import SubVPSDE, VESDE, VPSDE
from scoresde.checkpoint import load_checkpoint, save_checkpoint
from scoresde.classifier import (
    ClassifierOptions, NoiseConditionalClassifier, build_classifier, classifier_accuracy, classifier_loss,
    classifier_spec, load_classifier, run_train_classifier,
)
from scoresde.nets import ConvClassifier, MLPClassifier
from scoresde.oracle import GaussianMixture
from scoresde.train import TrainOptions, train

F64 = torch.float64


# --- the networks ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_networks_give_logits_that_depend_on_time(dtype):
    g = torch.Generator().manual_seed(0)
    conv = ConvClassifier(in_channels=1, image_size=8, num_classes=10, ch=8, seed=1).to(dtype)
    mlp = MLPClassifier(dim=64, num_classes=10, hidden=16, seed=1).to(dtype)
    x = torch.randn(5, 1, 8, 8, generator=g, dtype=dtype)
    for net in (conv, mlp):
        a, b = net(x, torch.full((5,), 10.0, dtype=dtype)), net(x, torch.full((5,), 900.0, dtype=dtype))
        assert a.shape == (5, 10) and a.dtype == dtype and torch.isfinite(a).all()
        assert not torch.allclose(a, b)  # the time embedding reaches the logits
        torch.testing.assert_close(net(x[:2], torch.full((2,), 10.0, dtype=dtype)), a[:2])  # per sample (no batch statistics)
    torch.testing.assert_close(mlp(x.reshape(5, 64), torch.full((5,), 10.0, dtype=dtype)), mlp(x, torch.full((5,), 10.0, dtype=dtype)))


def test_networks_refuse_bad_shapes_and_arguments():
    conv = ConvClassifier(ch=8, ch_mult=(1, 2))
    with pytest.raises(ValueError, match="in_channels"):
        conv(torch.zeros(2, 3, 8, 8), torch.zeros(2))
    with pytest.raises(ValueError, match="t_in"):
        conv(torch.zeros(2, 1, 8, 8), torch.zeros(3))
    with pytest.raises(ValueError, match="dim"):
        MLPClassifier(dim=2, num_classes=3)(torch.zeros(2, 3), torch.zeros(2))
    with pytest.raises(ValueError, match="num_classes"):
        MLPClassifier(dim=2, num_classes=1)
    with pytest.raises(ValueError, match="ch_mult"):
        ConvClassifier(ch_mult=())
    with pytest.raises(ValueError, match="time_embedding"):
        ConvClassifier(time_embedding="learned")
    with pytest.raises(ValueError, match="image_size"):
        ConvClassifier(image_size=6, ch_mult=(1, 2, 2))


def test_classifier_time_and_input_scaling_follow_the_sde():
    """The network sees net_time (999 t for VP / sub-VP, sigma(t) for VE) and x / sqrt(m^2 + s^2)."""
    seen = {}

    class Probe(torch.nn.Module):
        def forward(self, x, t_in):
            seen["x"], seen["t_in"] = x, t_in
            return torch.zeros(x.shape[0], 2, dtype=x.dtype)

    x, t = torch.ones(3, 2, dtype=F64), torch.tensor([0.1, 0.5, 0.9], dtype=F64)
    for sde in (VPSDE(), SubVPSDE(), VESDE()):
        NoiseConditionalClassifier(Probe(), sde)(x, t)
        m, s = sde.marginal_coef(t)
        torch.testing.assert_close(seen["x"], x / torch.sqrt(m * m + s * s)[:, None])
        torch.testing.assert_close(seen["t_in"], sde.sigma(t) if isinstance(sde, VESDE) else 999.0 * t)


# --- the loss ------------------------------------------------------------------------------------------------------------
def test_loss_is_cross_entropy_at_the_perturbed_point():
    """Hand computation with the same generator: t = eps + (1 - eps) u, x_t = m x0 + s z with the VP marginal
    m = exp(c), s = sqrt(1 - exp(2c)), c = -t^2 (b1 - b0) / 4 - t b0 / 2; loss = mean of -log softmax(f(x_t, t))[y]."""
    eps, b0, b1 = 1e-3, 0.1, 20.0
    seen = {}
    net = MLPClassifier(dim=6, num_classes=4, hidden=16, seed=3).double()

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x, t):
            seen["x"], seen["t"] = x, t
            return self.net(x.reshape(x.shape[0], -1), 999.0 * t)

    x0 = torch.randn(7, 1, 2, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    y = torch.tensor([0, 3, 1, 2, 2, 0, 1])
    loss = classifier_loss(VPSDE(beta_min=b0, beta_max=b1), eps)(Recorder(), x0, torch.Generator().manual_seed(11), y)

    g = torch.Generator().manual_seed(11)
    t = eps + (1 - eps) * torch.rand(7, generator=g, dtype=F64)
    z = torch.randn(7, 1, 2, 3, generator=g, dtype=F64)
    c = -0.25 * t**2 * (b1 - b0) - 0.5 * t * b0
    m, s = torch.exp(c), torch.sqrt(1 - torch.exp(2 * c))
    x_t = m[:, None, None, None] * x0 + s[:, None, None, None] * z
    logits = net(x_t.reshape(7, -1), 999.0 * t)
    hand = -(logits[torch.arange(7), y] - torch.logsumexp(logits, 1)).mean()
    torch.testing.assert_close(seen["t"], t, rtol=1e-14, atol=0)
    torch.testing.assert_close(seen["x"], x_t, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loss, hand, rtol=1e-12, atol=1e-12)


def test_loss_validates_eps_and_needs_labels():
    with pytest.raises(ValueError, match="eps"):
        classifier_loss(VPSDE(), eps=0.0)
    with pytest.raises(ValueError, match="eps"):
        classifier_loss(VPSDE(), eps=1.0)
    clf = NoiseConditionalClassifier(MLPClassifier(2, 3, hidden=8), VPSDE())
    with pytest.raises(ValueError, match="labels"):
        classifier_loss(VPSDE())(clf, torch.zeros(4, 2), torch.Generator())


# --- the exact posterior of a Gaussian mixture ------------------------------------------------------------------------
GMM = GaussianMixture(torch.tensor([[-1.0, 0.0], [1.0, 0.0], [0.0, 1.2]], dtype=F64), torch.tensor([0.5, 0.5, 0.4], dtype=F64),
                      torch.tensor([0.4, 0.35, 0.25], dtype=F64))


CLASSES = [[0], [1], [2]]  # each component its own class


def exact_class_log_prob(x: torch.Tensor, t: torch.Tensor, sde) -> torch.Tensor:
    """log p_t(k | x) of the mixture's components (the oracle's responsibilities at time t)."""
    return GMM.class_log_prob(x, t, sde, CLASSES)


@pytest.fixture(scope="module")
def gmm_classifier(tmp_path_factory):
    """A tiny MLP classifier of the mixture's components, trained 300 steps on VP-perturbed samples (~5-15 s)."""
    sde = VPSDE()
    x, k = GMM.sample(20000, torch.Generator().manual_seed(0), dtype=torch.float32, return_labels=True)
    spec = classifier_spec(sde, "mlp", {"hidden": 32, "depth": 2}, (2,), 3, seed=0)
    clf = build_classifier(spec)
    opts = TrainOptions(n_steps=300, batch_size=256, lr=3e-3, warmup=0, ema_rate=0.99, log_every=300)
    result = train(clf, classifier_loss(sde), x, opts, tmp_path_factory.mktemp("gmm_clf"), progress=False, labels=k)
    return result.ema.module.eval(), sde


def test_gmm_classifier_approaches_the_exact_posterior(gmm_classifier):
    """On fresh perturbed samples: KL(p_t(.|x) || q_t(.|x)) well under a tenth of the information the exact
    posterior carries (KL to the prior weights), and accuracy no worse than the Bayes classifier's beyond 3 paired
    standard errors (+ 0.5 %)."""
    clf, sde = gmm_classifier
    g = torch.Generator().manual_seed(5)
    n = 4000
    untrained = build_classifier(clf.spec)
    for t in (0.02, 0.2, 0.4):
        x0, k = GMM.sample(n, g, return_labels=True)
        tt = torch.full((n,), t, dtype=F64)
        m, s = sde.marginal_coef(tt)
        xt = m[:, None] * x0 + s[:, None] * torch.randn(x0.shape, generator=g, dtype=F64)
        lp = exact_class_log_prob(xt, tt, sde)
        with torch.no_grad():
            lq = clf.log_prob_fn()(xt, tt)  # float64 in, float32 classifier
            lq0 = untrained.log_prob_fn()(xt, tt)
        assert lq.dtype == F64
        kl = float((lp.exp() * (lp - lq)).sum(1).mean())
        info = float((lp.exp() * (lp - torch.log(GMM.weights)[None])).sum(1).mean())
        kl0 = float((lp.exp() * (lp - lq0)).sum(1).mean())
        assert kl < 0.1 * info and kl < 0.01, (t, kl, info)
        assert kl0 > info  # the untrained classifier (uniform logits) is far from it: the check can fail
        d = (lq.argmax(1) == k).double() - (lp.argmax(1) == k).double()
        assert float(d.mean()) > -(3 * float(d.std()) / math.sqrt(n) + 0.005), (t, float(d.mean()))


def test_classifier_accuracy_matches_a_hand_count(gmm_classifier):
    clf, sde = gmm_classifier
    x0, k = GMM.sample(500, torch.Generator().manual_seed(9), dtype=torch.float32, return_labels=True)
    out = classifier_accuracy(clf, x0, k, (0.1, 0.5), sde, generator=torch.Generator().manual_seed(2), batch_size=128)
    g = torch.Generator().manual_seed(2)
    for t in (0.1, 0.5):
        m, s = sde.marginal_coef(torch.tensor([t], dtype=F64))
        xt = float(m) * x0 + float(s) * torch.randn(x0.shape, generator=g)
        with torch.no_grad():
            logits = clf(xt, torch.full((500,), t))
        assert out[t]["accuracy"] == int((logits.argmax(1) == k).sum()) / 500
        assert out[t]["nll"] == pytest.approx(float(F.cross_entropy(logits, k)), rel=1e-5)


# --- the app: exact resume, the checkpoint round trip, options ---------------------------------------------------------
def _tiny(workdir, n_steps, **kw):
    base = dict(dataset="digits", n_train=64, ch=8, ch_mult=(1, 2), n_steps=n_steps, batch_size=16, warmup=2,
                eval_times=(0.1, 0.5), n_eval=40, workdir=str(workdir), progress=False)
    return ClassifierOptions(**{**base, **kw})


def test_resume_is_exact_and_the_checkpoint_rebuilds_the_classifier(tmp_path):
    full = run_train_classifier(_tiny(tmp_path / "full", 6))
    half = run_train_classifier(_tiny(tmp_path / "split", 3))
    assert half["train_steps"] == 3
    resumed = run_train_classifier(_tiny(tmp_path / "split", 6))
    assert resumed["steps_this_call"] == 3 and resumed["train_steps"] == 6
    a = load_checkpoint(tmp_path / "full" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "split" / "checkpoint.pt")
    for key in ("model", "ema"):
        sa, sb = (a[key]["module"], b[key]["module"]) if key == "ema" else (a[key], b[key])
        assert sa.keys() == sb.keys()
        for name in sa:
            assert torch.equal(sa[name], sb[name]), (key, name)
    assert full["accuracy"] == resumed["accuracy"] and full["nll"] == resumed["nll"]

    # load_classifier rebuilds it from the checkpoint alone, with the EMA weights
    clf = load_classifier(tmp_path / "full")
    assert isinstance(clf, NoiseConditionalClassifier) and isinstance(clf.net, ConvClassifier)
    assert not any(p.requires_grad for p in clf.parameters()) and not clf.training
    assert clf.spec["data"] == {"name": "digits", "centered": True, "levels": 17} and clf.num_classes == 10
    ref = build_classifier(a["spec"])
    ref.load_state_dict(a["ema"]["module"])
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.05, 0.3, 0.6, 0.9])
    with torch.no_grad():
        assert torch.equal(clf.log_prob(x, t), ref.eval().log_prob(x, t))
    raw = load_classifier(tmp_path / "full" / "checkpoint.pt", ema=False)
    assert torch.equal(raw.net.head.weight, a["model"]["net.head.weight"])

    metrics = json.loads((tmp_path / "full" / "metrics.json").read_text())
    assert set(metrics["accuracy"]) == {"0.1", "0.5"} and metrics["n_test"] == 40 and metrics["train_steps"] == 6
    assert all(0.0 <= v <= 1.0 for v in metrics["accuracy"].values())


def test_the_app_trains_an_mlp_classifier_on_the_labelled_gmm_set(tmp_path):
    m = run_train_classifier(ClassifierOptions(dataset="gmm", n_train=256, hidden=16, n_steps=5, batch_size=32, n_eval=50,
                                               eval_times=(0.05,), workdir=str(tmp_path), progress=False))
    clf = load_classifier(tmp_path)
    assert m["net"] == "mlp" and isinstance(clf.net, MLPClassifier) and clf.num_classes == 5
    assert clf.spec["data_shape"] == [2] and clf.spec["data"]["levels"] is None and set(m["accuracy"]) == {"0.05"}


def test_load_classifier_refuses_a_score_model_checkpoint(tmp_path):
    save_checkpoint(tmp_path / "checkpoint.pt", {"ema": {"module": {}}, "spec": {"format": "scoresde-spec-1"}})
    with pytest.raises(ValueError, match="not a noise-conditional classifier"):
        load_classifier(tmp_path)


@pytest.mark.parametrize("field,value,match", [
    ("dataset", "moons", r"dataset must be one of \('gmm', 'digits', 'mnist', 'cifar10'\)"),
    ("sde", "vpsde", r"sde must be one of \('vp', 'subvp', 've'\)"),
    ("net", "resnet", r"net must be one of \('auto', 'conv', 'mlp'\)"),
    ("time_embedding", "learned", "time_embedding must be one of"),
    ("ch_mult", (), "ch_mult must be a non-empty sequence"),
    ("ch_mult", "1,2", "ch_mult must be a non-empty sequence"),
    ("ch", 0, "ch must be an integer >= 1"),
    ("n_steps", 0, "n_steps must be an integer >= 1"),
    ("lr", -1e-3, "lr must be a finite number > 0"),
    ("eps", 0.0, r"eps must be a number in \(0.0, 1.0\)"),
    ("ema_rate", 1.0, "ema_rate must be a number in"),
    ("eval_times", (0.0, 0.5), r"eval_times must be a non-empty sequence of times in \(0, T\]"),
    ("eval_times", (), "eval_times must be"),
    ("n_eval", 0, "n_eval must be an integer >= 1"),
    ("device", "gpu0", "device must be a torch device string"),
    ("centered", "yes", "centered must be a bool"),
])
def test_bad_options_are_named(field, value, match):
    with pytest.raises(ValueError, match=match):
        ClassifierOptions(**{field: value})


def test_options_normalise_lists_from_the_config_layer():
    o = ClassifierOptions(ch_mult=[1, 2, 2], eval_times=[0.1, 1])  # OmegaConf hands lists
    assert o.ch_mult == (1, 2, 2) and o.eval_times == (0.1, 1.0)
    assert o.net_spec((1, 8, 8))[0] == "conv" and o.net_spec((2,))[0] == "mlp"
    assert ClassifierOptions(sde="ve").net_spec((1, 8, 8))[1]["time_embedding"] == "fourier"
    assert ClassifierOptions(sde="subvp").net_spec((1, 8, 8))[1]["time_embedding"] == "sinusoidal"


# --- classifier guidance with the trained classifier ----------------------------------------------------------------
def _bayes_label_fraction(x: torch.Tensor, y: int) -> torch.Tensor:
    """Fraction of the rows of ``x`` whose most probable component under the data mixture (t = 0) is ``y``."""
    lp = exact_class_log_prob(x.double(), torch.zeros(x.shape[0], dtype=F64), VPSDE())
    return (lp.argmax(1) == y).double().mean()


def test_classifier_guidance_moves_samples_to_the_guided_class(gmm_classifier):
    """The exact mixture score guided by the trained classifier (w = 1, class y = 2 of weight 0.25) samples
    p_0(x | y): the fraction of samples whose Bayes label is y moves from its unguided value f_0 to the value f_1 of
    p_0(x | y) (both computed from 10^5 exact samples), within 4 binomial standard errors (+ 0.03 for the
    classifier's error); the unguided run (w = 0) stays at f_0."""
    from scoresde.samplers import classifier_guided_score_fn, sample

    clf, sde = gmm_classifier
    y, n = 2, 600
    g = torch.Generator().manual_seed(21)
    f0 = float(_bayes_label_fraction(GMM.sample(100_000, g), y))
    comp = GaussianMixture(GMM.means[y:y + 1], GMM.stds[y:y + 1])
    f1 = float(_bayes_label_fraction(comp.sample(100_000, g), y))
    assert f1 > f0 + 0.4  # the check has room to see the move
    fracs = {}
    for w in (0.0, 1.0):
        score = classifier_guided_score_fn(GMM.score_fn(sde), clf.log_prob_fn(), y, w)
        x = sample(score, sde, (n, 2), method="ddim", steps=100, eta=1.0, generator=torch.Generator().manual_seed(3),
                   dtype=F64).x
        assert torch.isfinite(x).all()
        fracs[w] = float(_bayes_label_fraction(x, y))
    se = lambda f: math.sqrt(f * (1 - f) / n)  # noqa: E731
    assert abs(fracs[0.0] - f0) < 4 * se(f0), (fracs, f0)
    assert abs(fracs[1.0] - f1) < 4 * se(f1) + 0.03, (fracs, f1)
    assert fracs[1.0] - fracs[0.0] > 4 * math.hypot(se(f0), se(f1))
