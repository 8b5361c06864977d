"""Test-suite switches.

Tests marked ``@pytest.mark.slow`` (quality checks that train or sample at length) are skipped in a
plain ``python -m pytest -q`` so the everyday suite stays fast; they run in CI (which sets ``CI=true``),
with ``SCORESDE_RUN_SLOW=1``, or when selected explicitly with ``-m slow``.
"""

import os

import pytest


def _run_slow(config) -> bool:
    if os.environ.get("SCORESDE_RUN_SLOW") == "1" or os.environ.get("CI", "").lower() == "true":
        return True
    return "slow" in (config.getoption("-m") or "") and "not slow" not in (config.getoption("-m") or "")


def pytest_collection_modifyitems(config, items):
    if _run_slow(config):
        return
    skip = pytest.mark.skip(reason="slow quality check: runs in CI (CI=true), with SCORESDE_RUN_SLOW=1 or with -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
