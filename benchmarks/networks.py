"""Forward and forward+backward time and peak memory of the full-size CIFAR-10 score_sde networks.

Networks (``scoresde.nets.NCSNpp`` with the reference's structure, built by ``score_sde_nets.NETS``):
DDPM++ cont. (``NCSNpp()``, 61.8M params), DDPM++ deep (``NCSNpp(num_res_blocks=8)``), NCSN++ cont.
(``NCSNpp(fir=True, progressive_input="residual", embedding_type="fourier", scale_by_sigma=True,
centered=False)``); ``--nets`` also takes ``ncsnpp_deep`` and ``ddpm``. Input: a batch of random
3x32x32 images and noise labels 500 (VP nets, 999 t) or 1.0 (VE nets, sigma).

Per (device, options, net, batch, mode) a fresh subprocess builds the net, makes one untimed warm-up
call at the measured shape (under ``torch.compile`` this is the compile) and then ``repeats`` timed
calls; batches >= ``--large-batch`` get ``--large-repeats`` timed calls (default 1) and, on CPU, a
warm-up at ``--large-warmup-batch`` images (default 1: a full-size warm-up of batch 64 forward+backward
would cost minutes); the table gives the median wall time and,
on CPU, the median process CPU time (summed over the threads; the steadier number on a shared machine).

* ``fwd``: eval mode, ``torch.no_grad()``, one forward call.
* ``fwd+bwd``: train mode (dropout on), forward, ``out.float().square().mean().backward()``, with the
  parameter gradients set to ``None`` before each call (so allocating them is part of the call, as a
  training step with ``zero_grad(set_to_none=True)``).

Peak memory is the increase during the warm-up and timed calls over the state just before them (net
weights, input and labels already resident), in MiB:

* CUDA: ``torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated()`` after
  ``torch.cuda.reset_peak_memory_stats()`` (tensor memory only; the caching allocator's reserve and the
  CUDA context are not counted); the absolute ``max_memory_allocated`` goes in the raw-data section.
* CPU: the process's peak resident set size minus its RSS before the calls. The high-water mark
  (``VmHWM`` in ``/proc/self/status``) is first reset to the current RSS by writing ``5`` to
  ``/proc/self/clear_refs`` (Linux >= 4.0), so the transient of building the net does not hide the
  calls' peak; where that reset is unavailable ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` is used
  and the number is a lower bound whenever building the net peaked higher. tracemalloc does not see
  tensor memory (torch allocates outside Python's allocator), so it is not used. The fresh process per
  measurement keeps memory freed by an earlier measurement (and kept by malloc) out of the next one.

CUDA runs (when ``torch.cuda.is_available()``) cover each of ``--cuda-options``: ``fp32`` (plain),
``channels_last`` (net and input in channels-last memory format), ``bf16`` (``torch.autocast("cuda",
torch.bfloat16)`` around the forward), ``compile`` (``torch.compile(net)``), joined with ``+``.

Likelihood (``--likelihood``): seconds per CIFAR-10-size image of ``scoresde.log_likelihood(model.score_fn,
sde, x, divergence="hutchinson", probes=1, rtol=1e-5, atol=1e-5)`` with DDPM++ cont. in
``ScoreModel(net, VPSDE(), "eps")`` on ``--ll-batch`` random images in [-1, 1]; NFE, wall seconds, s per
image, s per NFE. The weights are random and NCSNpp's output convolutions are initialised at scale
~1e-10 (``init_scale=0``, as the reference), so the network's output is ~0, the PF-ODE is nearly the
linear VP drift, and the NFE (hence the seconds) is far below a trained network's; s per NFE (one
forward + one VJP at that batch) is the transferable number.

    python benchmarks/networks.py                        # full run: CPU (+ CUDA when available)
    python benchmarks/networks.py --quick                # smoke test (DDPM++, batch 1, loose likelihood), writes nothing
    python benchmarks/networks.py --nets ddpmpp --batches 8 --repeats 5 --device cpu --no-likelihood --out -
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from score_sde_nets import NETS, time_calls  # noqa: E402

TITLES = {"ddpmpp": "DDPM++ cont.", "ddpmpp_deep": "DDPM++ deep", "ncsnpp": "NCSN++ cont.",
          "ncsnpp_deep": "NCSN++ deep", "ddpm": "DDPM"}
CUDA_OPTIONS = ["fp32", "channels_last", "bf16", "compile", "channels_last+bf16+compile"]
OPTION_NAMES = {"fp32", "channels_last", "bf16", "compile"}
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "networks.md")


# ---------------------------------------------------------------------------------------------- memory probes
def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _maxrss_kib() -> int:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb // 1024 if sys.platform == "darwin" else kb  # bytes on macOS, KiB on Linux


def cpu_peak_start() -> tuple[int, str]:
    """Current RSS (KiB) and the method the peak will be read with; resets the high-water mark if possible."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        rss, hwm = _status_kib("VmRSS"), _status_kib("VmHWM")
        if rss is not None and hwm is not None and hwm <= rss + 1024:  # the reset took
            return rss, "VmHWM reset via /proc/self/clear_refs"
    except OSError:
        pass
    rss = _status_kib("VmRSS")
    if rss is None:
        rss = _maxrss_kib()
    return rss, "ru_maxrss (lower bound if building the net peaked higher)"


