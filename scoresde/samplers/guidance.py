"""Guidance as score transforms: each function returns a ``score_fn(x, t)`` that plugs into ``sample``.

A *labelled score* is ``cond_score(x, t, y) -> tensor like x`` with ``y (B,)`` long labels; a class-conditional
network built with ``num_classes = K`` takes labels in ``[0, K]``, ``K`` being the null (unconditional) label
(``model_label_score`` turns a ``ScoreModel`` into one).

Classifier-free guidance (Ho & Salimans 2021), with guidance weight ``w >= 0``::

    s_w(x, t) = (1 + w) s(x, t, y) - w s(x, t, null)

``w = 0`` is the conditional model; ``w > 0`` sharpens towards ``p_t(x | y) p_t(y | x)^w`` (the implicit classifier
``p_t(y | x) ∝ p_t(x | y) / p_t(x)``). The two scores come from one batched call of ``2B`` rows per evaluation.

Classifier guidance (Song et al. 2021, §5 and App. I; Dhariwal & Nichol 2021), with a time-dependent classifier
``p_t(y | x)``::

    s_w(x, t) = s(x, t) + w grad_x log p_t(y | x)

``w = 1`` with the exact ``p_t(y | x)`` gives the exact class-conditional score ``grad_x log p_t(x | y)``
(Bayes: ``log p_t(x | y) = log p_t(x) + log p_t(y | x) - log p(y)``).
"""

from __future__ import annotations

import math
import numbers
from typing import Callable

import torch

from ._common import ScoreFn

__all__ = ["model_label_score", "cfg_score_fn", "classifier_guided_score_fn"]

LabelledScore = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _check_w(w) -> float:
    """The guidance weight: a finite real number ``>= 0`` (not a bool)."""
    if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w) or w < 0:
        raise ValueError(f"w must be a finite number >= 0 (w = 0: no guidance); got {w!r}")
    return float(w)


def _check_label_value(name: str, y, high: int | None, what: str):
    """``y``: an int or an integer tensor ``(B,)`` with values in ``[0, high)`` (``[0, inf)`` for ``high = None``);
    returned as an int or a long tensor."""
    allowed = f"[0, {high - 1}] ({what})" if high is not None else f">= 0 ({what})"
    if torch.is_tensor(y) and y.dim() == 0 and not (y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool):
        y = int(y)
    if isinstance(y, numbers.Integral) and not isinstance(y, bool):
        if int(y) < 0 or (high is not None and int(y) >= high):
            raise ValueError(f"{name} must lie in {allowed}; got {int(y)}")
        return int(y)
    if not torch.is_tensor(y) or y.dim() != 1 or y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise ValueError(f"{name} must be an int or an integer tensor of shape (B,); got {y!r}")
    if bool((y < 0).any()) or (high is not None and bool((y >= high).any())):
        raise ValueError(f"{name} must lie in {allowed}; got values {y.unique().tolist()}")
    return y.long()


def _labels_for(y, x: torch.Tensor, name: str = "y") -> torch.Tensor:
    """``y`` (int or ``(B,)``) as a ``(B,)`` long tensor on ``x``'s device, checking ``B``."""
    B = x.shape[0]
    if isinstance(y, int):
        return torch.full((B,), y, dtype=torch.long, device=x.device)
    if y.shape[0] != B:
        raise ValueError(f"{name} must have shape (B,) = ({B},) to match x {tuple(x.shape)}; got {tuple(y.shape)}")
    return y.to(x.device)


def _batch_time(t, x: torch.Tensor) -> torch.Tensor:
    """``t`` as a ``(B,)`` tensor (a scalar or 0-d tensor is expanded)."""
    t = torch.as_tensor(t, device=x.device)
    return t.expand(x.shape[0]) if t.dim() == 0 else t


