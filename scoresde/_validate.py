"""Argument checks shared by the library: each raises ``ValueError`` naming the argument and the allowed values.

Every message has the form ``"<name> must be <allowed>; got <value!r>"``. Numbers may be Python or NumPy
scalars (``numbers.Integral`` / ``numbers.Real``), never ``bool``; the checks return plain ``int`` / ``float``.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable

__all__ = ["check_choice", "check_int", "check_positive", "check_number", "check_in_range", "check_bool"]


def check_choice(name: str, value, allowed):
    """``value`` must be one of ``allowed``; returns it."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}; got {value!r}")
    return value


def check_int(name: str, value, low: int = 1) -> int:
    """``value`` must be an integer (not a bool) ``>= low``; returns it as an ``int``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}; got {value!r}")
    return int(value)


def _is_real(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)


def check_positive(name: str, value, allow_zero: bool = False, optional: bool = False) -> float | None:
    """``value`` must be a finite real number ``> 0`` (``>= 0`` with ``allow_zero``); returns it as a float.

    With ``optional`` ``None`` is also allowed (and returned).
    """
    if optional and value is None:
        return None
    if not _is_real(value) or value < 0 or (value == 0 and not allow_zero):
        tail = " or None" if optional else ""
        raise ValueError(f"{name} must be a finite number {'>=' if allow_zero else '>'} 0{tail}; got {value!r}")
    return float(value)


def check_number(name: str, value, ok: Callable[[float], bool], allowed: str) -> float:
    """``value`` must be a finite real number with ``ok(value)`` true; ``allowed`` describes the rule in the
    message (``"<name> must be <allowed>; got <value>"``). Returns it as a float."""
    if not _is_real(value) or not ok(value):
        raise ValueError(f"{name} must be {allowed}; got {value!r}")
    return float(value)


def check_in_range(name: str, value, low: float, high: float, low_closed: bool = True, high_closed: bool = True) -> float:
    """``value`` must be a finite real number in the interval from ``low`` to ``high`` (closed or open at each
    end, written ``[low, high)`` etc. in the message). Returns it as a float."""
    interval = f"{'[' if low_closed else '('}{low}, {high}{']' if high_closed else ')'}"

    def ok(v):
        return (v >= low if low_closed else v > low) and (v <= high if high_closed else v < high)

    return check_number(name, value, ok, f"a number in {interval}")


def check_bool(name: str, value) -> bool:
    """``value`` must be a ``bool``; returns it."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool; got {value!r}")
    return value
