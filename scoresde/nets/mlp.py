"""Residual MLP score network for vector data (toy 2-D sets, the Gaussian-mixture oracle)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .layers import ZERO_INIT_SCALE, LabelEmbedding, _check_dim, check_class_labels, dense, make_time_embedding

__all__ = ["MLPScoreNet"]


def _check_dropout(dropout) -> float:
    if not (isinstance(dropout, (int, float)) and not isinstance(dropout, bool) and 0.0 <= dropout < 1.0):
        raise ValueError(f"dropout must be a number in [0, 1); got {dropout!r}")
    return float(dropout)


class _MLPBlock(nn.Module):
    """``h + W_2 drop(SiLU(W_1 SiLU(h) + D SiLU(temb)))``; ``W_2`` starts near zero (block ~ identity)."""

    def __init__(self, hidden: int, temb_dim: int, dropout: float, g: torch.Generator):
        super().__init__()
        self.act = nn.SiLU()
        self.lin0 = dense(hidden, hidden, g)
        self.temb_proj = dense(temb_dim, hidden, g)
        self.drop = nn.Dropout(dropout)
        self.lin1 = dense(hidden, hidden, g, scale=ZERO_INIT_SCALE)

    def forward(self, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        u = self.lin0(self.act(h)) + self.temb_proj(self.act(temb))
        return h + self.lin1(self.drop(self.act(u)))


class MLPScoreNet(nn.Module):
    """Residual MLP ``f(x, t_in)`` for vectors, with the time embedding injected in every block.

    ``temb = L_2 SiLU(L_1 emb(t_in))`` (``emb`` sinusoidal or Gaussian Fourier, ``embed_dim`` wide,
    projected to ``hidden``); ``h_0 = L_in x``; ``depth`` blocks
    ``h <- h + W_2 drop(SiLU(W_1 SiLU(h) + D SiLU(temb)))``; output ``L_out SiLU(h)``.
    The output layer starts near zero (``f ~ 0`` at initialisation: ε-prediction 0, score 0).
    Weights are drawn from ``torch.Generator().manual_seed(seed)``. Dropout (training mode) uses
    torch's global random state.

    Class conditioning (``num_classes = K`` set): ``temb <- temb + E[y]`` with ``E`` a ``LabelEmbedding``
    (``K + 1`` rows of width ``hidden``, the last the null class; zero rows at initialisation, so a fresh
    conditional net equals the unconditional one of the same seed). ``num_classes=None``: no table, no new parameters.

    ``forward(x (B, dim), t_in (B,), class_labels (B,) int in [0, K] or None) -> (B, dim)``; ``t_in`` is the network
    time of ``ScoreModel.net_time`` (e.g. ``999 t`` or ``sigma(t)``); ``class_labels=None`` is the null class.
    """

    def __init__(
        self,
        dim: int,
        hidden: int = 256,
        depth: int = 3,
        time_embedding: str = "fourier",
        embed_dim: int = 64,
        fourier_scale: float = 16.0,
        dropout: float = 0.0,
        num_classes: Optional[int] = None,
        seed: int = 0,
    ):
        super().__init__()
        self.dim = _check_dim("dim", dim)
        _check_dim("hidden", hidden)
        _check_dim("depth", depth, 0)
        _check_dim("embed_dim", embed_dim, 2)
        dropout = _check_dropout(dropout)
        self.num_classes = None if num_classes is None else _check_dim("num_classes", num_classes)
        g = torch.Generator().manual_seed(int(seed))
        self.embed = make_time_embedding(time_embedding, embed_dim, fourier_scale, seed)
        self.temb = nn.Sequential(dense(embed_dim, hidden, g), nn.SiLU(), dense(hidden, hidden, g))
        if num_classes is not None:
            self.label_embed = LabelEmbedding(num_classes, hidden)
        self.inp = dense(dim, hidden, g)
        self.blocks = nn.ModuleList(_MLPBlock(hidden, hidden, dropout, g) for _ in range(depth))
        self.out = nn.Sequential(nn.SiLU(), dense(hidden, dim, g, scale=ZERO_INIT_SCALE))

    def forward(self, x: torch.Tensor, t_in: torch.Tensor, class_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape (B, dim) = (B, {self.dim}); got {tuple(x.shape)}")
        if not torch.is_tensor(t_in) or t_in.shape != (x.shape[0],):
            shape = tuple(t_in.shape) if torch.is_tensor(t_in) else type(t_in).__name__
            raise ValueError(f"t_in must have shape (B,) = ({x.shape[0]},); got {shape}")
        check_class_labels(class_labels, self.num_classes, x.shape[0], type(self).__name__)
        temb = self.temb(self.embed(t_in.to(x.dtype)))
        if self.num_classes is not None:
            temb = temb + self.label_embed(class_labels, x.shape[0])
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, temb)
        return self.out(h)
