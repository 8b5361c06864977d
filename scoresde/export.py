"""Deployment export of a trained model: ONNX (optionally int8), safetensors + ``config.json``, and a model card.

A trained run leaves the toolkit in two forms, both built from the EMA network (``scoresde.build.load``):

* **ONNX** (``export_onnx``): the graph ``(x (B, *shape), t (B,)) -> out (B, *shape)`` with ``t`` the SDE time in
  ``[0, T]`` (the network time ``999 t`` / ``sigma(t)`` is computed inside the graph, ``ScoreModel.net_time``) and a
  dynamic batch axis; a class-conditional model (``num_classes`` set) takes a third input ``class_labels (B,)`` int64 in
  ``[0, num_classes]`` (``num_classes`` is the null class: unconditional). ``output`` chooses what ``out`` is: ``"net"`` the raw network output (its meaning is the
  model's ``parameterization``, stored in the metadata), or ``"score"`` / ``"eps"`` / ``"x0"`` (``ScoreModel.score_fn`` /
  ``eps_fn`` / ``denoise_fn``). Opset ``ONNX_OPSET = 17`` (LayerNormalization is a native op from 17; onnxruntime
  >= 1.14 runs it), exported by torch's TorchScript-based exporter (``dynamo=False``, which needs no onnxscript).
  The build spec, the output kind and the opset are in the model's ``metadata_props``. ``quantize_onnx`` writes the
  dynamic int8 version (onnxruntime's ``quantize_dynamic``: int8 weights of MatMul / Gemm, activations quantised per
  batch at run time), for CPU inference.
* **safetensors** (``export_safetensors``): ``model.safetensors`` (the EMA ``ScoreModel`` state dict, bitwise),
  ``config.json`` (the build spec, ``scoresde.build``) and ``README.md`` (a model card: data, SDE, network, training
  steps, and the test bits/dim and FD of the run's ``metrics.json`` when it has them). ``scoresde.load(dir)``
  rebuilds the model from these two files alone, without the training checkpoint.

``run_export(ExportOptions(ckpt=..., format="onnx"|"safetensors"))`` is the app (``scoresde-export``).
onnx / onnxruntime / safetensors are the optional extra ``scoresde[export]``.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from . import build
from .model import ScoreModel

__all__ = ["ONNX_OPSET", "OUTPUTS", "FORMATS", "WEIGHTS_NAME", "CONFIG_NAME", "CARD_NAME", "ONNX_NAME", "ONNX_INT8_NAME",
           "ExportOptions", "export_onnx", "quantize_onnx", "onnx_session", "export_safetensors", "load_exported",
           "model_card", "run_export"]

ONNX_OPSET = 17
OUTPUTS = ("net", "score", "eps", "x0")
FORMATS = ("onnx", "safetensors")
WEIGHTS_NAME, CONFIG_NAME, CARD_NAME = "model.safetensors", "config.json", "README.md"
ONNX_NAME, ONNX_INT8_NAME = "model.onnx", "model.int8.onnx"


def _need(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{module} is needed for export; install the extra: pip install 'scoresde[export]'") from e


def _check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}; got {value!r}")


def _num_classes(model: ScoreModel) -> Optional[int]:
    """The network's ``num_classes`` (``None``: unconditional)."""
    return getattr(model.net, "num_classes", None)


class _TimeGraph(nn.Module):
    """The exported function of ``ScoreModel`` ``model``: ``(x (B, ...), t (B,)[, class_labels (B,)]) -> (B, ...)``
    (module docstring).

    No range check on ``t`` or ``class_labels`` (a graph has none): ``t`` must lie in ``[0, T]``, the labels in
    ``[0, num_classes]``."""

    def __init__(self, model: ScoreModel, output: str):
        super().__init__()
        self.model, self.output = model, output

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        m = self.model
        t_in = m.net_time(t)
        out = m.net(x, t_in) if class_labels is None else m.net(x, t_in, class_labels=class_labels)
        if self.output == "net":
            return out
        mc, s = m.coefs(t)
        shape = (-1,) + (1,) * (x.dim() - 1)
        convert = {"score": m._score_from_output, "eps": m._eps_from_output, "x0": m._denoise_from_output}[self.output]
        return convert(out, x, mc.reshape(shape), s.reshape(shape))


