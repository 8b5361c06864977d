"""Train (or load) the cached feature classifier used for Fréchet distances on images.

Trains ``scoresde.features.ConvClassifier`` on the "train" split, reproducibly from ``--seed``, and
saves it to ``<cache-dir>/feature_classifier_<data>_seed<seed>.pt`` (default cache dir:
``$SCORESDE_CACHE/features`` or ``~/.cache/scoresde/features``). Prints the accuracies and, as a
scale for later numbers, the Fréchet distance of the test split to the training split and to
uniform noise.

    OMP_NUM_THREADS=1 python experiments/train_feature_classifier.py            # digits
    python experiments/train_feature_classifier.py --data mnist --root /data --device cuda --retrain
"""

from __future__ import annotations

import argparse
import time

import torch

from scoresde.data import load_dataset
from scoresde.features import FeatureExtractor, frechet_distance_images


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="digits", choices=["digits", "mnist", "cifar10"])
    p.add_argument("--root", default=None, help="archive folder for mnist/cifar10")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--device", default=None)
    p.add_argument("--retrain", action="store_true")
    p.add_argument("--n-fd", type=int, default=2000, help="images per set for the reference distances")
    args = p.parse_args(argv)

    t0 = time.time()
    ext = FeatureExtractor.load_or_train(
        args.data, cache_dir=args.cache_dir, root=args.root, seed=args.seed, retrain=args.retrain, device=args.device,
        progress=True, epochs=args.epochs,
    )
    path = FeatureExtractor.cache_path(args.data, args.cache_dir, args.seed)
    print(f"{args.data}: classifier {path}  val acc {ext.val_accuracy:.4f}  test acc {ext.test_accuracy:.4f}  [{time.time() - t0:.1f} s]")
    test = load_dataset(args.data, "test", root=args.root, n=args.n_fd)
    train = load_dataset(args.data, "train", root=args.root, n=args.n_fd)
    noise = 2 * torch.rand(len(test), *test.shape, generator=torch.Generator().manual_seed(args.seed)) - 1
    print(f"FD(test, train) = {frechet_distance_images(test, train, ext):.3f}   FD(test, uniform noise) = {frechet_distance_images(test, noise, ext):.3f}")
    return ext


if __name__ == "__main__":
    main()
