"""Full-covariance Gaussian-mixture baseline bits/dim on the embedded digits (or MNIST / CIFAR-10).

Fits ``sklearn.mixture.GaussianMixture(covariance_type="full")`` on uniformly dequantised training
images ``u = (k + U) / L``, chooses the number of components by validation bits/dim and prints the
test bits/dim (mean +- standard error over test images). See ``scoresde.baselines`` for the formula.

    OMP_NUM_THREADS=1 python experiments/gmm_baseline.py                 # digits, the default
    python experiments/gmm_baseline.py --reg-covar 1e-6 1e-4 1e-3 --n-dequant 4
"""

from __future__ import annotations

import argparse
import time

from scoresde.baselines import DEFAULT_COMPONENTS, fit_gmm_baseline, gmm_bits_per_dim
from scoresde.data import load_dataset


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="digits", choices=["digits", "mnist", "cifar10"])
    p.add_argument("--root", default=None, help="archive folder for mnist/cifar10")
    p.add_argument("--components", type=int, nargs="+", default=list(DEFAULT_COMPONENTS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-dequant", type=int, default=8, help="dequantisation draws per validation/test image")
    p.add_argument("--reg-covar", type=float, nargs="+", default=[1e-6], help="one or more; chosen jointly with K by validation")
    p.add_argument("--n-train", type=int, default=None, help="subsample the training split (large sets)")
    args = p.parse_args(argv)

    tr = load_dataset(args.data, "train", root=args.root, n=args.n_train)
    va = load_dataset(args.data, "val", root=args.root)
    te = load_dataset(args.data, "test", root=args.root)
    print(f"{args.data}: train {len(tr)}, val {len(va)}, test {len(te)}, D = {tr.dim}, L = {tr.levels}")
    t0 = time.time()
    fits = {}
    for reg in args.reg_covar:
        fits[reg] = fit_gmm_baseline(
            tr.x, va.x, tr.levels, components=args.components, seed=args.seed, n_dequant=args.n_dequant, reg_covar=reg, progress=True
        )
    best_reg = min(fits, key=lambda r: fits[r].val_bpd[fits[r].n_components].mean)
    res = fits[best_reg]
    print("reg_covar  K    val bits/dim")
    for reg, fit in fits.items():
        for K, b in fit.val_bpd.items():
            chosen = "   <- chosen" if (reg, K) == (best_reg, res.n_components) else ""
            print(f"{reg:<10.0e} {K:<4d} {b.mean:.4f} +- {b.stderr:.4f}{chosen}")
    test = gmm_bits_per_dim(res.gmm, te.x, te.levels, n_dequant=args.n_dequant, seed=args.seed + 2)
    print(
        f"test bits/dim (K = {res.n_components}, reg_covar = {best_reg:.0e}, full covariance): "
        f"{test.mean:.4f} +- {test.stderr:.4f}   [{time.time() - t0:.1f} s]"
    )
    return test


if __name__ == "__main__":
    main()
