"""The score model: network + SDE + parameterisation -> score, ε and denoised x0.

This is the one place where a network's raw output ``f = net(x, net_time(t))`` acquires a meaning.
With ``x_t = m(t) x_0 + s(t) z`` (``sde.marginal_coef``) the four parameterisations are

==================  ==========================  ===============================
parameterization    network predicts            score ``grad_x log p_t(x)``
==================  ==========================  ===============================
``"eps"``           ``eps_hat`` (DDPM)          ``-eps_hat / s``
``"score"``         the score                   ``f``
``"sigma_scaled"``  ``sigma * score`` (NCSN++)  ``f / sigma``  (VE only)
``"x0"``            ``x0_hat`` (denoiser)       ``(m x0_hat - x) / s^2``
==================  ==========================  ===============================

and in every case ``eps = -s score`` and Tweedie's ``x0 = E[x_0 | x_t] = (x + s^2 score) / m``.

Extra network inputs (a condition such as ``ConvScoreNet``'s ``aug_level``) are given for a block of calls with
``with model.conditioned(aug_level=a): ...``; outside such a block the network sees its defaults, so samplers and
likelihoods (which call ``score_fn(x, t)``) use the default (clean) condition.

Network time (``net_time``), as in score_sde:

* continuous VP / sub-VP: ``999 t``;
* continuous VE: ``sigma(t)``;
* discrete (``continuous=False``), with ``i = sde.discrete_timestep(t) = round(t (N - 1) / T)``:
  VP (DDPM): the step ``i`` as a float, and ``(m, s) = (sqrt(alpha_bar_i), sqrt(1 - alpha_bar_i))``
  of the DDPM chain; VE (SMLD): the noise level ``sigma_i = sde.discrete_sigmas[i]`` (NCSN conditions
  on ``sigma_i``, not on the index), and ``(m, s) = (1, sigma_i)``. Because ``sigma(i T / (N-1)) = sigma_i``,
  a VE network sees the same input in both modes. Sub-VP has no discrete chain.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

from .sde import SDE, VESDE, VPSDE, as_time, batch_broadcast

__all__ = ["ScoreModel", "PARAMETERIZATIONS", "VP_TIME_SCALE"]

PARAMETERIZATIONS = ("eps", "score", "sigma_scaled", "x0")
VP_TIME_SCALE = 999.0  # continuous VP / sub-VP networks see 999 t (score_sde)


class ScoreModel(nn.Module):
    """Wrap ``net(x, t_in)`` for ``sde`` under a parameterisation (see the module docstring).

    Args:
        net: an ``nn.Module`` with ``net(x (B, ...), t_in (B,)) -> (B, ...)``.
        sde: a ``VPSDE``, ``SubVPSDE`` or ``VESDE``.
        parameterization: one of ``"eps"``, ``"score"``, ``"sigma_scaled"`` (VE only), ``"x0"``.
        continuous: continuous-time network (``t`` in ``[0, T]``) or discrete DDPM / SMLD network
            (``continuous=False``; VP or VE only).

    All methods take ``x`` of shape ``(B, ...)`` and ``t`` of shape ``(B,)`` (or a scalar) in ``[0, T]``
    and return a tensor shaped like ``x``.
    """

    def __init__(self, net: nn.Module, sde: SDE, parameterization: str = "eps", continuous: bool = True):
        super().__init__()
        if not isinstance(net, nn.Module):
            raise TypeError(f"net must be a torch.nn.Module; got {type(net).__name__}")
        if not isinstance(sde, SDE):
            raise TypeError(f"sde must be a scoresde.sde.SDE (VPSDE, SubVPSDE, VESDE); got {type(sde).__name__}")
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"parameterization must be one of {PARAMETERIZATIONS}; got {parameterization!r}")
        if not isinstance(continuous, bool):
            raise TypeError(f"continuous must be a bool; got {continuous!r}")
        if parameterization == "sigma_scaled" and not isinstance(sde, VESDE):
            raise ValueError(
                f"parameterization='sigma_scaled' needs a VESDE (score = net / sigma(t)); got {type(sde).__name__}; "
                "use 'eps' for VP/sub-VP"
            )
        if not continuous and not isinstance(sde, (VPSDE, VESDE)):
            raise ValueError(
                f"continuous=False needs a VPSDE (DDPM) or VESDE (SMLD); got {type(sde).__name__}, which has no discrete chain"
            )
        self.net = net
        self.sde = sde
        self.parameterization = parameterization
        self.continuous = continuous
        self._net_kwargs: dict = {}  # extra network inputs inside a `conditioned` block (not saved)

    @property
    def num_classes(self):
        """The network's number of classes (``class_labels`` in ``[0, K]``, ``K`` the null label) or ``None`` for an
        unconditional network; read from ``net.num_classes`` (``build.Flatten`` passes its network's on)."""
        return getattr(self.net, "num_classes", None)

    def extra_repr(self) -> str:
        return f"sde={self.sde!r}, parameterization={self.parameterization!r}, continuous={self.continuous}"

    # --- time and coefficients ------------------------------------------------------
    def _time(self, x: torch.Tensor, t) -> torch.Tensor:
        return as_time(t, x, self.sde.T)

    def net_time(self, t: torch.Tensor) -> torch.Tensor:
        """The network's time input for ``t`` ``(B,)`` -> ``(B,)`` (see the module docstring).

        Continuous VP/sub-VP ``999 t``; continuous VE ``sigma(t)``; discrete VP the step
        ``i = round(t (N-1) / T)`` as a float; discrete VE ``sigma_i``.
        """
        if self.continuous:
            if isinstance(self.sde, VESDE):
                return self.sde.sigma(t)
            return VP_TIME_SCALE * t
        i = self.sde.discrete_timestep(t)
        if isinstance(self.sde, VESDE):
            return self.sde.discrete_sigmas.to(t.device)[i].to(t.dtype)
        return i.to(t.dtype)

    def coefs(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(m, s)`` ``(B,)`` of the perturbation ``x_t = m x_0 + s z`` the network is conditioned on.

        Continuous: ``sde.marginal_coef(t)``. Discrete VP: ``(sqrt(alpha_bar_i), sqrt(1 - alpha_bar_i))``
        (in float64, then cast to ``t``'s dtype); discrete VE: ``(1, sigma_i)``, with ``i = sde.discrete_timestep(t)``.
        """
        if self.continuous:
            return self.sde.marginal_coef(t)
        i = self.sde.discrete_timestep(t)
        if isinstance(self.sde, VESDE):
            sigma = self.sde.discrete_sigmas.to(t.device)[i].to(t.dtype)
            return torch.ones_like(sigma), sigma
        return self._ddpm_coefs(i, t.dtype)

    def _ddpm_coefs(self, i: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sqrt(alpha_bar_i), sqrt(1 - alpha_bar_i))`` of DDPM steps ``i`` ``(B,)``, computed in float64 from
        the SDE's float64 ``alphas_cumprod`` and rounded once to ``dtype``: forming ``1 - alpha_bar_i`` in
        float32 would lose ~1e-4 of ``s`` at the first steps (``alpha_bar_0 = 1 - 1e-4``)."""
        ab = self.sde.alphas_cumprod.to(device=i.device, dtype=torch.float64)[i]
        return torch.sqrt(ab).to(dtype), torch.sqrt(1.0 - ab).to(dtype)

    # --- conversions ------------------------------------------------------------------
    def _eps_from_output(self, out, x, m, s):
        """``eps = -s score`` from the raw output ``out`` (per-sample ``m``, ``s`` broadcast to ``x``)."""
        p = self.parameterization
        if p == "eps":
            return out
        if p == "score":
            return -s * out
        if p == "sigma_scaled":
            return -out
        return (x - m * out) / s  # x0

    def _score_from_output(self, out, x, m, s):
        p = self.parameterization
        if p == "eps":
            return -out / s
        if p == "score":
            return out
        if p == "sigma_scaled":
            return out / s
        return (m * out - x) / s**2  # x0

    def _denoise_from_output(self, out, x, m, s):
        if self.parameterization == "x0":
            return out
        return (x - s * self._eps_from_output(out, x, m, s)) / m

    def _call_net(self, x: torch.Tensor, t_in: torch.Tensor) -> torch.Tensor:
        return self.net(x, t_in, **self._net_kwargs) if self._net_kwargs else self.net(x, t_in)

    @contextmanager
    def conditioned(self, **net_kwargs) -> Iterator["ScoreModel"]:
        """Within the block every network call gets ``net_kwargs`` as extra keyword inputs, e.g.
        ``with model.conditioned(aug_level=level): loss = loss_fn(model, y, g)`` (``level (B,)``, one per sample).
        Blocks nest (inner keys win); the previous inputs are restored on exit, also after an exception."""
        prev = self._net_kwargs
        self._net_kwargs = {**prev, **net_kwargs}
        try:
            yield self
        finally:
            self._net_kwargs = prev

    def _evaluate(self, x, t, convert):
        t = self._time(x, t)
        m, s = self.coefs(t)
        out = self._call_net(x, self.net_time(t))
        return convert(out, x, batch_broadcast(m, x), batch_broadcast(s, x))

    # --- public API -------------------------------------------------------------------
    def forward(self, x: torch.Tensor, t) -> torch.Tensor:
        """Raw network output ``net(x, net_time(t))``; shape of ``x``."""
        t = self._time(x, t)
        return self._call_net(x, self.net_time(t))

    def score_fn(self, x: torch.Tensor, t) -> torch.Tensor:
        """``grad_x log p_t(x)`` from the network output (table in the module docstring); shape of ``x``."""
        return self._evaluate(x, t, self._score_from_output)

    def guided_score_fn(self, class_label, guidance: float = 0.0) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """``score_fn(x, t)`` of a class-conditional model (``num_classes = K``) for ``scoresde.sample``:
        classifier-free guidance ``(1 + w) s(x, t, y) - w s(x, t, null)`` with ``w = guidance >= 0`` and ``y =
        class_label`` (an int or a ``(B,)`` integer tensor in ``[0, K - 1]``; one network call on a doubled batch per
        evaluation for ``w > 0``, the conditional rows only for ``w = 0``), or the null label's score
        ``s(x, t, null)`` for ``class_label = K``. ``samplers.guidance.cfg_score_fn`` does the work."""
        from .samplers.guidance import cfg_score_fn, model_label_score

        cond = model_label_score(self)
        K = cond.num_classes
        if torch.is_tensor(class_label) and class_label.dim() == 1 and class_label.numel() \
                and not class_label.dtype.is_floating_point and bool((class_label == K).all()):
            class_label = K  # every row the null label
        if isinstance(class_label, int) and not isinstance(class_label, bool) and class_label == K:
            if guidance != 0:
                raise ValueError(f"class_label={class_label} is the null label: guidance must be 0; got {guidance!r}")
            return lambda x, t: cond(x, t, class_label)
        return cfg_score_fn(cond, class_label, guidance, cond.num_classes)

    def eps_fn(self, x: torch.Tensor, t) -> torch.Tensor:
        """``eps_hat = -s(t) score(x, t)`` (the noise in ``x = m x_0 + s eps``); shape of ``x``."""
        return self._evaluate(x, t, self._eps_from_output)

    def denoise_fn(self, x: torch.Tensor, t) -> torch.Tensor:
        """Tweedie's ``E[x_0 | x_t = x] = (x + s^2 score) / m = (x - s eps_hat) / m``; shape of ``x``."""
        return self._evaluate(x, t, self._denoise_from_output)

    def ddpm_time(self, i: torch.Tensor, dtype=torch.float64) -> torch.Tensor:
        """Continuous time ``t_i`` whose marginal equals DDPM step ``i``: ``lambda(t_i) = 1/2 log(abar_i / (1 - abar_i))``.

        For a VP SDE ``m^2 + s^2 = 1``, so equal log-SNR means ``(m(t_i), s(t_i)) = (sqrt(abar_i), sqrt(1 - abar_i))``.
        Solved by ``sde.t_from_log_snr`` in float64 and clamped to ``[0, T]``: with the default linear schedule
        (N = 1000) ``abar_i < m(T)^2`` for the last four steps ``i >= 996``, which therefore map to ``T``
        (``m`` then differs from ``sqrt(abar_i)`` by at most 2.2e-4); with the cosine schedule the last step
        (``beta_999`` clipped to 0.999) maps to ``T``. ``i`` ``(B,)`` long -> ``(B,)``.
        """
        if not isinstance(self.sde, VPSDE):
            raise TypeError(f"DDPM steps need a VPSDE; got {type(self.sde).__name__}")
        ab = self.sde.alphas_cumprod.to(i.device)[i]
        lam = 0.5 * (torch.log(ab) - torch.log1p(-ab))
        return self.sde.t_from_log_snr(lam).clamp(0.0, self.sde.T).to(dtype)

    def ddpm_eps_fn(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """``eps(x, i)``: the ε-prediction at integer DDPM steps ``i`` ``(B,)`` (long, ``0 <= i < N``).

        Same convention as ``GaussianMixture.ddpm_eps_fn``: ``x = sqrt(abar_i) x_0 + sqrt(1 - abar_i) eps``
        with ``abar_i = sde.alphas_cumprod[i]``. A discrete model is called at step ``i``; a continuous
        model at ``t_i = ddpm_time(i)``. Needs a VPSDE (``TypeError`` otherwise). Returns a tensor like ``x``.
        """
        if not isinstance(self.sde, VPSDE):
            raise TypeError(f"ddpm_eps_fn needs a VPSDE (the discrete DDPM chain); got {type(self.sde).__name__}")
        N = self.sde.N

        def eps(x: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
            if not torch.is_tensor(i) or i.dtype.is_floating_point or i.dtype == torch.bool or i.shape != (x.shape[0],):
                desc = f"{i.dtype} {tuple(i.shape)}" if torch.is_tensor(i) else type(i).__name__
                raise ValueError(f"i must be an integer tensor of shape (batch,) = ({x.shape[0]},); got {desc}")
            if bool(((i < 0) | (i >= N)).any()):
                raise ValueError(f"i must lie in [0, N-1] = [0, {N - 1}]; got values in [{int(i.min())}, {int(i.max())}]")
            i = i.to(x.device).long()
            if self.continuous:
                return self.eps_fn(x, self.ddpm_time(i, dtype=x.dtype))
            m, s = self._ddpm_coefs(i, x.dtype)
            out = self._call_net(x, i.to(x.dtype))
            return self._eps_from_output(out, x, batch_broadcast(m, x), batch_broadcast(s, x))

        return eps
