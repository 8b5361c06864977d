"""Command-line entry points: ``scoresde-train``, ``-sample``, ``-nll``, ``-compare`` (Hydra apps) and ``-report``.

Each Hydra app composes its config from ``scoresde/configs`` (schemas: ``scoresde.config``), validates it
before any work, turns it into plain objects (``config.to_run``) and hands them to the library
(``scoresde.runs``, ``scoresde.compare``, ``scoresde.report``). Messages go through ``logging`` (logger
``scoresde``), so Hydra's ``<run dir>/<app>.log`` holds what the console showed. A user error (a bad config
value, a missing file) prints one line and exits with status 2 (the traceback with ``HYDRA_FULL_ERROR=1``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Optional

from . import config as C

__all__ = ["train_main", "sample_main", "nll_main", "compare_main", "report_main", "CollateCallback"]

log = logging.getLogger("scoresde")


def _fail(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
    sys.exit(2)


def _hydra_app(config_name: str, run_fn: Callable) -> Callable:
    import hydra

    C.register_configs()

    @hydra.main(version_base="1.3", config_path="configs", config_name=config_name)
    def app(cfg) -> Optional[float]:
        from hydra.core.hydra_config import HydraConfig

        try:
            obj = C.validate(cfg)  # every check before any work
            if isinstance(obj, C.SampleAppConfig):
                C.check_sampler_against_run(obj)
            plain = C.to_run(obj)
            metrics = run_fn(plain, Path(HydraConfig.get().runtime.output_dir))
        except C.ConfigError as e:
            _fail(f"Config error: {e}")
        except (ValueError, FileNotFoundError) as e:  # a user error found once the run is loaded (a sampler its SDE
            if os.environ.get("HYDRA_FULL_ERROR") == "1":  # cannot use, a missing or corrupt file, ...)
                raise
            _fail(f"Error: {e}")
        r = (metrics or {}).get("nll", {}).get("test") if isinstance(metrics, dict) else None
        return r["bpd"] if r else None  # a scalar a sweeper could minimise

    return app


def _run_app(config_name: str, run_fn: Callable, argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    legacy = C.legacy_override_error(argv)
    if legacy:
        _fail(f"Config error: {legacy}")
    if config_name == "train":
        from .interop.score_sde_config import expand_score_sde_argv

        try:
            argv = expand_score_sde_argv(argv)
        except ValueError as e:
            _fail(f"Error in score_sde_config: {e}")
    old = sys.argv
    sys.argv = [old[0] if old else f"scoresde-{config_name}"] + argv
    try:
        _hydra_app(config_name, run_fn)()
    finally:
        sys.argv = old


def train_main(argv=None) -> None:
    """``scoresde-train [overrides]``: train, sample and evaluate (``score_sde_config=FILE.py`` accepted)."""
    from .runs import run_train

    _run_app("train", run_train, argv)


def sample_main(argv=None) -> None:
    """``scoresde-sample ckpt=RUN_DIR [sampler=... eval.n_samples=...]``."""
    from .runs import run_sample

    _run_app("sample", run_sample, argv)


def nll_main(argv=None) -> None:
    """``scoresde-nll ckpt=RUN_DIR [eval.splits=[val,test] eval.elbo=true ...]``."""
    from .runs import run_nll

    _run_app("nll", run_nll, argv)


def compare_main(argv=None) -> None:
    """``scoresde-compare experiment=ddpm_vs_sde [data=... train.n_steps=...]``."""
    from .compare import run_compare

    _run_app("compare", run_compare, argv)


def report_main(argv=None) -> None:
    """``scoresde-report DIR [DIR ...] [--out OUT] [--metrics k1,k2] [--name report]``: collate runs."""
    from .report import collate_runs

    p = argparse.ArgumentParser(prog="scoresde-report", description="Collate scoresde run / sweep directories into markdown, CSV and plots.")
    p.add_argument("paths", nargs="+", help="run or sweep directories (searched recursively for metrics.json)")
    p.add_argument("--out", default=None, help="output directory (default: the runs' common root)")
    p.add_argument("--metrics", default=None, help="comma-separated dotted metric keys (default: bits/dim, NFE, MMD², loss, time)")
    p.add_argument("--name", default="report", help="output file stem (default: report)")
    a = p.parse_args(argv)
    try:
        res = collate_runs(a.paths, out_dir=a.out, metrics=a.metrics.split(",") if a.metrics else None, name=a.name)
    except FileNotFoundError as e:
        p.error(str(e))
    print(res["md"].read_text())
    print(f"[scoresde] wrote {res['md']}, {res['csv']}" + (f", {res['png']}" if res["png"] else ""))


def _callback_base():
    try:
        from hydra.experimental.callback import Callback
    except ImportError:  # pragma: no cover
        Callback = object
    return Callback


class CollateCallback(_callback_base()):
    """Hydra callback: at the end of a multirun, collate the sweep directory into ``report.md/.csv/.png``."""

    def on_multirun_end(self, config, **kwargs) -> None:
        from .report import collate_runs

        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            res = collate_runs([sweep_dir], out_dir=sweep_dir)
            log.info("collated %d runs: %s", len(res["rows"]), res["md"])
        except FileNotFoundError as e:
            log.info("nothing to collate: %s", e)


if __name__ == "__main__":  # python -m scoresde.cli {train,sample,nll,compare,report} ...
    cmds = {"train": train_main, "sample": sample_main, "nll": nll_main, "compare": compare_main, "report": report_main}
    if len(sys.argv) < 2 or sys.argv[1] not in cmds:
        _fail(f"usage: python -m scoresde.cli {{{','.join(cmds)}}} [args]")
    cmd = sys.argv.pop(1)
    cmds[cmd]()
