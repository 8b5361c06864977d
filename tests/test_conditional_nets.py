"""Class-conditional score networks (``num_classes`` / ``class_labels``): shapes, the null class, unconditional nets
unchanged, label checks, ``build_net`` / ``load`` round trips, and the ONNX / safetensors export of a conditional model."""

import pytest
import torch

from scoresde import build, load
from scoresde.checkpoint import save_checkpoint
from scoresde.losses import get_loss_fn
from scoresde.model import ScoreModel
from scoresde.nets import DDPM, ConvScoreNet, DiT, MLPScoreNet, NCSNpp, UNet
from scoresde.nets.layers import LabelEmbedding, check_class_labels, variance_scaling_
from scoresde.sde import VESDE, VPSDE

K = 3  # classes; label K is the null class

# small networks (name in build.NETWORKS, class, kwargs, per-sample shape)
NETS = {
    "mlp": (MLPScoreNet, dict(dim=6, hidden=32, depth=2), (6,)),
    "convnet": (ConvScoreNet, dict(ch=8, attn_resolutions=(4,), dropout=0.0), (1, 8, 8)),
    "unet": (UNet, dict(in_channels=1, image_size=8, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                        dropout=0.0), (1, 8, 8)),
    "ncsnpp": (NCSNpp, dict(image_size=8, num_channels=1, nf=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                            dropout=0.0), (1, 8, 8)),
    # nf = 64: DDPM's GroupNorm has 32 groups, and with one channel per group it would normalise the time / class
    # bias away
    "ddpm": (DDPM, dict(image_size=8, num_channels=1, nf=64, ch_mult=(1, 1), num_res_blocks=1, attn_resolutions=(),
                        dropout=0.0), (1, 8, 8)),
    "dit": (DiT, dict(hidden_size=16, depth=1, num_heads=2), (1, 8, 8)),
}
# the same networks through build_net (the data arguments come from the shape)
BUILD_KWARGS = {
    "mlp": dict(hidden=32, depth=2),
    "convnet": dict(ch=8, attn_resolutions=(4,), dropout=0.0),
    "unet": dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0),
    "ncsnpp": dict(nf=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0),
    "ddpm": dict(nf=64, ch_mult=(1, 1), num_res_blocks=1, attn_resolutions=(), dropout=0.0),
    "dit": dict(hidden_size=16, depth=1, num_heads=2),
}


def make(name, num_classes=K, seed=0, **over):
    cls, kwargs, _ = NETS[name]
    return cls(**{**kwargs, **over}, num_classes=num_classes, seed=seed)


def inputs(name, batch=4, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, *NETS[name][2]), generator=g, dtype=dtype)
    return x, (torch.rand(batch, generator=g, dtype=dtype) * 998 + 1)


