"""Command-line entry points: ``scoresde-train``, ``-sample``, ``-nll``, ``-compare``, ``-export``, ``-distill``,
``-train-classifier``, ``-inpaint`` (Hydra apps) and ``-report``.

Each Hydra app composes its config from ``scoresde/configs`` (schemas: ``scoresde.config``), validates it
before any work, turns it into plain objects (``config.to_run``) and hands them to the library
(``scoresde.runs``, ``scoresde.compare``, ``scoresde.report``). Messages go through ``logging`` (logger
``scoresde``), so Hydra's ``<run dir>/<app>.log`` holds what the console showed. A user error (a bad config
value, a missing file, a run directory in use or holding another run) prints one line and exits with status 2 (the
traceback with ``HYDRA_FULL_ERROR=1`` or ``--debug``). Every job of a command, each point of a ``-m`` sweep too,
is composed and validated before the first one starts and before anything is written (``precheck``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Optional

from . import config as C

__all__ = ["precheck", "train_main", "sample_main", "nll_main", "compare_main", "export_main", "distill_main", "train_classifier_main", "inpaint_main",
           "report_main", "CollateCallback"]

log = logging.getLogger("scoresde")


def _fail(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
    sys.exit(2)


def _debug() -> bool:
    """Tracebacks wanted: ``HYDRA_FULL_ERROR=1`` or the ``--debug`` flag (which sets it)."""
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


# what a user can get wrong once the config is valid: a missing, unreadable or unfitting file, a run directory in use,
# a checkpoint of another model, a sampler its SDE cannot use, ... (``ValueError`` includes ``ConfigError``)
USER_ERRORS = (ValueError, TypeError, OSError, KeyError)


def _one_line(e: BaseException) -> str:
    msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    if isinstance(e, OSError) and e.filename is not None and str(e.filename) not in msg:
        msg = f"{msg} ({e.filename})"
    lines = [ln for ln in msg.strip().splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def _report(e: BaseException) -> None:
    """One line on stderr and exit 2 (the traceback instead with ``HYDRA_FULL_ERROR=1`` / ``--debug``)."""
    if _debug():
        raise e
    if isinstance(e, C.ConfigError):
        _fail(f"Config error: {_one_line(e)}")
    if isinstance(e, KeyError):
        _fail(f"Error: missing entry {_one_line(e)} (is the file given the right kind of file?)")
    _fail(f"Error: {_one_line(e)}")


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
        except USER_ERRORS as e:  # a bad value, or a user error found once the run is loaded
            _report(e)
        r = (metrics or {}).get("nll", {}).get("test") if isinstance(metrics, dict) else None
        return r["bpd"] if r else None  # a scalar a sweeper could minimise

    return app


def _jobs(overrides: list, multirun: bool) -> list:
    """The override lists of the jobs a command runs: one, or every point of a ``-m`` sweep (Hydra's basic sweeper's
    expansion)."""
    if not multirun:
        return [overrides]
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def _sweep_keys(overrides: list) -> set:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return {o.get_key_element() for o in OverridesParser.create().parse_overrides(overrides) if o.is_sweep_override()}


def precheck(config_name: str, argv: list) -> None:
    """Every check of every job before Hydra starts the first one or writes anything: compose each job's config
    (every point of a ``-m`` sweep), ``config.validate`` it (unknown keys added with ``+`` included) and, for a
    single ``scoresde-train`` into an existing ``hydra.run.dir``, check that directory (``runs.check_run_dir``,
    its lock). A user error exits 2 with one line naming the job. Commands with other flags (``--help``,
    ``--cfg``, ...) and configs Hydra itself cannot compose are left to Hydra, which reports them."""
    flags = [a for a in argv if a.startswith("-")]
    if any(a not in ("-m", "--multirun") for a in flags):
        return
    multirun = bool(flags)
    overrides = [a for a in argv if not a.startswith("-")]
    try:
        from hydra import compose, initialize_config_module

        jobs = _jobs(overrides, multirun)
        swept = _sweep_keys(overrides) if multirun else set()
    except Exception:  # a syntax Hydra reports itself
        return
    with initialize_config_module(config_module="scoresde.configs", version_base="1.3"):
        for i, job in enumerate(jobs):
            try:
                cfg = compose(config_name, overrides=job)
            except Exception:  # composition errors: Hydra's own message when it runs
                return
            where = f" (job {i}: {' '.join(j for j in job if j.split('=', 1)[0] in swept)})" if multirun else ""
            try:
                obj = C.validate(cfg)
                if isinstance(obj, C.SampleAppConfig):
                    C.check_sampler_against_run(obj)
                if i == 0:
                    _check_writable(_override(job, "hydra.sweep.dir" if multirun else "hydra.run.dir"))
                if config_name == "train":
                    _check_train_dir(C.to_run(obj), _job_dir(job, i, multirun))
            except USER_ERRORS as e:
                if where and not _debug():
                    _fail(f"{'Config error' if isinstance(e, C.ConfigError) else 'Error'}{where}: {_one_line(e)}")
                _report(e)


def _override(overrides: list, key: str) -> Optional[Path]:
    vals = [a.split("=", 1)[1] for a in overrides if a.split("=", 1)[0].lstrip("+") == key and "=" in a]
    return Path(vals[-1]).expanduser() if vals else None


def _check_writable(d: Optional[Path]) -> None:
    """An output directory given on the command line can be created and written (tried, then undone)."""
    if d is None:
        return
    made = []
    try:
        missing = [p for p in [d, *d.parents] if not p.exists()]
        for p in reversed(missing):
            p.mkdir()
            made.append(p)
        import tempfile

        with tempfile.TemporaryFile(dir=d):
            pass
    except OSError as e:
        raise OSError(f"output directory {str(d)!r} cannot be written ({e.strerror}); give a writable one") from None
    finally:
        for p in reversed(made):
            try:
                p.rmdir()
            except OSError:
                pass


def _job_dir(overrides: list, num: int, multirun: bool) -> Optional[Path]:
    """The run directory of a job when the command names it: ``hydra.run.dir``, or ``hydra.sweep.dir/<job number>``
    (Hydra's default ``subdir``) in a sweep; else ``None`` (a fresh time-stamped directory)."""
    if not multirun:
        return _override(overrides, "hydra.run.dir")
    sweep = _override(overrides, "hydra.sweep.dir")
    return sweep / str(num) if sweep is not None and _override(overrides, "hydra.sweep.subdir") is None else None


def _check_train_dir(c, run_dir: Optional[Path]) -> None:
    """``scoresde-train`` into an existing directory: the directory's run and lock, read only."""
    from .runs import RunLock, check_run_dir

    if run_dir is None or not run_dir.is_dir():
        return
    RunLock(run_dir).check()
    check_run_dir(c, run_dir)


def _run_app(config_name: str, run_fn: Callable, argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    saved = os.environ.get("HYDRA_FULL_ERROR")
    if "--debug" in argv:
        argv = [a for a in argv if a != "--debug"]
        os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        _run_checked(config_name, run_fn, argv)
    finally:  # an in-process caller (a test, a notebook) keeps its environment
        if saved is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = saved


def _run_checked(config_name: str, run_fn: Callable, argv: list) -> None:
    legacy = C.legacy_override_error(argv)
    if legacy:
        _fail(f"Config error: {legacy}")
    if config_name == "train":
        from .interop.score_sde_config import expand_score_sde_argv

        try:
            argv = expand_score_sde_argv(argv)
        except USER_ERRORS as e:
            if _debug():
                raise
            _fail(f"Error in score_sde_config: {_one_line(e)}")
    precheck(config_name, argv)
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


def export_main(argv=None) -> None:
    """``scoresde-export ckpt=RUN_DIR format=onnx|safetensors [output=score] [int8=true] [out=DIR]``."""
    from .export import run_export

    _run_app("export", run_export, argv)


def distill_main(argv=None) -> None:
    """``scoresde-distill [method=progressive|consistency_distillation|consistency_training] [final_steps=1] ...``."""
    from .distill import run_distill

    _run_app("distill", lambda options, outdir: run_distill(options), argv)


def train_classifier_main(argv=None) -> None:
    """``scoresde-train-classifier [dataset=digits] [sde=vp] [n_steps=1000] [workdir=DIR] ...``: a noise-conditional
    classifier for classifier guidance (``scoresde.classifier.run_train_classifier``)."""
    from .classifier import run_train_classifier

    _run_app("train_classifier", lambda options, outdir: run_train_classifier(options), argv)


def inpaint_main(argv=None) -> None:
    """``scoresde-inpaint ckpt=RUN [task=inpaint|colorize] [mask=top_half|...|file.npy] [images=test|file.npy] ...``:
    complete hidden pixels (or colours) of a trained run's images (``scoresde.controllable.run_inpaint``)."""
    from .controllable import run_inpaint

    _run_app("inpaint", run_inpaint, argv)


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


if __name__ == "__main__":  # python -m scoresde.cli {train,sample,nll,...,inpaint,report} ...
    cmds = {"train": train_main, "sample": sample_main, "nll": nll_main, "compare": compare_main, "export": export_main,
            "distill": distill_main, "train-classifier": train_classifier_main, "inpaint": inpaint_main,
            "report": report_main}
    if len(sys.argv) < 2 or sys.argv[1] not in cmds:
        _fail(f"usage: python -m scoresde.cli {{{','.join(cmds)}}} [args]")
    cmd = sys.argv.pop(1)
    cmds[cmd]()
