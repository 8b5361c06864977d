"""Forward-pass time of the full-size score_sde networks (scoresde.nets.NCSNpp / DDPM).

The protocol of the reference timing (FACTS: score_sde_pytorch on CPU, 2 threads, float32, eval mode,
a batch of 8 CIFAR-10-sized images, median of 3: DDPM++ cont. 1.01 s, NCSN++ cont. 1.61 s): one
warm-up call, then the median of ``--repeats`` timed calls under ``torch.no_grad()``. Wall time is
what the protocol asks for; on a shared machine it is dominated by other load (OpenMP threads then
wait for each other), so the process CPU time is recorded too: with ``--threads 1`` it measures the
work itself and is the fairer number for comparing two implementations there.

``--fir per-channel`` swaps the FIR resampling for the way the reference's pure-PyTorch
``upfirdn2d_native`` computes it (every channel as its own one-channel image, zero insertion by
padding a reshaped tensor), so the cost of that path can be compared on the same machine.

    python benchmarks/score_sde_nets.py --threads 2
    python benchmarks/score_sde_nets.py --threads 2 --nets ncsnpp --fir per-channel
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from scoresde.nets import DDPM, NCSNpp, fir

VE = dict(fir=True, progressive_input="residual", embedding_type="fourier", scale_by_sigma=True, centered=False)
NETS = {
    "ddpmpp": (lambda: NCSNpp(), 500.0),  # DDPM++ cont. (VP), labels 999 t
    "ddpmpp_deep": (lambda: NCSNpp(num_res_blocks=8), 500.0),
    "ncsnpp": (lambda: NCSNpp(**VE), 1.0),  # NCSN++ cont. (VE), labels sigma
    "ncsnpp_deep": (lambda: NCSNpp(num_res_blocks=8, **VE), 1.0),
    "ddpm": (lambda: DDPM(), 500.0),
}


def _per_channel_upfirdn(x, k, up, down, p0, p1):
    """upfirdn2d computed one channel at a time as a (B C, 1, H, W) batch (the reference's native route)."""
    B, C, H, W = x.shape
    y = x.reshape(-1, H, 1, W, 1)
    y = F.pad(y, (0, up - 1, 0, 0, 0, up - 1)).reshape(-1, 1, H * up, W * up)
    y = F.pad(y, (max(p0, 0), max(p1, 0), max(p0, 0), max(p1, 0)))
    y = F.conv2d(y, torch.flip(k, (0, 1)).to(y)[None, None])
    y = y[:, :, ::down, ::down]
    return y.reshape(B, C, y.shape[2], y.shape[3])


def use_per_channel_fir() -> None:
    fir._fir_down = lambda x, k, down, p0, p1: _per_channel_upfirdn(x, k, 1, down, p0, p1)
    fir._fir_up = lambda x, k, up, p0, p1: _per_channel_upfirdn(x, k, up, 1, p0, p1)


def time_calls(fn, repeats: int, warmup: int = 1, sync=None) -> tuple[list[float], list[float]]:
    """``warmup`` untimed calls of ``fn()``, then ``repeats`` timed ones: the wall (``perf_counter``) and
    process CPU (``process_time``) seconds of each. ``sync`` (e.g. ``torch.cuda.synchronize``) is called
    after every call, inside the timed interval, so asynchronous devices are timed to completion."""
    sync = sync or (lambda: None)
    for _ in range(warmup):
        fn()
        sync()
    times, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return times, cpu


def time_net(name: str, batch: int, repeats: int) -> dict:
    build, label = NETS[name]
    net = build().eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=g)
    labels = torch.full((batch,), label)
    with torch.no_grad():
        times, cpu = time_calls(lambda: net(x, labels), repeats)
    return dict(net=name, params=sum(p.numel() for p in net.parameters()), batch=batch,
                times_s=[round(t, 4) for t in times], median_s=round(statistics.median(times), 4),
                cpu_s=[round(t, 4) for t in cpu], median_cpu_s=round(statistics.median(cpu), 4))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nets", nargs="+", default=["ddpmpp", "ncsnpp"], choices=list(NETS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--fir", choices=["depthwise", "per-channel"], default="depthwise")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.fir == "per-channel":
        use_per_channel_fir()
    rows = []
    for name in args.nets:
        row = time_net(name, args.batch, args.repeats)
        row.update(threads=args.threads, fir=args.fir, load_average=os.getloadavg()[0])
        rows.append(row)
        print(json.dumps(row))
    if args.out:
        meta = dict(torch=torch.__version__, machine=platform.machine(), processor=platform.processor(), cpus=os.cpu_count())
        with open(args.out, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
