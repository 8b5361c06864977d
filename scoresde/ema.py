"""Exponential moving average (EMA) of a model's weights.

After every optimiser step ``n = 1, 2, ...`` the shadow weights are updated as::

    d_n = min(rate, (1 + n) / (10 + n))          (with warm-up; d_n = rate without)
    theta_ema <- d_n * theta_ema + (1 - d_n) * theta

(the decay warm-up of score_sde / TensorFlow's ``ExponentialMovingAverage(num_updates=...)``,
where ``n`` counts the updates including the current one). Buffers (e.g. batch-norm running
statistics) are copied, not averaged.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ._validate import check_in_range, check_int

__all__ = ["EMA", "ema_decay"]


def ema_decay(rate: float, n: int, warmup: bool = True) -> float:
    """Decay used by the ``n``-th update (``n >= 1``): ``min(rate, (1 + n) / (10 + n))`` or ``rate``."""
    n = check_int("n (the update count)", n, 1)
    return min(rate, (1.0 + n) / (10.0 + n)) if warmup else rate


def _check_rate(rate) -> float:
    return check_in_range("ema_rate", rate, 0, 1, high_closed=False)


class EMA:
    """Shadow copy of ``model`` whose parameters track an exponential moving average.

    Args:
        model: the trained module (its parameters are read on ``update``, never written).
        rate: the target decay in ``[0, 1)`` (paper: 0.9999 VP, 0.999 VE).
        warmup: use ``d_n = min(rate, (1 + n) / (10 + n))`` instead of the constant ``rate``.

    ``self.module`` is a deep copy of ``model`` in eval mode without gradients; pass it to
    evaluation code. ``num_updates`` counts the updates done so far.
    """

    def __init__(self, model: nn.Module, rate: float = 0.9999, warmup: bool = True):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
        self.rate = _check_rate(rate)
        self.warmup = bool(warmup)
        self.num_updates = 0
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    def next_decay(self) -> float:
        """The decay the next ``update`` will use."""
        return ema_decay(self.rate, self.num_updates + 1, self.warmup)

    @torch.no_grad()
    def update(self, model: nn.Module) -> float:
        """``theta_ema <- d theta_ema + (1 - d) theta`` for every parameter; buffers copied. Returns ``d``."""
        d = self.next_decay()
        self.num_updates += 1
        shadow = list(self.module.parameters())
        params = [p.detach() for p in model.parameters()]
        if len(shadow) != len(params):
            raise ValueError(f"model has {len(params)} parameters but the EMA tracks {len(shadow)}")
        torch._foreach_mul_(shadow, d)
        torch._foreach_add_(shadow, params, alpha=1.0 - d)
        for b_ema, b in zip(self.module.buffers(), model.buffers()):
            b_ema.copy_(b)
        return d

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the EMA weights (and buffers) into ``model``."""
        model.load_state_dict(self.module.state_dict())

    def state_dict(self) -> dict:
        """``{"module": shadow state dict, "num_updates": int, "rate": float, "warmup": bool}``."""
        return {"module": self.module.state_dict(), "num_updates": self.num_updates, "rate": self.rate, "warmup": self.warmup}

    def load_state_dict(self, state: dict) -> None:
        """Restore from ``state_dict()`` output (the rate stored there replaces the current one)."""
        missing = {"module", "num_updates", "rate", "warmup"} - set(state)
        if missing:
            raise ValueError(f"EMA state is missing keys {sorted(missing)}")
        self.module.load_state_dict(state["module"])
        self.num_updates = int(state["num_updates"])
        self.rate = _check_rate(float(state["rate"]))
        self.warmup = bool(state["warmup"])