def cpu_peak_kib(method: str) -> int:
    return _status_kib("VmHWM") if method.startswith("VmHWM") else _maxrss_kib()


# ---------------------------------------------------------------------------------------------- one measurement
def measure(net_name: str, batch: int, mode: str, device: str, options: str, repeats: int, threads: int,
            warmup_batch: int = 0) -> dict:
    """Time ``mode`` ("fwd" or "fwdbwd") of one net at one batch; run in a fresh process (see the module docstring).
    ``warmup_batch`` (0 < it < batch): make the warm-up call on the first ``warmup_batch`` images instead."""
    torch.set_num_threads(threads)
    opts = set(options.split("+"))
    build, label = NETS[net_name]
    torch.manual_seed(0)
    net = build().to(device)
    params = sum(p.numel() for p in net.parameters())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=g).to(device)
    labels = torch.full((batch,), label, device=device)
    if "channels_last" in opts:
        net = net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    net.train(mode == "fwdbwd")
    model = torch.compile(net) if "compile" in opts else net
    bf16 = "bf16" in opts

    def forward(n):
        with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            return model(x[:n], labels[:n])

    if mode == "fwd":
        def call(n=batch):
            with torch.no_grad():
                forward(n)
    else:
        def call(n=batch):
            for p in net.parameters():
                p.grad = None
            forward(n).float().square().mean().backward()

    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        mem_method = "cuda max_memory_allocated - memory_allocated"
    else:
        base_kib, mem_method = cpu_peak_start()
    t0 = time.perf_counter()
    small = 0 < warmup_batch < batch
    if small:
        call(warmup_batch)
    times, cpu = time_calls(call, repeats, warmup=0 if small else 1, sync=torch.cuda.synchronize if cuda else None)
    total = time.perf_counter() - t0
    if cuda:
        peak_abs = torch.cuda.max_memory_allocated() / 2**20
        peak_inc = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak_abs = cpu_peak_kib(mem_method) / 1024
        peak_inc = peak_abs - base_kib / 1024
    return dict(net=net_name, params=params, batch=batch, mode=mode, device=device, options=options,
                threads=torch.get_num_threads(), repeats=repeats, times_s=times, cpu_s=cpu,
                median_s=statistics.median(times), median_cpu_s=statistics.median(cpu),
                warmup_batch=warmup_batch if small else batch, warmup_s=total - sum(times), peak_mb=peak_inc, peak_abs_mb=peak_abs, mem_method=mem_method)