def _expm1_symbolic(g, x):
    """ONNX has no expm1 (the VP SDE's ``s(t) = sqrt(-expm1(...))`` needs it): Kahan's accurate form
    ``expm1(x) = (u - 1) x / log(u)``, ``u = exp(x)``, and ``x`` itself where ``u`` rounds to 1."""
    u = g.op("Exp", x)
    one = g.op("Constant", value_t=torch.tensor(1.0))
    one = g.op("CastLike", one, x)
    um1 = g.op("Sub", u, one)
    kahan = g.op("Div", g.op("Mul", um1, x), g.op("Log", u))
    return g.op("Where", g.op("Equal", u, one), x, kahan)


def _register_symbolics(opset: int) -> None:
    torch.onnx.register_custom_op_symbolic("aten::expm1", _expm1_symbolic, opset)


def _as_model(model_or_run, ema: bool = True) -> ScoreModel:
    if isinstance(model_or_run, ScoreModel):
        return model_or_run
    if isinstance(model_or_run, (str, Path)):
        return build.load(model_or_run, ema=ema)[0]
    raise TypeError(f"model must be a ScoreModel or a run directory / checkpoint path; got {type(model_or_run).__name__}")


@torch.no_grad()
def export_onnx(model: Union[ScoreModel, str, Path], path, output: str = "net", opset: int = ONNX_OPSET,
                example_batch: int = 2) -> Path:
    """Write the ONNX graph ``(x (B, *shape), t (B,)[, class_labels (B,)]) -> out (B, *shape)`` of a score model
    (module docstring).

    ``model``: a ``ScoreModel`` (with ``.spec``, as ``build_model`` / ``load`` give it) or a run directory or checkpoint
    file, of which the EMA weights are exported. Inputs ``"x"`` (float32), ``"t"`` (float32, the SDE time in
    ``[0, T]``) and, for a class-conditional model, ``"class_labels"`` (int64 in ``[0, num_classes]``, the last the
    null class); output ``"out"``; axis 0 of each is the dynamic ``"batch"``. ``output``: one of ``OUTPUTS``.
    ``opset``: the ONNX opset (>= 17, the default). Exported in float32 on the CPU from a copy (``model`` is untouched).
    Returns ``path``.
    """
    _check_choice("output", output, OUTPUTS)
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < ONNX_OPSET:
        raise ValueError(f"opset must be an integer >= {ONNX_OPSET}; got {opset!r}")
    onnx = _need("onnx")
    model = _as_model(model)
    spec = getattr(model, "spec", None)
    if spec is None:
        raise ValueError("model has no build spec (.spec); build it with scoresde.build.build_model or load it with scoresde.load")
    import copy

    graph = _TimeGraph(copy.deepcopy(model).to(device="cpu", dtype=torch.float32).eval(), output)
    shape = tuple(spec["data_shape"])
    g = torch.Generator().manual_seed(0)
    x = torch.randn((example_batch, *shape), generator=g)
    t = torch.rand(example_batch, generator=g) * model.sde.T
    num_classes = _num_classes(model)
    args, names = (x, t), ["x", "t"]
    if num_classes is not None:
        args, names = (x, t, torch.randint(0, num_classes + 1, (example_batch,), generator=g)), names + ["class_labels"]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
        _register_symbolics(opset)
        torch.onnx.export(graph, args, str(path), dynamo=False, opset_version=opset, input_names=names,
                          output_names=["out"], dynamic_axes={**{n: {0: "batch"} for n in names}, "out": {0: "batch"}})
    proto = onnx.load(str(path))
    meta = {"scoresde_spec": json.dumps(spec), "output": output, "parameterization": model.parameterization,
            "opset": str(opset), "inputs": _inputs_note(num_classes)}
    for k, v in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return path


def _inputs_note(num_classes: Optional[int]) -> str:
    """The graph's inputs in words (metadata ``inputs``)."""
    note = "x: (batch, *data_shape) float32; t: (batch,) float32 SDE time in [0, T]"
    if num_classes is not None:
        note += f"; class_labels: (batch,) int64 in [0, {num_classes}] ({num_classes} = the null class, unconditional)"
    return note