def randomize_(net, seed=1):
    """Redraw every weight with unit variance scaling and every vector / class table with N(0, 0.1^2) (undoes the
    near-zero output layers, DiT's adaLN-Zero and the zero class tables)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "label_embed" in name or "y_embedder" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            elif p.dim() > 1:
                variance_scaling_(p, 1.0, g)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return net


def table(net):
    return net.y_embedder if isinstance(net, DiT) else net.label_embed


@pytest.mark.parametrize("name", sorted(NETS))
def test_shapes_table_and_float64(name):
    net = make(name)
    assert net.num_classes == K and isinstance(table(net), LabelEmbedding)
    assert table(net).weight.shape[0] == K + 1  # K classes + the null row
    x, t = inputs(name)
    y = torch.tensor([0, 1, 2, 3])
    for labels in (None, y, y.int(), y.to(torch.uint8)):
        out = net(x, t, class_labels=labels)
        assert out.shape == x.shape and out.dtype == x.dtype
    x64, t64 = inputs(name, dtype=torch.float64)
    assert net.double()(x64, t64, class_labels=y).dtype == torch.float64


@pytest.mark.parametrize("name", sorted(NETS))
def test_unconditional_nets_are_unchanged(name):
    """``num_classes=None`` adds nothing: same parameters, keys and bitwise outputs as a net built without the argument."""
    cls, kwargs, _ = NETS[name]
    plain, none = cls(**kwargs, seed=3), cls(**kwargs, num_classes=None, seed=3)
    assert none.num_classes is None
    sp, sn = plain.state_dict(), none.state_dict()
    assert list(sp) == list(sn) and all(torch.equal(sp[k], sn[k]) for k in sp)
    assert sum(p.numel() for p in plain.parameters()) == sum(p.numel() for p in none.parameters())
    x, t = inputs(name)
    randomize_(plain), randomize_(none)
    with torch.no_grad():
        assert torch.equal(plain(x, t), none(x, t))
    # a conditional net has exactly one more parameter: the (K + 1, d) class table
    cond = make(name, seed=3)
    extra = {k for k in cond.state_dict()} - set(sp)
    assert extra == {"y_embedder.weight" if name == "dit" else "label_embed.weight"}
    assert set(sp) <= set(cond.state_dict())


@pytest.mark.parametrize("name", sorted(set(NETS) - {"dit"}))
def test_a_fresh_conditional_net_is_the_unconditional_net_of_its_seed(name):
    """Zero class rows at initialisation and no draw from the seeded generator: every other weight equals the
    unconditional net's, and the output is bitwise that net's for every label."""
    cls, kwargs, _ = NETS[name]
    plain, cond = cls(**kwargs, seed=5), make(name, seed=5)
    assert torch.count_nonzero(cond.label_embed.weight) == 0
    sc = cond.state_dict()
    assert all(torch.equal(v, sc[k]) for k, v in plain.state_dict().items())
    x, t = inputs(name)
    with torch.no_grad():
        ref = plain(x, t)
        for labels in (None, torch.tensor([0, 1, 2, 3])):
            assert torch.equal(cond(x, t, class_labels=labels), ref)


def test_dit_keeps_its_class_table_initialisation():
    net = make("dit", seed=0)
    w = net.y_embedder.weight.detach()  # N(0, 0.02^2) from the seeded generator, as DiT (not zero: its tests pin this)
    assert abs(float(w.std()) - 0.02) < 0.005 and abs(float(w.mean())) < 0.01
    assert torch.equal(make("dit", seed=0).y_embedder.weight, w) and not torch.equal(make("dit", seed=1).y_embedder.weight, w)


@pytest.mark.parametrize("name", sorted(NETS))
def test_null_label_is_none_and_labels_change_the_output(name):
    net = randomize_(make(name)).eval()
    x, t = inputs(name)
    x, t = x[:1].expand(4, *x.shape[1:]).contiguous(), t[:1].expand(4).contiguous()  # one input, four labels
    with torch.no_grad():
        null = net(x, t)
        assert torch.equal(null, net(x, t, class_labels=torch.full((4,), K)))  # None == the null class, bitwise
        out = net(x, t, class_labels=torch.arange(K + 1))
    assert torch.equal(out[K], null[K])
    diffs = [(out[i] - out[j]).abs().max().item() for i in range(K + 1) for j in range(i + 1, K + 1)]
    assert min(diffs) > 1e-4  # each class (and the null class) gives its own output


@pytest.mark.parametrize("name", sorted(NETS))
def test_each_sample_gets_its_own_label(name):
    net = randomize_(make(name)).eval()
    x, t = inputs(name, batch=5)
    y = torch.tensor([2, 0, 3, 1, 2])
    with torch.no_grad():
        out = net(x, t, class_labels=y)
        for i in (1, 2):
            torch.testing.assert_close(out[i:i + 1], net(x[i:i + 1], t[i:i + 1], class_labels=y[i:i + 1]),
                                       rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(NETS))
def test_bad_labels_raise_before_the_network_runs(name):
    net = make(name)
    x, t = inputs(name)
    cls, kwargs, _ = NETS[name]
    with pytest.raises(ValueError, match="num_classes"):
        cls(**kwargs)(x, t, class_labels=torch.zeros(4, dtype=torch.long))  # an unconditional net takes no labels
    bad = [(torch.zeros(4), "integer"), (torch.zeros(4, dtype=torch.bool), "integer"), (torch.zeros(3, dtype=torch.long), r"\(4,\)"),
           (torch.zeros(4, 1, dtype=torch.long), r"\(4,\)"), ([0, 1, 2, 3], "list"),
           (torch.tensor([0, 1, -1, 2]), r"\[0, 3\].*\[-1, 2\]"), (torch.tensor([0, K + 1, 1, 2]), r"\[0, 3\].*\[0, 4\]")]
    for labels, match in bad:
        with pytest.raises(ValueError, match=match) as err:
            net(x, t, class_labels=labels)
        assert "class_labels" in str(err.value)


@pytest.mark.parametrize("name", sorted(NETS))
@pytest.mark.parametrize("value", [0, -2, 2.5, True, "10"])
def test_bad_num_classes_raise(name, value):
    with pytest.raises(ValueError, match="num_classes"):
        make(name, num_classes=value)


def test_ncsnpp_class_conditioning_needs_the_noise_embedding():
    with pytest.raises(ValueError, match="num_classes needs conditional=True"):
        make("ncsnpp", conditional=False)
    # the reference's keys and their order are untouched; the table sits outside all_modules
    cond, plain = make("ncsnpp"), make("ncsnpp", num_classes=None)
    assert [k for k in cond.state_dict() if k != "label_embed.weight"] == list(plain.state_dict())
    assert cond.label_embed.weight.shape == (K + 1, 4 * 16)


def test_ncsnpp_fourier_ve_conditional_runs():
    net = randomize_(make("ncsnpp", embedding_type="fourier", scale_by_sigma=True))
    x, _ = inputs("ncsnpp")
    sigma = torch.tensor([0.02, 0.5, 3.0, 40.0])
    a, b = net(x, sigma, class_labels=torch.tensor([0, 0, 0, 0])), net(x, sigma, class_labels=torch.tensor([1, 1, 1, 1]))
    assert torch.isfinite(a).all() and (a - b).abs().max() > 1e-4


def test_convnet_takes_augmentation_level_and_class_together():
    net = randomize_(make("convnet", aug_cond=True)).eval()
    x, t = inputs("convnet")
    y, a = torch.tensor([0, 1, 2, 3]), torch.tensor([0.0, 0.3, 0.3, 0.0])
    with torch.no_grad():
        both = net(x, t, aug_level=a, class_labels=y)
        assert torch.equal(both, net(x, t, a, y))  # positional order: x, t_in, aug_level, class_labels
        assert (both - net(x, t, aug_level=a)).abs().max() > 1e-4
        assert (both - net(x, t, class_labels=y))[1:3].abs().max() > 1e-4  # augmented samples
        assert torch.equal(both[[0, 3]], net(x, t, class_labels=y)[[0, 3]])  # aug level 0 adds nothing


def test_convnet_skip_mode_is_checked():
    with pytest.raises(ValueError, match="skip must be one of"):
        make("convnet", skip="sum")
    assert make("convnet", skip="cat", num_classes=None).skip_mode == "cat"


@pytest.mark.parametrize("name", ["mlp", "convnet"])
def test_class_table_trains_from_zero(name):
    """The zero rows get a gradient at initialisation (additive: it does not depend on their value); unused rows none."""
    cls, kwargs, shape = NETS[name]
    model = ScoreModel(make(name), VPSDE())
    x0 = torch.randn(6, *shape, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 0, 1, 1, 0, 1])
    with model.conditioned(class_labels=y):
        get_loss_fn(model.sde)(model, x0, torch.Generator().manual_seed(1)).backward()
    grad = model.net.label_embed.weight.grad
    assert grad[:2].abs().sum(dim=1).min() > 0 and torch.count_nonzero(grad[2:]) == 0


def test_score_model_conditioned_block_passes_the_labels():
    net = randomize_(make("convnet")).eval()
    model = ScoreModel(net, VPSDE())
    x, t = torch.randn(4, 1, 8, 8), torch.rand(4) * 0.9 + 0.05
    y = torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        with model.conditioned(class_labels=y):
            inside = model.score_fn(x, t)
        outside = model.score_fn(x, t)
        assert torch.equal(inside, -net(x, model.net_time(t), class_labels=y) / model.coefs(t)[1][:, None, None, None])
        assert torch.equal(outside, -net(x, model.net_time(t)) / model.coefs(t)[1][:, None, None, None])


def test_shared_checks_and_table():
    with pytest.raises(ValueError, match="this Foo is unconditional"):
        check_class_labels(torch.zeros(2, dtype=torch.long), None, 2, "Foo")
    check_class_labels(None, None, 2, "Foo")
    check_class_labels(torch.zeros(0, dtype=torch.long), 3, 0, "Foo")  # an empty batch
    emb = LabelEmbedding(4, 6)
    assert emb.weight.shape == (5, 6) and torch.count_nonzero(emb.weight) == 0
    with torch.no_grad():
        emb.weight.copy_(torch.arange(30.0).reshape(5, 6))
    assert torch.equal(emb(None, 2), emb.weight[[4, 4]]) and torch.equal(emb(torch.tensor([1, 0])), emb.weight[[1, 0]])
    with pytest.raises(ValueError, match="batch"):
        emb(None)
    with pytest.raises(ValueError, match="std"):
        LabelEmbedding(4, 6, std=-1.0)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    LabelEmbedding(4, 6, torch.Generator().manual_seed(0), std=0.02)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is untouched


# --------------------------------------------------------------------------------------------------------------------
# build_net / model_spec / load
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(BUILD_KWARGS))
def test_build_net_passes_num_classes(name):
    shape = (1, 8, 8)
    net = build.build_net(name, shape, seed=2, num_classes=K, **BUILD_KWARGS[name])
    assert net.num_classes == K and name in build.CLASS_CONDITIONAL
    x, t = torch.randn(4, *shape), torch.rand(4) * 999
    assert net(x, t, class_labels=torch.tensor([0, 1, 2, 3])).shape == x.shape
    plain = build.build_net(name, shape, seed=2, **BUILD_KWARGS[name])
    assert plain.num_classes is None
    assert build.build_net(name, shape, seed=2, num_classes=None, **BUILD_KWARGS[name]).state_dict().keys() == plain.state_dict().keys()


def test_flatten_passes_labels_to_the_mlp():
    net = build.build_net("mlp", (1, 8, 8), num_classes=K, hidden=32, depth=1)
    assert isinstance(net, build.Flatten) and net.num_classes == K
    randomize_(net)
    x, t, y = torch.randn(3, 1, 8, 8), torch.rand(3) * 999, torch.tensor([0, 2, 3])
    out = net(x, t, class_labels=y)
    assert out.shape == x.shape
    assert torch.equal(out, net.net(x.reshape(3, 64), t, class_labels=y).reshape(x.shape))
    assert torch.equal(net(x, t), net(x, t, y.new_full((3,), K)))
    with pytest.raises(ValueError, match="num_classes"):
        build.build_net("mlp", (1, 8, 8), hidden=32, depth=1)(x, t, class_labels=y)


def test_build_net_refuses_num_classes_for_a_network_without_it(monkeypatch):
    class Plain(torch.nn.Module):
        def __init__(self, dim: int, seed: int = 0):
            super().__init__()
            self.lin = torch.nn.Linear(dim, dim)

    monkeypatch.setitem(build.NETWORKS, "plain", Plain)
    assert isinstance(build.build_net("plain", (4,)), Plain)
    assert isinstance(build.build_net("plain", (4,), num_classes=None), Plain)
    with pytest.raises(ValueError, match=r"network 'plain' has no class conditioning.*'convnet'"):
        build.build_net("plain", (4,), num_classes=10)


@pytest.mark.parametrize("name, sde", [("convnet", VPSDE()), ("mlp", VESDE()), ("ncsnpp", VPSDE()), ("dit", VPSDE())])
def test_spec_build_and_load_round_trip(name, sde, tmp_path):
    kwargs = {**BUILD_KWARGS[name], "num_classes": K}
    spec = build.model_spec(sde, name, kwargs, (1, 8, 8), seed=4, data={"name": "digits", "centered": True})
    assert spec["net"]["kwargs"]["num_classes"] == K
    model = build.build_model(spec)
    assert model.net.num_classes == K
    randomize_(model.net, seed=7)
    save_checkpoint(tmp_path / "checkpoint.pt", {"ema": {"module": model.state_dict()}, "model": model.state_dict(),
                                                  "spec": spec, "step": 0})
    got, _ = load(tmp_path)
    assert got.spec == spec and got.net.num_classes == K
    ref, new = model.state_dict(), got.state_dict()
    assert ref.keys() == new.keys() and all(torch.equal(ref[k], new[k]) for k in ref)
    x, t, y = torch.randn(4, 1, 8, 8), torch.rand(4) * 0.9 + 0.05, torch.tensor([3, 0, 1, 2])
    model.eval()
    with torch.no_grad(), model.conditioned(class_labels=y), got.conditioned(class_labels=y):
        assert torch.equal(got.score_fn(x, t), model.score_fn(x, t))


# --------------------------------------------------------------------------------------------------------------------
# export: ONNX with a class_labels input, safetensors + config.json
# --------------------------------------------------------------------------------------------------------------------
def _conditional_run(tmp_path, name, sde=None):
    spec = build.model_spec(sde or VPSDE(), name, {**BUILD_KWARGS[name], "num_classes": K}, (1, 8, 8), seed=0,
                            data={"options": {"name": "digits"}, "centered": True, "levels": 17})
    model = randomize_(build.build_model(spec), seed=3).eval()
    save_checkpoint(tmp_path / "checkpoint.pt", {"ema": {"module": model.state_dict()}, "spec": spec, "step": 7})
    return model


@pytest.mark.parametrize("name, output", [("convnet", "net"), ("mlp", "score"), ("dit", "eps")])
def test_onnx_export_takes_class_labels(tmp_path, name, output):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    import onnx

    from scoresde.export import export_onnx, onnx_session

    model = _conditional_run(tmp_path, name)
    path = export_onnx(model, tmp_path / "model.onnx", output=output)
    proto = onnx.load(str(path))
    ins = {i.name: i for i in proto.graph.input}
    assert list(ins) == ["x", "t", "class_labels"]
    assert ins["class_labels"].type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert ins["class_labels"].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert "class_labels" in {p.key: p.value for p in proto.metadata_props}["inputs"]
    sess = onnx_session(path, threads=1)
    fn = {"net": model, "score": model.score_fn, "eps": model.eps_fn}[output]  # model(x, t): the raw network output
    for batch in (1, 5):  # a batch size other than the traced one (dynamic axis)
        g = torch.Generator().manual_seed(batch)
        x, t = torch.randn(batch, 1, 8, 8, generator=g), torch.rand(batch, generator=g) * 0.9 + 0.05
        y = torch.randint(0, K + 1, (batch,), generator=g)
        got = torch.from_numpy(sess.run(["out"], {"x": x.numpy(), "t": t.numpy(), "class_labels": y.numpy()})[0])
        with torch.no_grad(), model.conditioned(class_labels=y):
            ref = fn(x, t)
        assert float((got - ref).abs().max() / ref.abs().max()) < 1e-4
    # the null label in the graph is the unconditional output of the model
    x, t = torch.randn(2, 1, 8, 8), torch.full((2,), 0.5)
    got = sess.run(["out"], {"x": x.numpy(), "t": t.numpy(), "class_labels": torch.full((2,), K).numpy()})[0]
    with torch.no_grad():
        ref = fn(x, t)
    assert float((torch.from_numpy(got) - ref).abs().max() / ref.abs().max()) < 1e-4


def test_onnx_export_of_an_unconditional_model_has_two_inputs(tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    import onnx

    from scoresde.export import export_onnx

    spec = build.model_spec(VPSDE(), "convnet", BUILD_KWARGS["convnet"], (1, 8, 8))
    path = export_onnx(build.build_model(spec).eval(), tmp_path / "m.onnx")
    assert [i.name for i in onnx.load(str(path)).graph.input] == ["x", "t"]


def test_safetensors_round_trip_of_a_conditional_model(tmp_path):
    pytest.importorskip("safetensors")
    import json

    from scoresde.export import export_safetensors

    model = _conditional_run(tmp_path / "run", "convnet")
    out = export_safetensors(tmp_path / "run", tmp_path / "export")
    assert json.loads((out / "config.json").read_text())["net"]["kwargs"]["num_classes"] == K
    got, _ = load(out)
    assert got.net.num_classes == K
    ref, new = model.state_dict(), got.state_dict()
    assert ref.keys() == new.keys() and all(torch.equal(ref[k], new[k]) for k in ref)
    x, t, y = torch.randn(4, 1, 8, 8), torch.rand(4), torch.tensor([0, 1, 2, 3])
    with torch.no_grad(), model.conditioned(class_labels=y), got.conditioned(class_labels=y):
        assert torch.equal(got.score_fn(x, t), model.score_fn(x, t))
