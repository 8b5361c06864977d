"""Progressive distillation of the trained quickstart model on the 8x8 digits (issue 15: "on digits a 4-step student
within 1.2x the teacher's FD at 20 NFE").

Teacher: ``scoresde-train experiment=quickstart`` (ConvScoreNet, VP, 2500 steps; trained first into ``--teacher-run``
when that holds no checkpoint). Its FD at 20 NFE with DDIM (eta 0), DPM-Solver-3M and DPM-Solver++(2M), and its own
DDIM on the students' grids (the same NFE without distillation). Students: ``run_distill`` with ``teacher="run"``:
the teacher's network class started from its weights, v-parameterised, round 0 fitting the teacher's data prediction
on the ``--start-steps`` grid, then halving down to ``--final-steps``. Quality: the project's Fréchet distance on the
digits classifier's features and k-NN precision / recall (``evaluate.image_quality``) of ``--n`` samples against the
test split, each with its floor (``--n`` training images); mean (and sd) over ``--sets`` sample sets.

    OMP_NUM_THREADS=1 python experiments/distill_digits.py [--teacher-run /tmp/d_work/teacher] [--workdir /tmp/d_work/distill_clip]
        [--start-steps 32] [--final-steps 4] [--n-steps 1200] [--first-round-steps N] [--lr 3e-4] [--sets 5] [--no-clip]
        [--round0-from WORKDIR] [--teacher-from JSON] [--out-name distill_digits] [--report-only]

Writes experiments/results/<out-name>.{json,md}. A stopped run resumes from its workdirs (scoresde.train checkpoints).
``--round0-from``: start round 0 from another workdir's round-0 checkpoint (same options but a shorter round 0), which
continues it to ``--first-round-steps`` exactly as one uninterrupted run would (constant learning rate; scoresde.train
resumes bitwise). ``--teacher-from``: take the teacher's numbers from an earlier results JSON of the same teacher run
(same samplers, sets and seeds) instead of sampling them again.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from scoresde.build import find_checkpoint
from scoresde.distill import DistillOptions, evaluate_sets, load_teacher_run, quality_scorer, run_distill, sample_student
from scoresde.samplers import sample

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "experiments" / "results"
TEACHER_SAMPLERS = [("DDIM eta=0", "ddim", {"eta": 0.0}), ("DPM-Solver-3M", "dpm_solver", {"order": 3}),
                    ("DPM-Solver++(2M)", "dpm_solver_pp", {"order": 2})]
KEYS = ("fd", "fd_sd", "fd_floor", "precision", "recall", "precision_floor", "recall_floor")


def train_teacher(run_dir: Path) -> dict:
    """``scoresde-train experiment=quickstart`` into ``run_dir`` unless it holds a checkpoint; its training time."""
    try:
        find_checkpoint(run_dir)
    except FileNotFoundError:
        cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        exe = Path(sys.executable).with_name("scoresde-train")
        subprocess.run([str(exe), "experiment=quickstart", "eval.nll=false", "progress=false", f"hydra.run.dir={run_dir}"], check=True)
        cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        (run_dir / "train_cpu_seconds.json").write_text(json.dumps(
            {"cpu_seconds": cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime}))
    metrics = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").is_file() else {}
    cpu = run_dir / "train_cpu_seconds.json"
    return {"train_seconds": (metrics.get("train") or {}).get("seconds"), "train_steps": (metrics.get("train") or {}).get("steps"),
            "train_cpu_seconds": json.loads(cpu.read_text())["cpu_seconds"] if cpu.is_file() else None,
            "app_samples": {k: v for k, v in (metrics.get("samples") or {}).items() if k in KEYS + ("method", "steps", "nfe")}}


def _short(q: dict) -> dict:
    return {k: q[k] for k in ("nfe", *KEYS, "fd_sets") if k in q}


@torch.no_grad()
def grid_quality(teacher, score, steps, n, sets, clip, substeps=1, solver="ddim", seed=0) -> dict:
    """FD / precision / recall of the teacher's own sampler on the ``steps``-step distillation grid (``sample_student``:
    ``substeps`` steps of ``solver`` per grid step; data predictions clamped to ``clip`` as in the distillation)."""
    draw = lambda g: sample_student(teacher.model.denoise_fn, teacher.sde, steps, (n, *teacher.shape), g, clip=clip,  # noqa: E731
                                    substeps=substeps, solver=solver)
    return _short(evaluate_sets(draw, score, sets, seed))


def evaluate_teacher(teacher, steps_list, n, sets, clip, seed=0) -> dict:
    """FD / precision / recall of the teacher at 20 NFE with the training-free samplers and with its own DDIM on the
    distillation grid at each of ``steps_list`` (its data prediction clamped to ``clip`` as in the distillation)."""
    model, sde, shape = teacher.model, teacher.sde, teacher.shape
    score = quality_scorer(teacher, seed)
    out = {"samplers": {}, "ddim_grid": {}}
    with torch.no_grad():
        for label, method, opts in TEACHER_SAMPLERS:
            draw = lambda g: (lambda r: (r.x, r.nfe))(sample(model.score_fn, sde, (n, *shape), method=method, steps=20,  # noqa: E731
                                                                generator=g, **opts))
            out["samplers"][label] = _short(evaluate_sets(draw, score, sets, seed))
            print("teacher", label, out["samplers"][label]["fd"], flush=True)
    for steps in steps_list:
        out["ddim_grid"][str(steps)] = grid_quality(teacher, score, steps, n, sets, clip, seed=seed)
        print("teacher DDIM grid", steps, out["ddim_grid"][str(steps)]["fd"], flush=True)
    return out


def evaluate_target(teacher, args) -> dict:
    """Round 0's target trajectory: the teacher's ``--first-round-substeps`` steps of ``--first-round-solver`` per step
    of the ``--start-steps`` grid, judged like the students."""
    q = grid_quality(teacher, quality_scorer(teacher, 0), args.start_steps, args.n, args.sets,
                     teacher.data_range() if args.clip else None, args.first_round_substeps, args.first_round_solver)
    print("round-0 target trajectory", q["nfe"], q["fd"], flush=True)
    return q


def fmt(q, key="fd"):
    if key not in q:
        return "-"
    sd = q.get(f"{key}_sd")
    return f"{q[key]:.1f}" + (f" ± {sd:.1f}" if sd is not None else "")


def write(res: dict, args, commit: str) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    stem = getattr(args, "out_name", None) or "distill_digits"
    r0 = getattr(args, "first_round_steps", None)
    sub, solver = getattr(args, "first_round_substeps", 1), getattr(args, "first_round_solver", "ddim")
    (OUT / f"{stem}.json").write_text(json.dumps({"commit": commit, "args": vars(args), **res}, indent=1))
    t, st = res["teacher"], res.get("students", [])
    best_label = min(t["samplers"], key=lambda k: t["samplers"][k]["fd"])
    best = t["samplers"][best_label]["fd"]
    floor = t["samplers"][best_label]["fd_floor"]
    cmd = (f"OMP_NUM_THREADS=1 python experiments/distill_digits.py --start-steps {args.start_steps} --final-steps {args.final_steps} "
           f"--n-steps {args.n_steps}" + (f" --first-round-steps {r0}" if r0 else "")
           + (f" --first-round-substeps {sub} --first-round-solver {solver}" if (sub, solver) != (1, "ddim") else "") + f" --lr {args.lr} --batch-size {args.batch_size} --sets {args.sets} --n {args.n}"
           + ("" if args.clip else " --no-clip") + (f" --workdir {args.workdir}" if stem != "distill_digits" else "")
           + (f" --round0-from {args.round0_from}" if getattr(args, "round0_from", None) else "")
           + (f" --teacher-from {args.teacher_from}" if getattr(args, "teacher_from", None) else "")
           + (f" --out-name {stem}" if stem != "distill_digits" else ""))
    L = ["# Progressive distillation of the quickstart model on the 8x8 digits", "",
         f"Command: `{cmd}` (commit {commit}; the shared 2-core CPU machine, one thread, `nice`).", "",
         f"Quality: the project's Fréchet distance (FD) on the digits classifier's features and k-NN precision / recall "
         f"(k = 3) of {args.n} samples against the test split (`scoresde.evaluate.image_quality`), mean ± sd over "
         f"{args.sets} sample sets (seeds 7..{6 + args.sets}); floor: {args.n} training images against the same test split "
         f"(FD {floor:.1f}).", "",
         "## Teacher", "",
         f"`scoresde-train experiment=quickstart` (ConvScoreNet, 151,489 parameters, VP, {res['teacher_train'].get('train_steps')} "
         f"steps): {_minutes(res['teacher_train'].get('train_seconds'))} wall"
         + (f", {_minutes(res['teacher_train'].get('train_cpu_seconds'))} CPU" if res["teacher_train"].get("train_cpu_seconds") else "")
         + (f" ({res['teacher_train']['note']})" if res["teacher_train"].get("note") else "") + "."
         + (f" Teacher numbers taken from {res['teacher_from']} (the same teacher checkpoint, samplers, sets and seeds)."
            if res.get("teacher_from") else ""), "",
         "| sampler (20 steps) | NFE | FD | precision | recall |", "|---|---|---|---|---|"]
    for label, q in t["samplers"].items():
        L.append(f"| {label} | {q['nfe']} | {fmt(q)} | {q['precision']:.3f} | {q['recall']:.3f} |")
    L += ["", f"Floor: FD {floor:.1f}, precision / recall {t['samplers'][best_label]['precision_floor']:.3f} / "
          f"{t['samplers'][best_label]['recall_floor']:.3f}. The reference for the goal is the best of these: **{best_label}, "
          f"FD {best:.1f}**; 1.2x that is {1.2 * best:.1f}.", "",
          "## Students (progressive distillation, v-parameterisation, truncated-SNR weighting)", "",
          (f"Round 0 fits the student (the teacher's network, started from its weights) to the teacher's own data prediction on "
             f"the {args.start_steps}-step grid (log-SNR uniform, last step to t = 0)" if (sub, solver) == (1, "ddim") else
             f"Round 0 fits the student (the teacher's network, started from its weights) to an accurate solution of the "
             f"teacher's probability-flow ODE across each step of the {args.start_steps}-step grid (log-SNR uniform, last step "
             f"to t = 0): {sub} steps of {'DPM-Solver++(2S) (midpoint in log-SNR)' if solver == 'midpoint' else 'DDIM'} per "
             f"student step ({sub * (2 if solver == 'midpoint' else 1)} teacher NFE per target; that trajectory sampled "
             f"on its own: FD {fmt(res['target'])}, {res['target']['nfe']} NFE)" if res.get("target") else "")
          + (f"; each later round halves the steps (two teacher DDIM steps -> one). " if args.start_steps > args.final_steps else ". ") + (f"Round 0 {r0} Adam steps, every later round {args.n_steps}" if r0 else
                                             f"Every round {args.n_steps} Adam steps") + f", batch {args.batch_size}, lr {args.lr}, EMA 0.999, "
          "on the dequantised training split. Beside each student: the teacher's own DDIM on the same grid (same NFE, no "
          "distillation)."
          + (" Every data prediction that makes a DDIM step (the teacher's targets, each student as the next round's "
             "teacher, sampling) is clamped to the data range [-1, 1] (`clip_x0`)." if args.clip else ""), "",
          "| steps = NFE | student FD | precision | recall | FD / best teacher FD at 20 NFE: of the means; per set (range) | "
          "teacher DDIM, same grid: FD | training (this round) |", "|---|---|---|---|---|---|---|"]
    best_sets = t["samplers"][best_label].get("fd_sets")
    for r in st:
        d = t["ddim_grid"].get(str(r["steps"]), t["ddim_grid"].get(r["steps"], {}))
        per = ""
        if best_sets and r.get("fd_sets"):
            rat = [a / b for a, b in zip(r["fd_sets"], best_sets)]
            per = f"; {sum(rat) / len(rat):.2f} ({min(rat):.2f}-{max(rat):.2f})"
        L.append(f"| {r['steps']} | {fmt(r)} | {r['precision']:.3f} | {r['recall']:.3f} | {r['fd'] / best:.2f}{per} | {fmt(d)} | "
                 f"{r['seconds'] / 60:.1f} min |")
    if st:
        wall = sum(r["seconds"] for r in st)
        L += ["", f"Distillation: {wall / 60:.1f} min of training wall time over {len(st)} rounds"
              + (f", {res['distill_cpu_seconds'] / 60:.1f} CPU minutes for the whole distillation call (training and the "
                 f"per-round evaluation)" if res.get("distill_cpu_seconds") else "") + "."]
        four = next((r for r in st if r["steps"] == 4), None)
        if four:
            verdict = "meets" if four["fd"] <= 1.2 * best else "misses"
            L += ["", f"**Goal (4-step student within 1.2x the teacher's FD at 20 NFE): {verdict} it** - the 4-step "
                  f"student's FD is {four['fd']:.1f} = {four['fd'] / best:.2f}x the best 20-NFE teacher sampler ({best:.1f}); "
                  f"{four['fd'] / t['samplers']['DDIM eta=0']['fd']:.2f}x DDIM's."]
    L += ["", "## Notes", ""] + [f"* {n}" for n in res.get("notes", [])] + [""]
    (OUT / f"{stem}.md").write_text("\n".join(L))


def reuse_teacher(args, teacher, steps_list) -> dict:
    """The teacher block of ``--teacher-from``, after checking that it was made by the same teacher run with the same
    evaluation (sets, n, clip); the teacher's DDIM on grids of ``steps_list`` it does not hold is evaluated here."""
    saved = json.loads(Path(args.teacher_from).read_text())
    a = saved["args"]
    same = {k: (a.get(k), getattr(args, k)) for k in ("teacher_run", "sets", "n", "clip") if a.get(k) != getattr(args, k)}
    if same:
        raise ValueError(f"--teacher-from {args.teacher_from}: made with other settings {same}")
    out = saved["teacher"]
    missing = [s for s in steps_list if str(s) not in out["ddim_grid"]]
    score = quality_scorer(teacher, 0) if missing else None
    for steps in missing:
        out["ddim_grid"][str(steps)] = grid_quality(teacher, score, steps, args.n, args.sets, teacher.data_range() if args.clip else None)
        print("teacher DDIM grid", steps, out["ddim_grid"][str(steps)]["fd"], flush=True)
    return out


