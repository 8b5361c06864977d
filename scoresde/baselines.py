"""Classical density baseline for discrete image data: a full-covariance Gaussian mixture.

The comparison number for the models' bits/dim on the embedded digits (or any discrete set).

Dequantised bits/dim. Data ``k in {0, ..., L-1}^D`` are mapped to ``u = (k + U) / L``,
``U ~ U[0, 1)^D`` -- the same uniform dequantisation the score models use
(``scoresde.data.uniform_dequantize`` with ``centered=False``), so ``u in [0, 1)^D``. The
discrete probability of ``k`` is the mass of a continuous density ``p_u`` on its bin of volume
``L^-D``, and by Jensen's inequality::

    log P(k) = log E_U[ p_u((k + U) / L) ] - D log L  >=  E_U[ log p_u((k + U) / L) ] - D log L

so the dequantised bits/dim, an upper bound on the discrete code length per dimension, is::

    bpd(k) = E_U[ -log p_u(u) ] / (D ln 2) + log2 L

scikit-learn's ``GaussianMixture.score_samples`` returns ``log p_u(u)`` on the ``u`` scale directly,
so no further Jacobian enters (a model on ``y = a u + b`` would add ``-D log a`` to ``log p``; the
``+8``/``+7`` of FACTS.md for 8-bit data are exactly ``log2 L - log2 a`` with ``a = 1, 2``). The
expectation is estimated with ``n_dequant`` draws of ``U`` per example.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from .data.transforms import uniform_dequantize

__all__ = ["BitsPerDim", "GMMBaseline", "dequantize_unit", "gmm_bits_per_dim", "fit_gmm_baseline"]

DEFAULT_COMPONENTS = (1, 2, 4, 8, 16, 32)


class BitsPerDim(NamedTuple):
    """Mean bits/dim over examples and its standard error ``std / sqrt(N)`` (per-example values averaged over dequantisations)."""

    mean: float
    stderr: float


@dataclass
class GMMBaseline:
    """Result of ``fit_gmm_baseline``: the chosen fitted model and the validation curve."""

    gmm: object  # sklearn.mixture.GaussianMixture
    n_components: int
    val_bpd: dict[int, BitsPerDim] = field(default_factory=dict)
    models: dict[int, object] = field(default_factory=dict)


def _as_int_tensor(name: str, data, levels: int) -> torch.Tensor:
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 2:
        raise ValueError(f"levels must be an integer >= 2; got {levels!r}")
    t = torch.as_tensor(np.asarray(data)) if not torch.is_tensor(data) else data
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer levels (uint8/long); got dtype {t.dtype}")
    if t.dim() < 2 or t.shape[0] < 1:
        raise ValueError(f"{name} must have shape (N, *shape) with N >= 1; got {tuple(t.shape)}")
    if int(t.min()) < 0 or int(t.max()) > levels - 1:
        raise ValueError(f"{name} values must lie in [0, levels - 1] = [0, {levels - 1}]; got [{int(t.min())}, {int(t.max())}]")
    return t.cpu()


def dequantize_unit(data_int: torch.Tensor, levels: int, generator: torch.Generator | None = None) -> np.ndarray:
    """``u = (k + U) / L`` flattened to ``(N, D)`` float64 numpy (``uniform_dequantize`` with ``centered=False``)."""
    u = uniform_dequantize(data_int, levels, centered=False, generator=generator, dtype=torch.float64)
    return u.reshape(u.shape[0], -1).numpy()


def gmm_bits_per_dim(gmm, data_int, levels: int, n_dequant: int = 1, seed: int = 0) -> BitsPerDim:
    """Dequantised bits/dim ``E_U[-log p_u((k + U)/L)] / (D ln 2) + log2 L`` of a density on ``u in [0,1)^D``.

    Args:
        gmm: any object with ``score_samples(u: (N, D) float64) -> (N,)`` natural-log densities on
            the ``u`` scale (e.g. a fitted ``sklearn.mixture.GaussianMixture``).
        data_int: integer data ``(N, *shape)`` with values in ``[0, levels - 1]`` (tensor or array).
        levels: ``L``.
        n_dequant: draws of ``U`` per example, averaged per example before the statistics.
        seed: the draws come from ``torch.Generator().manual_seed(seed)``, one
            ``uniform_dequantize`` call of the whole ``data_int`` per draw, in order.

    Returns:
        ``BitsPerDim(mean, stderr)`` over the ``N`` examples (``stderr = std_ddof1 / sqrt(N)``, 0 if N = 1).
    """
    k = _as_int_tensor("data_int", data_int, levels)
    if isinstance(n_dequant, bool) or not isinstance(n_dequant, int) or n_dequant < 1:
        raise ValueError(f"n_dequant must be an integer >= 1; got {n_dequant!r}")
    if not hasattr(gmm, "score_samples"):
        raise TypeError(f"gmm must have a score_samples(u) method (e.g. sklearn GaussianMixture); got {type(gmm).__name__}")
    N, D = k.shape[0], k[0].numel()
    g = torch.Generator().manual_seed(seed)
    nll = np.zeros(N)
    for _ in range(n_dequant):
        nll -= np.asarray(gmm.score_samples(dequantize_unit(k, levels, g)), dtype=np.float64)
    bpd = nll / n_dequant / (D * math.log(2)) + math.log2(levels)
    se = float(bpd.std(ddof=1) / math.sqrt(N)) if N > 1 else 0.0
    return BitsPerDim(float(bpd.mean()), se)


def fit_gmm_baseline(
    train_int,
    val_int,
    levels: int,
    components=DEFAULT_COMPONENTS,
    seed: int = 0,
    n_dequant: int = 1,
    reg_covar: float = 1e-6,
    max_iter: int = 200,
    n_init: int = 1,
    progress: bool = False,
) -> GMMBaseline:
    """Fit full-covariance Gaussian mixtures to dequantised training data; pick ``K`` by validation bits/dim.

    For each ``K`` in ``components``: ``sklearn.mixture.GaussianMixture(K, covariance_type="full",
    reg_covar, max_iter, n_init, random_state=seed)`` is fitted (EM, maximum likelihood) on
    ``u = (k + U) / L`` of ``train_int`` (one draw of ``U`` from seed ``seed``), then scored with
    ``gmm_bits_per_dim(model, val_int, levels, n_dequant, seed + 1)``. The ``K`` with the lowest
    validation mean is chosen.

    Args:
        train_int, val_int: integer data ``(N, *shape)`` in ``[0, levels - 1]``, same per-sample shape.
        levels: ``L``.
        components: candidate numbers of components, each an integer in ``[1, N_train]``.

    Returns:
        ``GMMBaseline`` with the chosen model, its ``K``, validation ``BitsPerDim`` per ``K`` and all models.
    """
    from sklearn.mixture import GaussianMixture

    tr = _as_int_tensor("train_int", train_int, levels)
    va = _as_int_tensor("val_int", val_int, levels)
    if tr.shape[1:] != va.shape[1:]:
        raise ValueError(f"train_int and val_int must have the same per-sample shape; got {tuple(tr.shape[1:])} and {tuple(va.shape[1:])}")
    components = tuple(components)
    if not components or any(isinstance(K, bool) or not isinstance(K, int) or not 1 <= K <= tr.shape[0] for K in components):
        raise ValueError(f"components must be a non-empty sequence of integers in [1, N_train] = [1, {tr.shape[0]}]; got {components!r}")
    if not (isinstance(reg_covar, (int, float)) and reg_covar >= 0):
        raise ValueError(f"reg_covar must be a number >= 0; got {reg_covar!r}")

    u_train = dequantize_unit(tr, levels, torch.Generator().manual_seed(seed))
    result = GMMBaseline(gmm=None, n_components=0)
    for K in tqdm(components, desc="GMM baseline", disable=not progress):
        model = GaussianMixture(
            n_components=K, covariance_type="full", reg_covar=reg_covar, max_iter=max_iter, n_init=n_init, random_state=seed
        ).fit(u_train)
        result.models[K] = model
        result.val_bpd[K] = gmm_bits_per_dim(model, va, levels, n_dequant=n_dequant, seed=seed + 1)
    best = min(result.val_bpd, key=lambda K: result.val_bpd[K].mean)
    result.gmm, result.n_components = result.models[best], best
    return result
