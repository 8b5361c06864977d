"""Export: ONNX vs PyTorch parity (onnxruntime CPU, max relative error <= 1e-4) for the MLP, ConvScoreNet, the U-Net and
DiT, dynamic batch, the int8 graph; safetensors round trip bitwise equal and loadable by ``scoresde.load``; options."""

import json

import pytest
import torch

from scoresde import build, load
from scoresde.export import (ONNX_OPSET, ExportOptions, export_onnx, export_safetensors, onnx_session, quantize_onnx,
                             run_export)
from scoresde.losses import get_loss_fn
from scoresde.nets.layers import variance_scaling_
from scoresde.sde import VESDE, VPSDE
from scoresde.train import TrainOptions, train

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("safetensors")

NETS = {
    "mlp": dict(hidden=32, depth=2),
    "convnet": dict(ch=8, ch_mult=(1, 2), attn_resolutions=(4,), dropout=0.0),
    "unet": dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), num_groups=4, dropout=0.0),
    "dit": dict(hidden_size=16, depth=2, num_heads=2),
}


def randomize_(model, seed=1):
    """Redraw every weight (the zero-initialised output layers would make parity trivial)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                variance_scaling_(p, 1.0, g)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def make_model(name, sde=None, seed=0):
    spec = build.model_spec(sde or VPSDE(), name, NETS[name], (1, 8, 8), seed=seed,
                            data={"options": {"name": "digits"}, "centered": True, "levels": 17})
    return randomize_(build.build_model(spec).eval())


def max_rel_err(a, b):
    """``max |a - b| / max |b|`` (the relative error of the whole output; entries near 0 make elementwise ratios meaningless)."""
    return float((a - b).abs().max() / b.abs().max())


def run_onnx(path, x, t):
    return torch.from_numpy(onnx_session(path, threads=1).run(["out"], {"x": x.numpy(), "t": t.numpy()})[0])


@pytest.mark.parametrize("name", sorted(NETS))
def test_onnx_matches_pytorch_with_a_dynamic_batch(tmp_path, name):
    model = make_model(name)
    path = export_onnx(model, tmp_path / "m.onnx")
    g = torch.Generator().manual_seed(2)
    for batch in (1, 5):  # exported at batch 2: the batch axis is dynamic
        x, t = torch.randn(batch, 1, 8, 8, generator=g), torch.rand(batch, generator=g) * 0.99 + 0.01
        with torch.no_grad():
            ref = model(x, t)
        assert ref.abs().max() > 1e-2
        assert max_rel_err(run_onnx(path, x, t), ref) <= 1e-4


@pytest.mark.parametrize("output, method, sde", [("score", "score_fn", VPSDE()), ("x0", "denoise_fn", VPSDE()),
                                                 ("eps", "eps_fn", VESDE())])
def test_onnx_score_outputs_match(tmp_path, output, method, sde):
    model = make_model("convnet", sde=sde)
    path = export_onnx(model, tmp_path / "m.onnx", output=output)
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(4, 1, 8, 8, generator=g), torch.rand(4, generator=g) * 0.9 + 0.1
    with torch.no_grad():
        ref = getattr(model, method)(x, t)
    assert max_rel_err(run_onnx(path, x, t), ref) <= 1e-4


def test_onnx_metadata_names_spec_output_and_opset(tmp_path):
    import onnx

    model = make_model("dit")
    proto = onnx.load(str(export_onnx(model, tmp_path / "m.onnx")))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["scoresde_spec"]) == model.spec
    assert meta["output"] == "net" and meta["parameterization"] == "eps" and meta["opset"] == str(ONNX_OPSET)
    assert any(o.domain in ("", "ai.onnx") and o.version == ONNX_OPSET for o in proto.opset_import)


def test_int8_graph_is_close_and_smaller(tmp_path):
    model = make_model("dit")
    src = export_onnx(model, tmp_path / "m.onnx")
    dst = quantize_onnx(src, tmp_path / "m.int8.onnx")
    g = torch.Generator().manual_seed(4)
    x, t = torch.randn(8, 1, 8, 8, generator=g), torch.rand(8, generator=g)
    with torch.no_grad():
        ref = model(x, t)
    err = max_rel_err(run_onnx(dst, x, t), ref)
    assert 0 < err < 0.2  # int8: not exact, but the same function
    import onnx

    ops = {n.op_type for n in onnx.load(str(dst)).graph.node}
    assert ops & {"DynamicQuantizeLinear", "MatMulInteger", "DynamicQuantizeMatMul"}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A real (3-step) training run of a tiny DiT through ``scoresde.train.train``, with a metrics.json."""
    d = tmp_path_factory.mktemp("run")
    spec = build.model_spec(VPSDE(), "dit", NETS["dit"], (1, 8, 8), seed=0,
                            data={"options": {"name": "digits"}, "centered": True, "levels": 17})
    model = build.build_model(spec)
    data = torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    train(model, get_loss_fn(model.sde), data, TrainOptions(n_steps=3, batch_size=16, warmup=0, ema_rate=0.5, log_every=1), d,
          progress=False)
    (d / "metrics.json").write_text(json.dumps({"nll": {"test": {"bpd": 3.25, "bpd_stderr": 0.02, "n": 300}},
                                                "samples": {"fd": 12.5, "fd_floor": 9.0, "n": 300, "method": "dpm_solver", "nfe": 20}}))
    return d