def seed_round0(opts: DistillOptions, src: Path, teacher) -> dict:
    """Copy ``src``'s round-0 checkpoint (and its loss log) into ``opts.workdir`` so that round 0 continues from it; only
    when ``src`` holds a distillation of the same teacher checkpoint with the same run-defining options, its round 0
    shorter than this one, and this workdir has no round 0 yet."""
    import dataclasses
    import shutil

    from scoresde.distill import NON_DEFINING

    prev = json.loads((src / "options.json").read_text())
    mine = dataclasses.asdict(opts)
    diff = sorted(k for k, v in mine.items() if k not in NON_DEFINING + ("n_steps", "first_round_steps") and prev["options"].get(k, v) != v)
    if diff or prev["options"]["n_steps"] != opts.n_steps:
        raise ValueError(f"--round0-from {src}: other options {diff or ['n_steps']}")
    if prev["teacher"] != {"step": teacher.step, "run_hash": teacher.run_hash}:
        raise ValueError(f"--round0-from {src}: another teacher checkpoint {prev['teacher']}")
    src_steps = prev["options"].get("first_round_steps") or prev["options"]["n_steps"]
    if opts.first_round_steps is None or src_steps >= opts.first_round_steps:
        raise ValueError(f"--round0-from {src}: its round 0 ({src_steps} steps) is not shorter than this one ({opts.first_round_steps})")
    dst = Path(opts.workdir) / "round_00"
    if not dst.exists():
        dst.mkdir(parents=True)
        for name in ("checkpoint.pt", "metrics.jsonl"):
            shutil.copy2(src / "round_00" / name, dst / name)
    return {"workdir": str(src), "steps": src_steps}


