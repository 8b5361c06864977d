"""Collate run and sweep directories into one markdown table, a CSV and bar plots.

    python experiments/collect.py multirun/train/2026-01-01/12-00-00 [more dirs] [--out DIR] [--metrics k1,k2]

The same as ``scoresde-report``: every directory holding a ``metrics.json`` (searched recursively)
becomes a row; the Hydra overrides that vary across runs become columns, followed by the chosen
metrics (dotted keys of metrics.json; default: test bits/dim and its standard error, ELBO, NFE,
MMD², final loss, training time). A multirun already writes ``report.*`` into its sweep directory
when it ends (``scoresde.cli.CollateCallback``).
"""

from scoresde.cli import report_main

if __name__ == "__main__":
    report_main()
