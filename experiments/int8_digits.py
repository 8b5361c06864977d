"""Dynamic int8 quantisation of an exported digits model for CPU inference: latency, bits/dim and FD before and after.

The trained run's EMA network is exported by ``scoresde.export.export_onnx`` (opset 17, ``output="score"``: the graph
computes the score ``(x, t) -> grad log p_t(x)`` itself) and quantised by ``scoresde.export.quantize_onnx``
(onnxruntime ``quantize_dynamic``: QInt8 weights of every MatMul / Gemm, activations quantised per tensor at run time).
Three versions of the same model are compared, all in float32 on one CPU thread:

* ``torch fp32``: the PyTorch model (the reference; its likelihood uses autograd);
* ``onnx fp32``: onnxruntime on the exported graph;
* ``onnx int8``: onnxruntime on the quantised graph.

Measured:

* latency: median seconds of one forward call (the score of a batch) at batch 1 and at batch ``--batch`` (300 = the test
  split), over ``--repeats`` calls after 3 warm-up calls;
* FD: 300 samples (DPM-Solver-3, 20 steps, the quickstart sampler; the run's sampling seed) against the 300 test images
  on the cached digits classifier's features, and FD's floor at the same N (300 training images vs test);
* test bits/dim, two ways. (a) The DDPM ELBO (``scoresde.evaluate_elbo``, large variance) on the 300 test images,
  estimated without bias from ``--elbo-terms`` stratified terms (the same strata, noise and dequantisation for every
  version, so the differences are paired); it needs only ε evaluations, so it is exact for every version. (b) The
  probability-flow ODE NLL (``evaluate_bpd``, Hutchinson, 1 probe, rtol = atol = 1e-5, eps = 1e-5) on the first
  ``--ode-n`` test images. An onnxruntime graph has no autograd, so for the ONNX versions the
  Hutchinson quadratic form ``v^T J v`` of the score's Jacobian ``J`` comes from a central difference along ``v``,
  ``v^T (s(x + h u) - s(x - h u)) / (2 h) |v|`` with ``u = v / |v|`` and ``h = --fd-rel * s(t)`` (the noise scale at
  ``t``: the score varies on that scale). The fp32 ONNX row, against torch's autograd row, shows what this estimator
  costs; the int8 row uses the same estimator. The int8 network is a step function of its input at the resolution of
  its activation quantisation, so its (b) is the difference quotient at scale ``h``, not a derivative: (a) is the
  number to trust for it.

    OMP_NUM_THREADS=1 nice -n 5 python experiments/int8_digits.py --run outputs/dit_digits/dit_tiny \
        --out experiments/results/int8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from scoresde.elbo import evaluate_elbo
from scoresde.evaluate import EvalOptions, draw_samples, image_fd
from scoresde.export import export_onnx, onnx_session, quantize_onnx
from scoresde.likelihood import evaluate_bpd
from scoresde.runs import load_run, load_split, stream_seed

VERSIONS = ("torch fp32", "onnx fp32", "onnx int8")
SAMPLER = dict(method="dpm_solver", steps=20, order=3, multistep=True, schedule="logSNR", lower_order_final=True)
BPD = dict(divergence="hutchinson", probes=1, rtol=1e-5, atol=1e-5, eps=1e-5)


def ort_fn(session):
    """``fn(x, t) -> tensor like x`` running the exported graph (inputs ``x``, ``t``; float32 numpy round trip)."""

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t.expand(x.shape[0]) if t.dim() == 0 else t
        out = session.run(["out"], {"x": x.detach().float().cpu().numpy(), "t": t.detach().float().cpu().numpy()})[0]
        return torch.from_numpy(out).to(device=x.device, dtype=x.dtype)

    return fn


class _DifferenceJacobian(torch.autograd.Function):
    """``score(x, t)`` whose backward returns the central difference ``J g`` (a JVP) where autograd expects ``J^T g``.

    Only valid for the quadratic forms ``g^T J g`` that the Hutchinson / exact-trace divergence forms (``g^T J^T g =
    g^T J g``); see the module docstring. Step ``h = rel * s(t)`` along the unit direction ``g / |g|``.
    """

    @staticmethod
    def forward(ctx, x, t, fn, s_fn, rel):
        ctx.save_for_backward(x, t)
        ctx.fn, ctx.s_fn, ctx.rel = fn, s_fn, rel
        return fn(x, t)

    @staticmethod
    def backward(ctx, g):
        x, t = ctx.saved_tensors
        shape = (-1,) + (1,) * (x.dim() - 1)
        n = g.flatten(1).norm(dim=1).clamp_min(torch.finfo(g.dtype).tiny).reshape(shape)
        h = (ctx.rel * ctx.s_fn(t)).reshape(shape)
        u = g / n
        with torch.no_grad():
            jvp = (ctx.fn(x + h * u, t) - ctx.fn(x - h * u, t)) / (2 * h)
        return n * jvp, None, None, None, None


def difference_score_fn(fn, sde, rel: float):
    s_fn = lambda t: sde.marginal_coef(t)[1]
    return lambda x, t: _DifferenceJacobian.apply(x, t.expand(x.shape[0]) if t.dim() == 0 else t, fn, s_fn, rel)


def median_latency(fn, x, t, repeats: int) -> float:
    for _ in range(3):
        fn(x, t)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(x, t)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def evaluate(name, score_fn, eps_fn, run, a, grad_free: bool) -> dict:
    """Latency, FD (+ floor), ELBO and PF-ODE bits/dim of one version."""
    sde, device, dtype = run.sde, torch.device("cpu"), torch.float32
    test = load_split(run.data, "test", seed=run.seed)
    g = torch.Generator().manual_seed(0)
    row = {"version": name}
    with torch.no_grad():
        for b in (1, a.batch):
            x, t = torch.randn((b, *run.shape), generator=g), torch.rand(b, generator=g) * 0.99 + 0.01
            row[f"latency_b{b}_s"] = median_latency(score_fn, x, t, a.repeats)
        xs, nfes, secs = draw_samples(score_fn, sde, run.shape, SAMPLER, a.n_samples, a.batch, run.seed, device, dtype)
        row.update({"sample_seconds": secs, "nfe": nfes[0]})
        row.update(image_fd(xs, test, run.data, EvalOptions(), seed=run.seed, device=device))
        t0 = time.perf_counter()
        el = evaluate_elbo(eps_fn, sde, test.x, levels=test.levels, centered=run.data.centered, batch_size=a.batch, terms=a.elbo_terms,
                           generator=torch.Generator().manual_seed(stream_seed(run.seed, 3)), dtype=dtype, device=device)
        row.update({"elbo_bpd": el.mean, "elbo_stderr": el.stderr, "elbo_seconds": time.perf_counter() - t0})
    if a.skip_ode:
        return row
    bpd_score = difference_score_fn(score_fn, sde, a.fd_rel) if grad_free else score_fn
    t0 = time.perf_counter()
    res = evaluate_bpd(bpd_score, sde, test.x[: a.ode_n], levels=test.levels, centered=run.data.centered, batch_size=a.batch,
                       generator=torch.Generator().manual_seed(stream_seed(run.seed, 2)), dtype=dtype, device=device, **BPD)
    row.update({"bpd": res.mean, "bpd_stderr": res.stderr, "bpd_n": int(res.bpd.numel()), "bpd_nfe": res.nfe, "bpd_seconds": time.perf_counter() - t0,
                "bpd_divergence": f"central difference, h = {a.fd_rel} s(t)" if grad_free else "autograd"})
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a scoresde-train run directory (digits)")
    ap.add_argument("--work", default=None, help="where the ONNX files go (default RUN/export_int8)")
    ap.add_argument("--batch", type=int, default=300)
    ap.add_argument("--n-samples", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--fd-rel", type=float, default=0.1)
    ap.add_argument("--elbo-terms", type=int, default=100)
    ap.add_argument("--ode-n", type=int, default=100, help="test images for the PF-ODE bits/dim")
    ap.add_argument("--skip-ode", action="store_true", help="leave out the PF-ODE bits/dim")
    ap.add_argument("--versions", nargs="+", default=list(VERSIONS), choices=VERSIONS, help="versions to measure")
    ap.add_argument("--ode-versions", nargs="+", default=list(VERSIONS), choices=VERSIONS,
                    help="versions that get the PF-ODE bits/dim")
    ap.add_argument("--rows", default=None, help="a JSON-lines file of rows measured before (printed by this script), "
                                                     "put in front of the new ones in the table")
    ap.add_argument("--ode-note", default=None, help="a note for the table on versions left out of the PF-ODE")
    ap.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    run = load_run(a.run, torch.device("cpu"), torch.float32)
    model = run.model.eval()
    work = Path(a.work or Path(a.run) / "export_int8")
    paths = {}
    for out in ("score", "eps"):
        fp32 = export_onnx(model, work / f"{out}.onnx", output=out)
        paths[out] = (fp32, quantize_onnx(fp32, work / f"{out}.int8.onnx"))
    sizes = {k: [p.stat().st_size for p in v] for k, v in paths.items()}
    sess = {k: [onnx_session(p, threads=1) for p in v] for k, v in paths.items()}
    versions = [("torch fp32", model.score_fn, model.ddpm_eps_fn(), False)]
    for i, name in enumerate(("onnx fp32", "onnx int8")):
        eps_graph = ort_fn(sess["eps"][i])
        ddpm_eps = lambda x, k, f=eps_graph: f(x, model.ddpm_time(k.to(x.device), dtype=x.dtype))
        versions.append((name, ort_fn(sess["score"][i]), ddpm_eps, True))
    rows = [json.loads(line) for line in Path(a.rows).read_text().splitlines() if line.strip()] if a.rows else []
    skip_ode = a.skip_ode
    for name, score_fn, eps_fn, grad_free in versions:
        if name not in a.versions:
            continue
        a.skip_ode = skip_ode or name not in a.ode_versions
        rows.append(evaluate(name, score_fn, eps_fn, run, a, grad_free))
        print(json.dumps(rows[-1]), flush=True)
    n_params = sum(p.numel() for p in model.parameters())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    meta = {"command": " ".join(["python"] + sys.argv), "commit": commit, "run": a.run, "net": run.model.spec["net"],
            "params": n_params, "onnx_bytes_fp32_int8": sizes["score"], "torch": torch.__version__,
            "onnxruntime": __import__("onnxruntime").__version__,
            "machine": f"{platform.machine()} {os.cpu_count()} cpus (shared with other jobs)", "threads": 1}
    if a.out:
        Path(a.out + ".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
        Path(a.out + ".md").write_text(table(meta, rows, a))
    print(table(meta, rows, a))


def table(meta, rows, a) -> str:
    ref = rows[0]
    lines = [f"# Dynamic int8 quantisation of a digits model ({meta['net']['name']}, {meta['params']:,} parameters)", "",
             f"Command: `{meta['command']}`  ", f"Commit {meta['commit']}, run `{meta['run']}`, {meta['machine']}, 1 thread, "
             f"torch {meta['torch']}, onnxruntime {meta['onnxruntime']}. ONNX file size fp32 / int8: "
             f"{meta['onnx_bytes_fp32_int8'][0] / 1e6:.2f} / {meta['onnx_bytes_fp32_int8'][1] / 1e6:.2f} MB.", "",
             f"| version | latency batch 1 (ms) | latency batch {a.batch} (ms) | speed-up at {a.batch} vs torch | FD ({a.n_samples} samples) | "
             f"FD floor | test ELBO bits/dim ({a.elbo_terms} terms, n = 300) | test bits/dim (PF-ODE, n = {a.ode_n}) | divergence |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        bpd = f"{r['bpd']:.3f} ± {r['bpd_stderr']:.3f}" if "bpd" in r else "–"
        lines.append(f"| {r['version']} | {1e3 * r['latency_b1_s']:.2f} | {1e3 * r[f'latency_b{a.batch}_s']:.1f} | "
                     f"{ref[f'latency_b{a.batch}_s'] / r[f'latency_b{a.batch}_s']:.2f}x | {r.get('fd', float('nan')):.1f} | "
                     f"{r.get('fd_floor', float('nan')):.1f} | {r['elbo_bpd']:.3f} ± {r['elbo_stderr']:.3f} | {bpd} | "
                     f"{r.get('bpd_divergence', '–')} |")
    if a.ode_note:
        lines += ["", a.ode_note]
    lines += ["", "Latency: median of one score evaluation (the network plus the score conversion) over "
              f"{a.repeats} calls. FD: DPM-Solver-3, 20 steps, the run's sampling seed; floor: {a.n_samples} training "
              f"images vs the 300 test images. ELBO: DDPM, unbiased stratified estimate from {a.elbo_terms} of the 1000 terms. PF-ODE: Hutchinson 1 probe, rtol = atol = 1e-5, "
              "eps = 1e-5; see the script's docstring for the central-difference divergence of the ONNX rows."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