def measure_likelihood(batch: int, device: str, threads: int, rtol: float, atol: float) -> dict:
    """PF-ODE log-likelihood of ``batch`` random images with DDPM++ cont. (random weights) as a VP eps model."""
    from scoresde import VPSDE, log_likelihood
    from scoresde.model import ScoreModel

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    net = NETS["ddpmpp"][0]().to(device).eval()
    sde = VPSDE()
    model = ScoreModel(net, sde, "eps")
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(batch, 3, 32, 32, generator=g) * 2 - 1).to(device)
    gen = torch.Generator(device=device).manual_seed(1)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base_kib, mem_method = cpu_peak_start()
    t0, c0 = time.perf_counter(), time.process_time()
    res = log_likelihood(model.score_fn, sde, x, divergence="hutchinson", probes=1, rtol=rtol, atol=atol, generator=gen)
    if cuda:
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else cpu_peak_kib(mem_method) / 1024 - base_kib / 1024
    return dict(batch=batch, device=device, threads=torch.get_num_threads(), rtol=rtol, atol=atol, nfe=res.nfe,
                wall_s=wall, cpu_s=cpu, s_per_image=wall / batch, s_per_nfe=wall / res.nfe, peak_mb=peak)


# ---------------------------------------------------------------------------------------------- driver
def run_sub(args: list[str]) -> dict:
    """Run one measurement in a fresh interpreter (this file with ``--one``); returns its JSON line."""
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", json.dumps(args)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"measurement {args} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def fmt_s(med: float | None, cpu: float | None) -> str:
    if med is None:
        return "-"
    return f"{med:.3g}" + (f" ({cpu:.3g})" if cpu is not None else "")


