"""Training throughput: steps/s and peak memory of ``scoresde.train.train`` per model size and batch.

Each configuration runs in its own subprocess (so the CPU peak RSS belongs to it alone) and trains
with the real loop (Adam, warm-up, clipping, EMA, final checkpoint) on random data with a VP ε-loss
written inline (``E |net(m x0 + s z, 999 t) - z|^2``, t ~ U(1e-5, 1)), so the numbers measure the
loop and the network, not a particular loss module. steps/s is taken over the second half of the
run (the first half is warm-up), in wall-clock time and in the process's CPU time (the steadier
number on a machine shared with other jobs; with one thread the two agree on an idle machine).
Memory: CUDA ``torch.cuda.max_memory_allocated``; CPU the process's peak resident set size
(``resource.getrusage``), which includes torch itself.

    OMP_NUM_THREADS=1 python benchmarks/train_throughput.py --steps 60 --out benchmarks/results/train_throughput
    OMP_NUM_THREADS=1 python benchmarks/train_throughput.py --configs mlp-64d-h512-d3-quickstart unet_tiny convnet-8x8-ch32 dit_tiny \
        --batches 128 --steps 200 --out benchmarks/results/train_throughput_digits
    python benchmarks/train_throughput.py --device cuda --amp bf16 --steps 400
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

CONFIGS = {
    # name: (kind, kwargs, data shape)
    "mlp-2d-h128-d3": ("mlp", dict(dim=2, hidden=128, depth=3), (2,)),
    "mlp-64d-h256-d3": ("mlp", dict(dim=64, hidden=256, depth=3), (64,)),
    "mlp-64d-h512-d4": ("mlp", dict(dim=64, hidden=512, depth=4), (64,)),
    "unet-8x8-ch32": ("unet", dict(in_channels=1, image_size=8, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                                   attn_resolutions=(4,), dropout=0.0), (1, 8, 8)),
    # the three networks of the digits quickstart comparison, at the settings their configs / recipes use
    "mlp-64d-h512-d3-quickstart": ("mlp", dict(dim=64, hidden=512, depth=3, dropout=0.1), (64,)),
    "unet_tiny": ("unet", dict(in_channels=1, image_size=8, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                               num_groups=8), (1, 8, 8)),
    "convnet-8x8-ch32": ("conv", dict(in_channels=1, image_size=8, ch=32, ch_mult=(1, 2), num_res_blocks=1), (1, 8, 8)),
    "dit_tiny": ("dit", dict(in_channels=1, image_size=8, patch_size=2, hidden_size=96, depth=4, num_heads=4), (1, 8, 8)),
    "unet-32x32-ch64": ("unet", dict(in_channels=3, image_size=32, ch=64, ch_mult=(1, 2, 2), num_res_blocks=2,
                                     attn_resolutions=(16,), dropout=0.1), (3, 32, 32)),
}


def run_one(name: str, batch: int, steps: int, device: str, amp: str) -> dict:
    import torch

    from scoresde.nets import ConvScoreNet, DiT, MLPScoreNet, UNet
    from scoresde.sde import VPSDE, batch_broadcast
    from scoresde.train import TrainOptions, train

    kind, kw, shape = CONFIGS[name]
    net = {"mlp": MLPScoreNet, "unet": UNet, "conv": ConvScoreNet, "dit": DiT}[kind](**kw).to(device)
    sde = VPSDE()

    def loss_fn(model, x0, g):
        t = torch.rand(x0.shape[0], generator=g, device=x0.device, dtype=x0.dtype) * (1 - 1e-5) + 1e-5
        z = torch.randn(x0.shape, generator=g, device=x0.device, dtype=x0.dtype)
        m, s = sde.marginal_coef(t)
        xt = batch_broadcast(m, x0) * x0 + batch_broadcast(s, x0) * z
        return (model(xt, 999 * t) - z).pow(2).mean()

    data = torch.randn((max(4 * batch, 1024),) + shape, generator=torch.Generator().manual_seed(0))
    half = max(steps // 2, 1)
    opts = TrainOptions(n_steps=2 * half, batch_size=batch, warmup=100, log_every=half, amp=amp, ema_rate=0.999, eval_every=half)
    cpu_marks = []  # process CPU time at steps half and 2 half (eval_fn runs right after the log line of those steps)

    def mark(ema_model, step):
        cpu_marks.append(time.process_time())
        return {}

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as wd:
        t0 = time.perf_counter()
        res = train(net, loss_fn, data, opts, wd, eval_fn=mark, progress=False)
        wall = time.perf_counter() - t0
    rec = {
        "config": name, "params": sum(p.numel() for p in net.parameters()), "batch": batch, "steps": 2 * half,
        "steps_per_s": [h for h in res.history if "steps_per_s" in h][-1]["steps_per_s"],
        "cpu_steps_per_s": half / (cpu_marks[-1] - cpu_marks[-2]), "wall_s": wall, "device": device, "amp": res.amp,
        "threads": torch.get_num_threads(), "final_loss": res.loss,
    }
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        rec["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
        rec["mem_kind"] = "cuda max_memory_allocated"
    else:
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        rec["peak_mem_mb"] = kb / 1024 * (1 / 1024 if sys.platform == "darwin" else 1)
        rec["mem_kind"] = "peak RSS of the process"
    rec["examples_per_s"] = rec["steps_per_s"] * batch
    rec["cpu_examples_per_s"] = rec["cpu_steps_per_s"] * batch
    return rec


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=["mlp-2d-h128-d3", "mlp-64d-h256-d3", "mlp-64d-h512-d4", "unet-8x8-ch32"],
                    choices=sorted(CONFIGS))
    ap.add_argument("--batches", nargs="+", type=int, default=[128, 512])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", default="off", choices=["off", "bf16", "fp16", "auto"])
    ap.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    ap.add_argument("--one", nargs=2, metavar=("CONFIG", "BATCH"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.steps < 2:
        ap.error("--steps must be >= 2")
    if a.one:
        print(json.dumps(run_one(a.one[0], int(a.one[1]), a.steps, a.device, a.amp)))
        return
    rows = []
    for name in a.configs:
        for b in a.batches:
            cmd = [sys.executable, __file__, "--one", name, str(b), "--steps", str(a.steps), "--device", a.device, "--amp", a.amp]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rec = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(rec)
            print(f"{name:26s} params {rec['params']:>9,d} batch {b:5d}: {rec['steps_per_s']:8.2f} steps/s "
                  f"{rec['examples_per_s']:10.0f} ex/s ({rec['cpu_steps_per_s']:.2f} steps/s in CPU time)  "
                  f"peak {rec['peak_mem_mb']:8.1f} MiB", flush=True)
    if a.out:
        import torch

        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        meta = {"command": " ".join([os.path.basename(sys.executable)] + sys.argv), "commit": commit,
                "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cpus".strip(),
                "torch": torch.__version__, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}
        with open(a.out + ".json", "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        lines = [f"# Training throughput ({a.device}, amp={a.amp})", "",
                 f"Command: `{meta['command']}`  ", f"Commit {commit}, {meta['machine']}, torch {meta['torch']}, "
                 f"OMP_NUM_THREADS={meta['OMP_NUM_THREADS']}. Memory: {rows[0]['mem_kind']}.", "",
                 "| config | params | batch | steps/s | examples/s | steps/s (CPU time) | examples/s (CPU time) | peak MiB |",
                 "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        lines += [f"| {r['config']} | {r['params']:,} | {r['batch']} | {r['steps_per_s']:.2f} | {r['examples_per_s']:.0f} | "
                  f"{r['cpu_steps_per_s']:.2f} | {r['cpu_examples_per_s']:.0f} | {r['peak_mem_mb']:.0f} |" for r in rows]
        with open(a.out + ".md", "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
