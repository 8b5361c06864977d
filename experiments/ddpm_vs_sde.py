"""Discrete DDPM vs continuous VP, sub-VP and VE SDEs: train all four, compare samplers and likelihoods.

One command (a thin wrapper over ``scoresde-compare experiment=ddpm_vs_sde``)::

    python experiments/ddpm_vs_sde.py                               # digits, CPU-sized
    python experiments/ddpm_vs_sde.py --cifar10 data.root=/data     # CIFAR-10 preset, sized for one GPU
    python experiments/ddpm_vs_sde.py train.n_steps=500 --publish experiments/results

Every argument except the flags below is a Hydra override of the ``compare`` app (``data=...``,
``model=...``, ``train.*``, ``eval.*``, ``compare.*``). For each variant the run directory gets a
complete train run (checkpoints, sample figures per sampler); the top level gets
``comparison.md``, ``comparison.csv``, ``comparison.png`` and ``metrics.json``.

Flags:
    --cifar10         use ``experiment=ddpm_vs_sde_cifar10`` instead of the digits preset.
    --publish DIR     copy the table, CSV and figure to ``DIR/ddpm_vs_sde[_cifar10].*`` with the exact
                      command, commit, machine and wall time.
    --stem NAME       publish as ``DIR/NAME.*`` instead (e.g. ``ddpm_vs_sde_convnet`` for ``model=convnet``).
"""

from __future__ import annotations

import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path


def _commit() -> str:
    try:
        here = Path(__file__).resolve().parent
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "../scoresde"], cwd=here, capture_output=True, text=True).stdout.strip()
        return sha + (" (scoresde/ has uncommitted changes)" if dirty else "")
    except Exception:
        return "unknown"


def _machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.system()} {cpu}, {os.cpu_count()} logical CPUs, {gpu}, torch {torch.__version__}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"


def main(argv=None) -> None:
    from scoresde.cli import compare_main

    argv_given = None if argv is None else list(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    publish = None
    if "--publish" in argv:
        i = argv.index("--publish")
        publish = Path(argv[i + 1])
        del argv[i: i + 2]
    stem = None
    if "--stem" in argv:
        i = argv.index("--stem")
        stem = argv[i + 1]
        del argv[i: i + 2]
    preset = "ddpm_vs_sde"
    if "--cifar10" in argv:
        argv.remove("--cifar10")
        preset = "ddpm_vs_sde_cifar10"
    if not any(a.startswith("experiment=") for a in argv):
        argv = [f"experiment={preset}"] + argv
    run_dir = next((a.split("=", 1)[1] for a in argv if a.startswith("hydra.run.dir=")), None)
    if publish is not None and run_dir is None:
        run_dir = f"outputs/compare/{preset}-{time.strftime('%Y%m%d-%H%M%S')}"
        argv.append(f"hydra.run.dir={run_dir}")
    t0, commit = time.time(), _commit()  # the code the run starts from
    compare_main(argv)
    if publish is not None:
        publish.mkdir(parents=True, exist_ok=True)
        src = Path(run_dir)
        stem = stem or preset
        for ext in ("csv", "png"):
            shutil.copyfile(src / f"comparison.{ext}", publish / f"{stem}.{ext}")
        shutil.copyfile(src / "metrics.json", publish / f"{stem}_metrics.json")
        cmd = "python experiments/ddpm_vs_sde.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv_given is None else argv_given))
        header = [
            f"# {stem}: discrete DDPM vs continuous VP / sub-VP / VE",
            "",
            f"- command: `{cmd}`",
            f"- commit: `{commit}`",
            f"- machine: {_machine()}",
            f"- wall time: {(time.time() - t0) / 60:.1f} min",
            f"- run directory: `{src}` (config.yaml there holds every setting)",
            "",
        ]
        (publish / f"{stem}.md").write_text("\n".join(header) + "\n" + (src / "comparison.md").read_text())
        print(f"published to {publish}/{stem}.*")


if __name__ == "__main__":
    main()
