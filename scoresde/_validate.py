"""Argument checks shared by the library: each raises ``ValueError`` naming the argument and the allowed values."""

from __future__ import annotations

import math

__all__ = ["check_choice", "check_int", "check_positive"]


def check_choice(name: str, value, allowed):
    """``value`` must be one of ``allowed``; returns it."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}; got {value!r}")
    return value


def check_int(name: str, value, low: int = 1) -> int:
    """``value`` must be an ``int`` (not a bool) ``>= low``; returns it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}; got {value!r}")
    return value


def check_positive(name: str, value, allow_zero: bool = False) -> float:
    """``value`` must be a finite real number ``> 0`` (``>= 0`` with ``allow_zero``); returns it as a float."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
        or (value == 0 and not allow_zero)
    ):
        raise ValueError(f"{name} must be a finite number {'>=' if allow_zero else '>'} 0; got {value!r}")
    return float(value)
