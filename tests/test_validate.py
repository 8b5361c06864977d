"""The shared argument checks: accepted values, returned types, and the 'X must be ...; got v' messages."""

import math

import numpy as np
import pytest

from scoresde._validate import check_bool, check_choice, check_in_range, check_int, check_number, check_positive


def test_accepts_and_converts():
    assert check_int("n", np.int64(3)) == 3 and type(check_int("n", np.int64(3))) is int
    assert check_positive("lr", np.float32(0.5)) == 0.5 and type(check_positive("lr", 2)) is float
    assert check_positive("clip", None, optional=True) is None
    assert check_positive("wd", 0, allow_zero=True) == 0.0
    assert check_in_range("b", 0, 0, 1, high_closed=False) == 0.0
    assert check_number("x", 3, lambda v: v % 2 == 1, "an odd number") == 3.0
    assert check_choice("m", "a", ("a", "b")) == "a" and check_bool("f", False) is False


@pytest.mark.parametrize("call,message", [
    (lambda: check_int("n_steps", -1, 0), "n_steps must be an integer >= 0; got -1"),
    (lambda: check_int("seed", True, 0), "seed must be an integer >= 0; got True"),
    (lambda: check_int("warmup", 2.0, 0), "warmup must be an integer >= 0; got 2.0"),
    (lambda: check_positive("lr", math.nan), "lr must be a finite number > 0; got nan"),
    (lambda: check_positive("wd", -1.0, allow_zero=True), "wd must be a finite number >= 0; got -1.0"),
    (lambda: check_positive("grad_clip", 0.0, optional=True), "grad_clip must be a finite number > 0 or None; got 0.0"),
    (lambda: check_positive("lr", "1"), "lr must be a finite number > 0; got '1'"),
    (lambda: check_in_range("beta1", 1.0, 0, 1, high_closed=False), "beta1 must be a number in [0, 1); got 1.0"),
    (lambda: check_in_range("r", -0.1, 0, 1), "r must be a number in [0, 1]; got -0.1"),
    (lambda: check_in_range("r", 0, 0, 1, low_closed=False), "r must be a number in (0, 1]; got 0"),
    (lambda: check_in_range("r", math.inf, -math.inf, math.inf, False, False), "r must be a number in (-inf, inf); got inf"),
    (lambda: check_number("x", 2, lambda v: v % 2 == 1, "an odd number"), "x must be an odd number; got 2"),
    (lambda: check_choice("amp", "fp8", ("off", "bf16")), "amp must be one of ('off', 'bf16'); got 'fp8'"),
    (lambda: check_bool("ema_warmup", 1), "ema_warmup must be a bool; got 1"),
])
def test_messages(call, message):
    with pytest.raises(ValueError) as e:
        call()
    assert str(e.value) == message