def quantize_onnx(src, dst) -> Path:
    """Dynamic int8 quantisation of an exported ONNX model (onnxruntime ``quantize_dynamic``, QInt8 weights of
    MatMul / Gemm; activations quantised per tensor at run time, so an output depends slightly on the rest of its
    batch). The metadata is kept. Returns ``dst``."""
    _need("onnxruntime")
    from onnxruntime.quantization import QuantType, quantize_dynamic

    onnx = _need("onnx")
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    import logging

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # quantize_dynamic logs an advice to pre-process (shape inference) on the root logger
    try:
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])
    finally:
        root.setLevel(level)
    proto, q = onnx.load(str(src)), onnx.load(str(dst))
    have = {p.key for p in q.metadata_props}
    for p in proto.metadata_props:
        if p.key not in have:
            entry = q.metadata_props.add()
            entry.key, entry.value = p.key, p.value
    entry = q.metadata_props.add()
    entry.key, entry.value = "quantization", "onnxruntime quantize_dynamic, QInt8 weights, MatMul/Gemm"
    onnx.save(q, str(dst))
    return dst


def onnx_session(path, threads: Optional[int] = None):
    """An onnxruntime CPU ``InferenceSession`` for ``path`` (``threads``: intra-op threads, ``None`` = its default)."""
    ort = _need("onnxruntime")
    so = ort.SessionOptions()
    if threads is not None:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


def _run_dir(run) -> Path:
    p = Path(run).expanduser()
    return p if p.is_dir() else p.parent


def _metrics(run_dir: Path) -> dict:
    p = run_dir / "metrics.json"
    return json.loads(p.read_text()) if p.is_file() else {}


def model_card(spec: dict, metrics: dict, step: Optional[int], n_params: int) -> str:
    """The ``README.md`` written beside exported weights: data, SDE, network, steps, and the measured test bits/dim and
    FD when the run's ``metrics`` have them (else it says they were not measured)."""
    sde, net, data = spec["sde"], spec["net"], spec.get("data", {})
    opts = data.get("options", {})
    lines = [f"# scoresde score model: {net['name']} on {opts.get('name', 'unknown data')}", "",
             "Exported by `scoresde.export` from a training run (EMA weights). Load it with `scoresde.load(this_directory)`",
             "(needs `model.safetensors` and `config.json`, the build spec).", "",
             "| | |", "| --- | --- |",
             f"| data | {opts.get('name', '?')}, per-sample shape {tuple(spec['data_shape'])}, "
             f"{'[-1, 1]' if data.get('centered', True) else '[0, 1]'}"
             + (f", {data['levels']} levels (uniformly dequantised)" if data.get("levels") else "") + " |",
             f"| SDE | {sde['name']} " + ", ".join(f"{k}={v}" for k, v in sde["kwargs"].items()) + " |",
             f"| network | {net['name']} ({n_params:,} parameters) " + ", ".join(f"{k}={v}" for k, v in net["kwargs"].items()) + " |",
             f"| parameterisation | {spec['parameterization']}, {'continuous' if spec['continuous'] else 'discrete'} time |",
             f"| training steps | {step if step is not None else 'unknown'} |"]
    nll = (metrics.get("nll") or {}).get("test")
    if nll:
        lines.append(f"| test bits/dim (PF-ODE) | {nll['bpd']:.4f} ± {nll['bpd_stderr']:.4f} (n = {nll['n']}) |")
    s = metrics.get("samples") or {}
    if s.get("fd") is not None:
        lines.append(f"| FD ({s['n']} samples, {s['method']}, NFE {s.get('nfe')}) | {s['fd']:.2f} "
                     f"(floor, as many training images: {s.get('fd_floor', float('nan')):.2f}) |")
    if not nll and s.get("fd") is None:
        lines.append("| measured quality | none in the run's metrics.json |")
    return "\n".join(lines) + "\n"


@torch.no_grad()
def export_safetensors(run, out_dir) -> Path:
    """Write ``model.safetensors`` (EMA weights), ``config.json`` (build spec) and ``README.md`` into ``out_dir``.

    ``run``: a run directory or checkpoint file (``scoresde.build.find_checkpoint``). The card reads the run's
    ``metrics.json`` when present. Returns ``out_dir``.
    """
    st = _need("safetensors.torch")
    from .checkpoint import load_checkpoint

    model, _ = build.load(run, ema=True)
    file = build.find_checkpoint(run)
    step = load_checkpoint(file, map_location="cpu").get("step")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    st.save_file(state, str(out / WEIGHTS_NAME), metadata={"format": "pt", "spec_format": build.SPEC_FORMAT})
    (out / CONFIG_NAME).write_text(json.dumps(model.spec, indent=2) + "\n")
    n_params = sum(p.numel() for p in model.parameters())
    (out / CARD_NAME).write_text(model_card(model.spec, _metrics(_run_dir(run)), step, n_params))
    return out


