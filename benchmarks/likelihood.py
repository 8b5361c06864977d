"""PF-ODE likelihood: exact trace vs Hutchinson (1, 4, 16 probes) vs the reference way, against the oracle.

For Gaussian-mixture data (K = 3 isotropic components, VP SDE, exact oracle score) at several D, each
method computes ``log p_eps(x)`` for the same batch; the error of a sample is measured against what the
ODE must return given the latent ``z`` it reached::

    err = logp - [log p_eps(x) - log p_T(z) + prior_logp(z)]          (nats; reported per dim)

Methods (all rtol = atol = 1e-5, eps = 1e-5, float64):
  * ``ours exact``          ``scoresde.log_likelihood(divergence="exact")`` (dopri5, per-sample error norm)
  * ``ours hutch P``        ``divergence="hutchinson", probes=P`` (Rademacher; P integrals in one solve)
  * ``reference``           the score_sde way, re-implemented here: scipy ``solve_ivp(method="RK45")`` on a
                            flattened NumPy copy of ``[x, delta]``, torch for the drift (the library's
                            ``probability_flow_drift``, so only the solver and divergence differ) and ONE Rademacher
                            probe per sample (the same probe as ``ours hutch 1``), tensors copied to/from
                            NumPy at every evaluation; its error norm is an RMS over the whole batch.
  * ``reference way, exact trace``  the same solver with the exact trace (one backward pass per basis
                            vector), to separate its ODE error from the probe noise (D <= 64 only).

Columns: mean and max |err| per dim over the batch, mean signed error per dim (bias), the mean reported
per-sample standard error per dim (Hutchinson, P > 1), NFE (score calls) and wall time (best of
``--repeats``). The oracle score is far cheaper than a network (~0.7 ms per call at D = 3072, B = 8),
so solver overhead shows in its timings (torchdiffeq's dopri5 costs ~0.9 ms per evaluation on a
25k-element CPU state, scipy's RK45 ~0.13 ms); the ``oracle + MLP cost`` rows add a network's cost to
each call (see ``with_network_cost``) to show the regime where NFE decides.

    OMP_NUM_THREADS=1 python benchmarks/likelihood.py --out benchmarks/results/likelihood
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time

import numpy as np
import torch
from scipy.integrate import solve_ivp

from scoresde import VPSDE, GaussianMixture, log_likelihood
from scoresde.samplers import CountingScore, probability_flow_drift

EPS, RTOL, ATOL = 1e-5, 1e-5, 1e-5


def make_problem(D: int, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    K = 3
    means = torch.randn(K, D, generator=g, dtype=torch.float64)
    stds = 0.1 + 0.3 * torch.rand(K, generator=g, dtype=torch.float64)
    weights = 0.2 + torch.rand(K, generator=g, dtype=torch.float64)
    gm = GaussianMixture(means, stds, weights)
    x = gm.sample(n, torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    return gm, x


def reference_likelihood(score_fn, sde, x, seed: int, exact: bool = False):
    """score_sde-style likelihood: scipy RK45 on NumPy state, one Rademacher probe, batch RMS error norm.

    ``exact=True``: the same solver with the exact trace from one autograd pass per basis vector."""
    shape, B, D = tuple(x.shape), x.shape[0], x[0].numel()
    g = torch.Generator().manual_seed(seed)
    probe = torch.randint(0, 2, shape, generator=g).to(x.dtype) * 2 - 1
    counted = CountingScore(score_fn)
    F = probability_flow_drift(counted, sde, EPS)

    def trace(drift, y):
        div = torch.zeros(B, dtype=x.dtype)
        for d in range(D):
            e = torch.zeros(B, D, dtype=x.dtype)
            e[:, d] = 1
            (gr,) = torch.autograd.grad(drift, y, e.reshape(shape), retain_graph=True)
            div += gr.reshape(B, D)[:, d]
        return div

    def ode_func(t, state):
        y = torch.from_numpy(state[:-B]).reshape(shape).to(x.dtype).requires_grad_(True)
        with torch.enable_grad():
            drift = F(t, y)
            if exact:
                div = trace(drift, y)
            else:
                (grad,) = torch.autograd.grad((drift * probe).sum(), y)
                div = (grad * probe).reshape(B, -1).sum(1)
        return np.concatenate([drift.detach().numpy().reshape(-1), div.detach().numpy()])

    init = np.concatenate([x.numpy().reshape(-1), np.zeros(B)])
    sol = solve_ivp(ode_func, (EPS, sde.T), init, rtol=RTOL, atol=ATOL, method="RK45")
    zp = sol.y[:, -1]
    z = torch.from_numpy(zp[:-B]).reshape(shape)
    delta = torch.from_numpy(zp[-B:])
    return sde.prior_logp(z) + delta, z, counted.calls


def run_method(name, fn, repeats):
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return out, best


def with_network_cost(score_fn, D: int, width: int, seed: int = 0):
    """The oracle score plus ``0 *`` a random 3-layer MLP ``D -> width -> width -> D`` (tanh), so that every
    call (and its backward pass) costs what a network costs while the score stays exact."""
    g = torch.Generator().manual_seed(seed)
    mlp = torch.nn.Sequential(torch.nn.Linear(D, width), torch.nn.Tanh(), torch.nn.Linear(width, width), torch.nn.Tanh(),
                              torch.nn.Linear(width, D)).double()
    with torch.no_grad():
        for p in mlp.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) / math.sqrt(p.shape[-1]))
    mlp.requires_grad_(False)

    def score(x, t):
        return score_fn(x, t) + 0.0 * mlp(x.reshape(x.shape[0], -1)).reshape(x.shape)

    return score


def bench_dim(D: int, n: int, repeats: int, exact: bool, exact_reference: bool, seed: int, cost_width: int = 0):
    sde = VPSDE()
    gm, x = make_problem(D, n, seed)
    score = gm.score_fn(sde)
    label = "oracle"
    if cost_width:
        score, label = with_network_cost(score, D, cost_width, seed), f"oracle + MLP({cost_width}) cost"
    rows = []

    def record(method, logp, z, nfe, secs, stderr=None):
        ref = gm.log_prob(x, EPS, sde) - gm.log_prob(z, sde.T, sde) + sde.prior_logp(z)
        err = (logp - ref) / D
        rows.append(dict(D=D, n=n, score=label, method=method, mean_abs=float(err.abs().mean()), max_abs=float(err.abs().max()),
                         bias=float(err.mean()), bias_se=float(err.std()) / math.sqrt(n),
                         se=None if stderr is None else float(stderr.mean()) / D, nfe=nfe, seconds=secs))
        print(fmt_row(rows[-1]), flush=True)

    if exact:
        r, s = run_method("exact", lambda: log_likelihood(score, sde, x, divergence="exact"), repeats)
        record("ours exact", r.logp, r.z, r.nfe, s)
    for P in (1, 4, 16):
        r, s = run_method("hutch", lambda: log_likelihood(score, sde, x, probes=P, generator=torch.Generator().manual_seed(seed + P)), repeats)
        record(f"ours hutch {P}", r.logp, r.z, r.nfe, s, r.stderr)
    r, s = run_method("hutch", lambda: log_likelihood(score, sde, x, probes=1, error_norm="batch",
                                                      generator=torch.Generator().manual_seed(seed + 1)), repeats)
    record("ours hutch 1, batch-RMS norm", r.logp, r.z, r.nfe, s)
    (logp, z, nfe), s = run_method("ref", lambda: reference_likelihood(score, sde, x, seed + 1), repeats)
    record("reference (scipy RK45, 1 probe)", logp, z, nfe, s)
    if exact_reference:
        (logp, z, nfe), s = run_method("ref", lambda: reference_likelihood(score, sde, x, seed + 1, exact=True), repeats)
        record("reference way, exact trace", logp, z, nfe, s)
    return rows


HEADER = "| D | batch | score | method | mean abs err/dim | max abs err/dim | bias/dim (± SE) | reported SE/dim | NFE | wall s |"


def fmt_row(r):
    se = "" if r["se"] is None else f"{r['se']:.3g}"
    return (f"| {r['D']} | {r['n']} | {r['score']} | {r['method']} | {r['mean_abs']:.2e} | {r['max_abs']:.2e} | "
            f"{r['bias']:+.1e} ± {r['bias_se']:.1e} | {se} | {r['nfe']} | {r['seconds']:.2f} |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dims", type=int, nargs="+", default=[2, 64, 3072])
    p.add_argument("--batch", type=int, nargs="+", default=[500, 100, 8], help="batch size per D")
    p.add_argument("--exact-max-dim", type=int, default=64, help="skip the exact trace above this D (D=3072, B=4: 74 NFE, 328 s)")
    p.add_argument("--exact-ref-max-dim", type=int, default=64, help="skip the reference way's exact trace above this D")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--cost-width", type=int, default=2048,
                   help="also time with a network's cost per call (0: off): see with_network_cost")
    p.add_argument("--cost-dims", type=int, nargs="+", default=[3072], help="dims for the network-cost rows")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="path prefix for .md and .json results")
    args = p.parse_args(argv)
    if len(args.batch) != len(args.dims):
        p.error("--batch needs one size per --dims entry")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    # warm-up (first autograd / solver calls carry one-off costs)
    gm, x = make_problem(2, 8)
    log_likelihood(gm.score_fn(VPSDE()), VPSDE(), x, divergence="exact")
    reference_likelihood(gm.score_fn(VPSDE()), VPSDE(), x, 0)
    print(HEADER)
    print("|" + " --- |" * 10)
    rows = []
    for D, n in zip(args.dims, args.batch):
        rows += bench_dim(D, n, args.repeats, D <= args.exact_max_dim, D <= args.exact_ref_max_dim, args.seed)
    if args.cost_width:
        for D, n in zip(args.dims, args.batch):
            if D in args.cost_dims:
                rows += bench_dim(D, n, args.repeats, False, False, args.seed, args.cost_width)
    if args.out:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        cmd = "python benchmarks/likelihood.py " + " ".join(sys.argv[1:] if argv is None else argv)
        with open(args.out + ".md", "w") as f:
            f.write("# PF-ODE likelihood: accuracy, NFE and wall time against the Gaussian-mixture oracle\n\n")
            f.write(f"Command: `OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '?')} {cmd}`  \n")
            f.write(f"Commit {commit}, {platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}, float64, "
                    f"VP SDE, K=3 mixture, rtol=atol={RTOL}, eps={EPS}, Rademacher probes.  \n")
            f.write("err = logp - [log p_eps(x) - log p_T(z) + prior_logp(z)] in nats/dim; wall time best of "
                    f"{args.repeats}.\n\n")
            f.write(HEADER + "\n|" + " --- |" * 10 + "\n")
            f.write("\n".join(fmt_row(r) for r in rows) + "\n")
        with open(args.out + ".json", "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