def model_label_score(model) -> LabelledScore:
    """``cond_score(x, t, y) = model.score_fn(x, t)`` with the network given ``class_labels = y``.

    Args:
        model: a ``ScoreModel`` whose network takes ``class_labels`` (``model.num_classes = K`` not ``None``).
    Returns:
        ``cond_score(x (B, *dims), t (B,), y (B,) long in [0, K]) -> (B, *dims)``; ``y = K`` is the null label.
        Its attribute ``num_classes`` is ``K``, so guided sampling reads
        ``cfg_score_fn(cs, y, w, null_label=cs.num_classes)``.
    Raises:
        TypeError if ``model`` has no ``score_fn`` / ``conditioned``; ValueError if its network is unconditional.
        The returned function raises ValueError for labels outside ``[0, K]`` or of the wrong shape.
    """
    if not (callable(getattr(model, "score_fn", None)) and callable(getattr(model, "conditioned", None))):
        raise TypeError(f"model must be a ScoreModel (with score_fn and conditioned); got {type(model).__name__}")
    K = getattr(model, "num_classes", None)
    if K is None:
        K = getattr(getattr(model, "net", None), "num_classes", None)
    if K is None:
        raise ValueError("model's network takes no class labels (num_classes is None): build it with num_classes=K "
                         "to sample class-conditionally or with classifier-free guidance")

    def cond_score(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        y = _labels_for(_check_label_value("y", y, K + 1, f"class labels 0..{K - 1}, null label {K}"), x)
        with model.conditioned(class_labels=y):
            return model.score_fn(x, t)

    cond_score.num_classes = K
    return cond_score


def cfg_score_fn(cond_score: LabelledScore, y, w: float, null_label: int) -> ScoreFn:
    """Classifier-free guidance ``s_w(x, t) = (1 + w) s(x, t, y) - w s(x, t, null)`` as a ``score_fn(x, t)``.

    Each call of the returned function is ONE call of ``cond_score`` (one NFE as ``CountingScore`` counts it) on a
    batch of ``2B`` rows: ``[x; x]``, ``[t; t]``, ``[y; null]``, split and combined. With ``w = 0`` it calls
    ``cond_score(x, t, y)`` on the ``B`` rows alone and returns its output unchanged (the conditional model, bitwise).

    Args:
        cond_score: labelled score ``cond_score(x, t, y) -> tensor like x``.
        y: the class: an int (every sample) or a ``(B,)`` integer tensor, in ``[0, null_label - 1]``.
        w: guidance weight, a finite number ``>= 0`` (negative weights, which mix in the unconditional score, are
            refused: use ``y = null_label`` with ``cond_score`` for the unconditional model).
        null_label: the unconditional label (``K`` for a network built with ``num_classes = K``), an int ``>= 1``.
    Returns:
        ``score_fn(x (B, *dims), t (B,)) -> (B, *dims)``.
    """
    if not callable(cond_score):
        raise TypeError(f"cond_score must be callable as cond_score(x, t, y); got {type(cond_score).__name__}")
    if isinstance(null_label, bool) or not isinstance(null_label, numbers.Integral) or null_label < 1:
        raise ValueError(f"null_label must be an integer >= 1 (the label after the K >= 1 classes); got {null_label!r}")
    null_label = int(null_label)
    y = _check_label_value("y", y, null_label, f"the classes; {null_label} is the null label")
    w = _check_w(w)

    def score_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        labels = _labels_for(y, x)
        t = _batch_time(t, x)
        if w == 0:
            return cond_score(x, t, labels)
        both = cond_score(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, torch.full_like(labels, null_label)]))
        s_c, s_u = both.chunk(2)
        return (1 + w) * s_c - w * s_u

    return score_fn


def classifier_guided_score_fn(score_fn: ScoreFn, log_prob_fn, y, w: float) -> ScoreFn:
    """Classifier guidance ``s_w(x, t) = s(x, t) + w grad_x log p_t(y | x)`` as a ``score_fn(x, t)``.

    ``log p_t(y | x) = log_softmax(log_prob_fn(x, t))[y]``, so ``log_prob_fn`` may return logits or
    log-probabilities. The gradient is taken under ``torch.enable_grad()`` (``sample`` runs under ``no_grad``) on a
    detached copy of ``x``; the output is detached. One call = one call of ``score_fn`` and one forward and backward
    pass of ``log_prob_fn`` (``CountingScore`` counts it as one NFE). ``w = 0`` returns ``score_fn(x, t)`` unchanged
    without calling the classifier.

    Args:
        score_fn: ``s(x, t)``, usually unconditional.
        log_prob_fn: ``log_prob_fn(x (B, *dims), t (B,)) -> (B, K)`` logits or log-probabilities, differentiable in ``x``.
        y: the class, an int or a ``(B,)`` integer tensor in ``[0, K - 1]`` (checked against ``K`` on the first call).
        w: guidance weight, a finite number ``>= 0``.
    Returns:
        ``score_fn(x (B, *dims), t (B,)) -> (B, *dims)``.
    """
    if not callable(score_fn):
        raise TypeError(f"score_fn must be callable as score_fn(x, t); got {type(score_fn).__name__}")
    if not callable(log_prob_fn):
        raise TypeError(f"log_prob_fn must be callable as log_prob_fn(x, t) -> (B, K); got {type(log_prob_fn).__name__}")
    y = _check_label_value("y", y, None, "class labels of the classifier")
    w = _check_w(w)

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s = score_fn(x, t)
        if w == 0:
            return s
        labels = _labels_for(y, x)
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            logits = log_prob_fn(xg, t)
            if not torch.is_tensor(logits) or logits.dim() != 2 or logits.shape[0] != x.shape[0]:
                raise ValueError(f"log_prob_fn(x, t) must return (B, K) = ({x.shape[0]}, K) logits; got "
                                 f"{tuple(logits.shape) if torch.is_tensor(logits) else type(logits).__name__}")
            K = logits.shape[1]
            if bool((labels >= K).any()):
                raise ValueError(f"y must lie in [0, {K - 1}] (the classifier's K = {K} classes); got values {labels.unique().tolist()}")
            log_py = torch.log_softmax(logits, dim=1).gather(1, labels[:, None]).sum()
            (grad,) = torch.autograd.grad(log_py, xg)
        return (s + w * grad.to(s.dtype)).detach()

    return guided