def _minutes(s):
    return "-" if s is None else f"{s / 60:.1f} min"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher-run", default="/tmp/d_work/teacher")
    ap.add_argument("--workdir", default="/tmp/d_work/distill_clip")
    ap.add_argument("--start-steps", type=int, default=32)
    ap.add_argument("--final-steps", type=int, default=4)
    ap.add_argument("--no-clip", dest="clip", action="store_false", help="do not clamp data predictions to [-1, 1]")
    ap.add_argument("--n-steps", type=int, default=1200)
    ap.add_argument("--first-round-steps", type=int, default=None, help="round 0's Adam steps (default: --n-steps)")
    ap.add_argument("--first-round-substeps", type=int, default=1, help="teacher steps per student step in round 0's target")
    ap.add_argument("--first-round-solver", default="ddim", choices=("ddim", "midpoint"), help="the solver of those steps")
    ap.add_argument("--round0-from", default=None, help="a workdir whose round-0 checkpoint (a shorter round 0 of the same "
                    "options) this run's round 0 continues from")
    ap.add_argument("--teacher-from", default=None, help="an earlier results JSON of the same teacher run: reuse its teacher numbers")
    ap.add_argument("--out-name", default="distill_digits", help="results file stem in experiments/results")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--sets", type=int, default=5)
    ap.add_argument("--n", type=int, default=300, help="samples per set (the test split has 300 images)")
    ap.add_argument("--note", action="append", default=[], help="a line for the notes section (kept in the JSON)")
    ap.add_argument("--report-only", action="store_true", help="rewrite the markdown from distill_digits.json")
    args = ap.parse_args()
    if args.report_only:
        saved = json.loads((OUT / f"{args.out_name}.json").read_text())
        saved["notes"] = saved.get("notes", []) + args.note
        write(saved, argparse.Namespace(**{**saved["args"], "note": args.note}), saved["commit"])
        return
    torch.set_num_threads(1)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    res = {"teacher_train": train_teacher(Path(args.teacher_run)), "notes": args.note}
    teacher = load_teacher_run(args.teacher_run)
    steps_list = sorted({args.start_steps // 2 ** k for k in range(20) if args.start_steps // 2 ** k >= args.final_steps}, reverse=True)
    if args.teacher_from:
        res["teacher"], res["teacher_from"] = reuse_teacher(args, teacher, steps_list), args.teacher_from
    else:
        res["teacher"] = evaluate_teacher(teacher, steps_list, args.n, args.sets, teacher.data_range() if args.clip else None)
    opts = DistillOptions(teacher="run", teacher_run=str(args.teacher_run), start_steps=args.start_steps, final_steps=args.final_steps,
                          n_steps=args.n_steps, first_round_steps=args.first_round_steps,
                          first_round_substeps=args.first_round_substeps, first_round_solver=args.first_round_solver, batch_size=args.batch_size, lr=args.lr,
                          ema_rate=0.999, n_eval=args.n, eval_sets=args.sets, clip_x0=args.clip, checkpoint_every=200,
                          workdir=str(args.workdir), progress=False)
    if (args.first_round_substeps, args.first_round_solver) != (1, "ddim"):
        res["target"] = evaluate_target(teacher, args)
    if args.round0_from:
        res["round0_from"] = seed_round0(opts, Path(args.round0_from), teacher)
    write(res, args, commit)
    cpu0, t0 = time.process_time(), time.perf_counter()
    res["students"] = run_distill(opts)
    res["distill_cpu_seconds"], res["distill_wall_seconds"] = time.process_time() - cpu0, time.perf_counter() - t0
    for r in res["students"]:
        print("student", r["steps"], r["fd"], r["seconds"], flush=True)
    write(res, args, commit)


if __name__ == "__main__":
    main()