def test_safetensors_round_trip_is_bitwise_and_loads_without_the_checkpoint(trained_run, tmp_path):
    out = export_safetensors(trained_run, tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    ref, _ = load(trained_run)  # EMA weights from the training checkpoint
    for f in trained_run.iterdir():  # the training checkpoint is not needed
        if f.suffix == ".pt":
            f.rename(f.with_suffix(".bak"))
    try:
        got, sde = load(out)
    finally:
        for f in trained_run.glob("*.bak"):
            f.rename(f.with_suffix(".pt"))
    rs, gs = ref.state_dict(), got.state_dict()
    assert rs.keys() == gs.keys() and all(torch.equal(rs[k], gs[k]) and rs[k].dtype == gs[k].dtype for k in rs)
    assert got.spec == ref.spec and isinstance(sde, VPSDE) and not got.training
    x, t = torch.randn(3, 1, 8, 8), torch.rand(3)
    with torch.no_grad():
        assert torch.equal(got.score_fn(x, t), ref.score_fn(x, t))
    card = (out / "README.md").read_text()
    assert "digits" in card and "3.2500" in card and "12.50" in card and "| training steps | 3 |" in card
    with pytest.raises(ValueError, match="EMA"):
        load(out, ema=False)


def test_load_names_a_broken_export(tmp_path, trained_run):
    out = export_safetensors(trained_run, tmp_path / "export")
    spec = json.loads((out / "config.json").read_text())
    spec["net"]["kwargs"]["hidden_size"] = 32
    (out / "config.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="model.safetensors"):
        load(out)


def test_run_export_onnx_and_safetensors(trained_run, tmp_path):
    r = run_export(ExportOptions(ckpt=str(trained_run), format="onnx", out=str(tmp_path / "o"), int8=True))
    names = sorted(p.split("/")[-1] for p in r["files"])
    assert names == ["README.md", "config.json", "model.int8.onnx", "model.onnx"]
    model, _ = load(trained_run)
    x, t = torch.randn(2, 1, 8, 8), torch.rand(2)
    with torch.no_grad():
        ref = model(x, t)
    assert torch.allclose(run_onnx(tmp_path / "o" / "model.onnx", x, t), ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
    r = run_export(ExportOptions(ckpt=str(trained_run), format="safetensors"))
    assert r["dir"] == str(trained_run / "export")
    assert torch.equal(load(r["dir"])[0](x, t), ref)


@pytest.mark.parametrize("kwargs, match", [(dict(), "ckpt"), (dict(ckpt="r", format="pickle"), "format"),
                                           (dict(ckpt="r", output="logp"), "output"), (dict(ckpt="r", opset=13), "opset"),
                                           (dict(ckpt="r", format="safetensors", int8=True), "int8")])
def test_bad_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ExportOptions(**kwargs).check()