def load_exported(path, device=None, dtype=None) -> ScoreModel:
    """The ``ScoreModel`` of an ``export_safetensors`` directory (``config.json`` + ``model.safetensors``), eval mode.
    ``ValueError`` names the file that is missing or does not fit the spec."""
    st = _need("safetensors.torch")
    from .checkpoint import check_state_dict

    p = Path(path)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (p / name).is_file():
            raise ValueError(f"{str(p)!r} is not an exported model directory: it has no {name}")
    try:
        spec = json.loads((p / CONFIG_NAME).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{str(p / CONFIG_NAME)!r} is not valid JSON: {e}") from e
    model = build.build_model(spec)
    sd = st.load_file(str(p / WEIGHTS_NAME))
    check_state_dict(model, sd, source=f"weights file {str(p / WEIGHTS_NAME)!r}")
    model.load_state_dict(sd)
    return model.eval().to(device=device, dtype=dtype)


@dataclass
class ExportOptions:
    """``scoresde-export``: ``ckpt`` (a run directory or checkpoint file), ``format`` (``"onnx"`` or
    ``"safetensors"``), ``out`` (directory; ``None``: ``<run dir>/export``), and for ONNX ``output`` (one of
    ``OUTPUTS``), ``opset`` (>= 17) and ``int8`` (also write the dynamic int8 model ``model.int8.onnx``)."""

    ckpt: Optional[str] = None
    format: str = "onnx"
    out: Optional[str] = None
    output: str = "net"
    opset: int = ONNX_OPSET
    int8: bool = False

    def check(self) -> "ExportOptions":
        """``ValueError`` naming the field (``ckpt`` missing, ``format``, ``output``, ``opset``, ``int8``)."""
        if not self.ckpt:
            raise ValueError("ckpt must be given: a scoresde-train run directory or checkpoint file (ckpt=<run>)")
        _check_choice("format", self.format, FORMATS)
        _check_choice("output", self.output, OUTPUTS)
        if isinstance(self.opset, bool) or not isinstance(self.opset, int) or self.opset < ONNX_OPSET:
            raise ValueError(f"opset must be an integer >= {ONNX_OPSET}; got {self.opset!r}")
        if not isinstance(self.int8, bool):
            raise ValueError(f"int8 must be a bool; got {self.int8!r}")
        if self.int8 and self.format != "onnx":
            raise ValueError("int8=true needs format=onnx (the int8 model is an onnxruntime graph)")
        return self


def run_export(options: ExportOptions, outdir=None) -> dict:
    """Export ``options.ckpt``'s EMA model into ``options.out``, else ``outdir`` (the app's output directory), else
    ``<run dir>/export``; returns ``{"format", "dir", "files", "options"}`` (the paths written).

    ONNX writes ``model.onnx`` (and ``model.int8.onnx`` with ``int8``) plus ``config.json`` and the model card
    ``README.md``; safetensors writes ``model.safetensors``, ``config.json``, ``README.md``.
    """
    o = options.check()
    out = Path(o.out) if o.out else Path(outdir) if outdir is not None else _run_dir(o.ckpt) / "export"
    if o.format == "safetensors":
        export_safetensors(o.ckpt, out)
        files = [WEIGHTS_NAME, CONFIG_NAME, CARD_NAME]
    else:
        from .checkpoint import load_checkpoint

        model, _ = build.load(o.ckpt, ema=True)
        export_onnx(model, out / ONNX_NAME, output=o.output, opset=o.opset)
        files = [ONNX_NAME]
        if o.int8:
            quantize_onnx(out / ONNX_NAME, out / ONNX_INT8_NAME)
            files.append(ONNX_INT8_NAME)
        (out / CONFIG_NAME).write_text(json.dumps(model.spec, indent=2) + "\n")
        step = load_checkpoint(build.find_checkpoint(o.ckpt), map_location="cpu").get("step")
        card = model_card(model.spec, _metrics(_run_dir(o.ckpt)), step, sum(p.numel() for p in model.parameters()))
        card += (f"\nONNX: `{ONNX_NAME}`, opset {o.opset}, inputs {_inputs_note(_num_classes(model))}; output `out` = {o.output}"
                 + (f" (the network's raw output; parameterisation {model.parameterization})" if o.output == "net" else "") + ".\n")
        (out / CARD_NAME).write_text(card)
        files += [CONFIG_NAME, CARD_NAME]
    return {"format": o.format, "dir": str(out), "files": [str(out / f) for f in files], "options": dataclasses.asdict(o)}