def machine_line(threads: int) -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no CUDA"
    return f"{os.cpu_count()} CPUs ({model}), torch {torch.__version__}, torch.set_num_threads({threads}){gpu}"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nets", nargs="+", default=["ddpmpp", "ddpmpp_deep", "ncsnpp"], choices=list(NETS))
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8, 64])
    ap.add_argument("--modes", nargs="+", default=["fwd", "fwdbwd"], choices=["fwd", "fwdbwd"])
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per measurement (median reported)")
    ap.add_argument("--large-batch", type=int, default=64, help="batches >= this use --large-repeats")
    ap.add_argument("--large-repeats", type=int, default=1)
    ap.add_argument("--large-warmup-batch", type=int, default=1,
                    help="CPU, batches >= --large-batch: the warm-up call uses this many images (0: the full batch); "
                         "CUDA always warms up at the full batch (a new shape would recompile under torch.compile)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                    help="auto: CPU, then CUDA too when torch.cuda.is_available()")
    ap.add_argument("--cpu-options", nargs="+", default=["fp32"], help="'+'-joined subsets of fp32, channels_last, bf16, compile")
    ap.add_argument("--cuda-options", nargs="+", default=CUDA_OPTIONS)
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in every measurement")
    ap.add_argument("--likelihood", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--ll-batch", type=int, default=2)
    ap.add_argument("--ll-tol", type=float, default=1e-5, help="rtol = atol of the likelihood solve")
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: DDPM++ only, batch 1, 1 repeat, CPU, likelihood of 1 image at tol 1e-2; writes nothing unless --out")
    ap.add_argument("--out", default=None, help=f"markdown file to write ('-': none; default {os.path.relpath(RESULTS)}, none with --quick)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.one:
        spec = json.loads(a.one)
        rec = measure_likelihood(**spec["ll"]) if "ll" in spec else measure(**spec)
        print(json.dumps(rec))
        return
    if a.quick:
        a.nets, a.batches, a.repeats, a.large_repeats, a.ll_batch, a.ll_tol = ["ddpmpp"], [1], 1, 1, 1, 1e-2
        a.device = "cpu" if a.device == "auto" else a.device
    out = a.out if a.out is not None else (None if a.quick else RESULTS)
    out = None if out == "-" else out
    for o in a.cpu_options + a.cuda_options:
        if not set(o.split("+")) <= OPTION_NAMES:
            ap.error(f"unknown option set {o!r}; use '+'-joined {sorted(OPTION_NAMES)}")
    if a.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch.cuda.is_available() is False")
    runs = [("cpu", o) for o in a.cpu_options] if a.device in ("auto", "cpu") else []
    if a.device == "cuda" or (a.device == "auto" and torch.cuda.is_available()):
        runs += [("cuda", o) for o in a.cuda_options]

    load0 = os.getloadavg()
    t_start = time.perf_counter()
    print(f"# {machine_line(a.threads)}; load average {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}", flush=True)
    rows = []
    for device, options in runs:
        for name in a.nets:
            for b in a.batches:
                reps = a.large_repeats if b >= a.large_batch else a.repeats
                row = dict(net=name, batch=b, device=device, options=options, repeats=reps, load=os.getloadavg()[0])
                for mode in a.modes:
                    rec = run_sub(dict(net_name=name, batch=b, mode=mode, device=device, options=options,
                                       repeats=reps, threads=a.threads,
                                       warmup_batch=a.large_warmup_batch if device == "cpu" and b >= a.large_batch else 0))
                    row["params"], row[mode] = rec["params"], rec
                    print(f"{TITLES[name]:13s} b={b:3d} {device}/{options} {mode:6s}: median {rec['median_s']:.3f} s "
                          f"(CPU {rec['median_cpu_s']:.3f} s; all {[round(t, 3) for t in rec['times_s']]}; "
                          f"warm-up b={rec['warmup_batch']} {rec['warmup_s']:.2f} s), peak +{rec['peak_mb']:.0f} MiB "
                          f"(abs {rec['peak_abs_mb']:.0f}), load {os.getloadavg()[0]:.2f}", flush=True)
                rows.append(row)
    lls = []
    if a.likelihood:
        for device in dict.fromkeys(d for d, _ in runs):
            rec = run_sub(dict(ll=dict(batch=a.ll_batch, device=device, threads=a.threads, rtol=a.ll_tol, atol=a.ll_tol)))
            rec["load"] = os.getloadavg()[0]
            lls.append(rec)
            print(f"likelihood {device}: {rec}", flush=True)
    load1 = os.getloadavg()
    elapsed = time.perf_counter() - t_start

    def cell(r, mode, key):
        rec = r.get(mode)
        return None if rec is None else rec[key]

    table = ["| network | params | batch | fwd s | fwd+bwd s | fwd peak MB | fwd+bwd peak MB | device/options | repeats | load |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |"]
    for r in rows:
        cpu = r["device"] == "cpu"
        pk = [cell(r, m, "peak_mb") for m in ("fwd", "fwdbwd")]
        table.append(
            f"| {TITLES[r['net']]} | {r['params'] / 1e6:.1f}M | {r['batch']} "
            f"| {fmt_s(cell(r, 'fwd', 'median_s'), cell(r, 'fwd', 'median_cpu_s') if cpu else None)} "
            f"| {fmt_s(cell(r, 'fwdbwd', 'median_s'), cell(r, 'fwdbwd', 'median_cpu_s') if cpu else None)} "
            f"| {'-' if pk[0] is None else f'{pk[0]:.0f}'} | {'-' if pk[1] is None else f'{pk[1]:.0f}'} "
            f"| {r['device']} {r['options']}, {a.threads if cpu else ''}{' threads' if cpu else ''} | {r['repeats']} | {r['load']:.1f} |")
    ll_table = ["| device | images | rtol = atol | NFE | wall s | s / image | s / NFE | CPU s | peak MB | load |",
                "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    ll_table += [f"| {r['device']} | {r['batch']} | {r['rtol']:g} | {r['nfe']} | {r['wall_s']:.1f} | {r['s_per_image']:.1f} "
                 f"| {r['s_per_nfe']:.2f} | {r['cpu_s']:.1f} | {r['peak_mb']:.0f} | {r['load']:.1f} |" for r in lls]
    print("\n" + "\n".join(table))
    if lls:
        print("\n" + "\n".join(ll_table))
    if out is None:
        return

    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    command = " ".join(["python", os.path.relpath(os.path.abspath(__file__))] + (sys.argv[1:] if argv is None else list(argv)))
    mem = sorted({rec["mem_method"] for r in rows for m in a.modes if (rec := r.get(m))})
    raw = [f"- {TITLES[r['net']]} b={r['batch']} {r['device']}/{r['options']} {m}: wall "
           f"{[round(t, 3) for t in rec['times_s']]} s, CPU {[round(t, 3) for t in rec['cpu_s']]} s, "
           f"warm-up (batch {rec['warmup_batch']}) {rec['warmup_s']:.2f} s, peak +{rec['peak_mb']:.0f} MiB (absolute {rec['peak_abs_mb']:.0f} MiB)"
           for r in rows for m in a.modes if (rec := r.get(m))]
    large = [b for b in a.batches if b >= a.large_batch]
    lines = [
        "# Full-size CIFAR-10 networks: forward / forward+backward time and peak memory", "",
        f"Command: `{command}`  ",
        f"Commit: {commit} (the script itself was committed after this run)  ",
        f"Machine: {machine_line(a.threads)}  ",
        f"Load average (1/5/15 min): {load0[0]:.2f} / {load0[1]:.2f} / {load0[2]:.2f} at the start, "
        f"{load1[0]:.2f} / {load1[1]:.2f} / {load1[2]:.2f} at the end; whole run {elapsed / 60:.1f} min.", "",
        "Input: random 3x32x32 images, labels 500 (VP nets) / 1.0 (VE net). `fwd`: eval mode under `torch.no_grad()`; "
        "`fwd+bwd`: train mode, forward + `out.square().mean().backward()` with the gradients set to None before each call. "
        f"One untimed warm-up call at the measured shape, then the median of {a.repeats} timed calls"
        + (f" (batch {', '.join(map(str, large))}: {a.large_repeats} timed call{'s' if a.large_repeats > 1 else ', no median'}"
           + (f", on CPU after a warm-up call at batch {a.large_warmup_batch}, so first-call costs specific to the large "
              "shape (oneDNN primitive creation, first-touch page faults) are in the timed call" if a.large_warmup_batch else "")
           + ")" if large else "")
        + ". On CPU the time cells are `wall (process CPU time, summed over the threads)`. "
        "Each measurement runs in a fresh process. The load column is the 1-min load average when the row started.", "",
        "Peak MB: MiB above the state just before the calls (weights, input resident) -- "
        f"{'; '.join(mem)}. On CPU this is the process's peak RSS increase, read from VmHWM after resetting it via "
        "`/proc/self/clear_refs` (fallback `resource.getrusage().ru_maxrss`); tracemalloc cannot see tensor memory.", "",
        *table, "",
    ]
    if lls:
        lines += [
            "## PF-ODE likelihood, DDPM++ cont. in `ScoreModel(net, VPSDE(), \"eps\")`", "",
            "`scoresde.log_likelihood(model.score_fn, sde, x, divergence=\"hutchinson\", probes=1, rtol, atol)` (dopri5, "
            "eps = 1e-5) on random images in [-1, 1]; one solve, timed once. **Random weights**: NCSNpp's output "
            "convolutions start at scale ~1e-10 (`init_scale=0`, as the reference), so the untrained network outputs "
            "~0, the ODE is nearly the linear VP drift and the NFE is far lower than a trained model's -- "
            "multiply s / NFE (one forward + one vector-Jacobian product at this batch) by a trained model's NFE "
            "for a realistic cost.", "",
            *ll_table, "",
        ]
    lines += ["## Raw timings", "", *raw, ""]
    with open(out, "w") as f:
        f.write("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
