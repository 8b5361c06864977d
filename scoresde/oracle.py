"""Isotropic Gaussian mixtures: the toolkit's ground truth.

For data ``p_0 = sum_k w_k N(mu_k, sigma_k^2 I)`` in ``D`` dimensions and any SDE with
affine drift (``x_t = m(t) x_0 + s(t) z``), every perturbed marginal is again a mixture::

    p_t(x) = sum_k w_k N(x; m(t) mu_k, v_k(t) I),   v_k(t) = m(t)^2 sigma_k^2 + s(t)^2

so its log-density and score are exact::

    grad_x log p_t(x) = - sum_k r_k(x, t) (x - m(t) mu_k) / v_k(t),   r_k = softmax_k(log w_k + log N_k)

Inputs may be ``(B, D)`` or image-shaped ``(B, *dims)`` with ``prod(dims) = D``; outputs keep the
input's shape (per-sample quantities are ``(B,)``). Computation is in the input's dtype.
"""

from __future__ import annotations

import math

import torch

from .sde import SDE, VPSDE, as_time, batch_broadcast

__all__ = ["GaussianMixture"]


class GaussianMixture:
    """``K`` isotropic Gaussian components in ``D`` dimensions.

    Args:
        means: ``(K, D)`` component means.
        stds: ``(K,)`` component standard deviations, each > 0.
        weights: ``(K,)`` non-negative mixture weights with a positive sum; normalised inside.
    """

    def __init__(self, means, stds, weights=None):
        means = torch.as_tensor(means)
        if not means.dtype.is_floating_point:
            means = means.to(torch.get_default_dtype())
        if means.dim() != 2:
            raise ValueError(f"means must have shape (K, D); got {tuple(means.shape)}")
        K, D = means.shape
        stds = torch.as_tensor(stds, dtype=means.dtype)
        if stds.dim() == 0:
            stds = stds.expand(K).clone()
        if stds.shape != (K,):
            raise ValueError(f"stds must have shape (K,) = ({K},) to match means (K, D) = {tuple(means.shape)}; got {tuple(stds.shape)}")
        if not bool((stds > 0).all()) or not bool(torch.isfinite(stds).all()):
            raise ValueError(f"stds must all be finite and > 0; got {stds.tolist()}")
        if weights is None:
            weights = torch.ones(K, dtype=means.dtype)
        weights = torch.as_tensor(weights, dtype=means.dtype)
        if weights.shape != (K,):
            raise ValueError(f"weights must have shape (K,) = ({K},) to match means (K, D) = {tuple(means.shape)}; got {tuple(weights.shape)}")
        if bool((weights < 0).any()) or not float(weights.sum()) > 0 or not bool(torch.isfinite(weights).all()):
            raise ValueError(f"weights must be finite, >= 0 and sum to a positive number; got {weights.tolist()}")
        self.means = means
        self.stds = stds
        self.weights = weights / weights.sum()
        self.K, self.D = K, D

    def __repr__(self):
        return f"GaussianMixture(K={self.K}, D={self.D})"

    # --- helpers ---------------------------------------------------------------
    def _params(self, x: torch.Tensor):
        kw = dict(device=x.device, dtype=x.dtype)
        return self.means.to(**kw), self.stds.to(**kw), self.weights.to(**kw)

    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x[0].numel() != self.D:
            raise ValueError(f"x must have shape (B, D) or (B, *dims) with prod(dims) = D = {self.D}; got {tuple(x.shape)}")
        return x.reshape(x.shape[0], self.D)

    def _components(self, xf: torch.Tensor, m: torch.Tensor, s: torch.Tensor):
        """Per-component log-joint ``log w_k + log N(x; m mu_k, v_k I)`` ``(B, K)``, the differences
        ``x - m mu_k`` ``(B, K, D)`` and the variances ``v_k`` ``(B, K)``, for per-sample ``m``, ``s`` ``(B,)``."""
        mu, sd, w = self._params(xf)
        var = m[:, None] ** 2 * sd[None, :] ** 2 + s[:, None] ** 2  # (B, K)
        diff = xf[:, None, :] - m[:, None, None] * mu[None, :, :]  # (B, K, D)
        sq = diff.pow(2).sum(-1)
        logn = -0.5 * self.D * torch.log(2 * math.pi * var) - 0.5 * sq / var
        return torch.log(w)[None, :] + logn, diff, var

    def _coef(self, x: torch.Tensor, t, sde: SDE | None):
        B = x.shape[0]
        if t is None and sde is None:
            one = torch.ones(B, device=x.device, dtype=x.dtype)
            return one, torch.zeros_like(one)
        if t is None or sde is None:
            raise ValueError("log_prob/score need both t and sde (for p_t) or neither (for the data density)")
        t = as_time(t, x, sde.T)
        return sde.marginal_coef(t)

    # --- public API ------------------------------------------------------------
    def sample(self, n: int, generator: torch.Generator | None = None, device=None, dtype=None, return_labels: bool = False):
        """Draw ``n`` samples ``(n, D)`` from the data mixture ``p_0``.

        With ``return_labels=True`` returns ``(x, k)``: ``k`` ``(n,)`` long, the component each row was drawn from
        (the same random draws, so ``x`` is identical to the ``return_labels=False`` result for the same generator)."""
        if not isinstance(return_labels, bool):
            raise ValueError(f"return_labels must be a bool; got {return_labels!r}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be an integer >= 0; got {n!r}")
        if device is None and generator is not None:
            device = generator.device
        dtype = dtype or self.means.dtype
        mu = self.means.to(device=device, dtype=dtype)
        sd = self.stds.to(device=device, dtype=dtype)
        if n == 0:
            x = torch.empty(0, self.D, device=device, dtype=dtype)
            return (x, torch.empty(0, dtype=torch.long, device=device)) if return_labels else x
        k = torch.multinomial(self.weights.to(device=device, dtype=torch.float64), n, replacement=True, generator=generator)
        z = torch.randn(n, self.D, generator=generator, device=device, dtype=dtype)
        x = mu[k] + sd[k, None] * z
        return (x, k) if return_labels else x

    def condition(self, mask, values) -> "GaussianMixture":
        """The exact conditional ``p_0(x_u | x_o = values)`` of the unobserved coordinates given the observed ones.

        An isotropic mixture conditioned on some coordinates is an isotropic mixture over the rest, with the
        same stds, the means restricted to the unobserved coordinates and the weights reweighted by how well
        each component explains the observation::

            p(x_u | x_o) = sum_k w'_k N(x_u; mu_k[u], sigma_k^2 I),   w'_k ∝ w_k N(x_o; mu_k[o], sigma_k^2 I)

        (the components factorise over coordinates, so ``p(x_o, x_u) = sum_k w_k N(x_o; .) N(x_u; .)``).

        Args:
            mask: bool, ``D`` entries, ``True`` = observed: shape ``(D,)`` or a data shape ``dims`` with
                ``prod(dims) = D`` (flattened row-major, as ``x.reshape(B, D)`` flattens samples). At least one
                coordinate must be unobserved; none observed gives the mixture itself.
            values: the observed values, either ``(n_obs,)`` (the observed coordinates in flattened order,
                ``n_obs = mask.sum()``) or a full tensor of ``mask``'s shape whose observed entries are used
                (the unobserved entries are ignored).

        Returns:
            ``GaussianMixture`` with ``K`` components (indices kept, a component far from ``values`` gets a
            weight near 0) in ``D_u = D - n_obs`` dimensions, the unobserved coordinates in flattened order:
            a full sample is ``x = values_full.clone(); x.reshape(B, D)[:, ~mask.reshape(-1)] = samples``.
            Computed in the mixture's dtype.
        """
        obs = self._check_mask(mask)
        values = torch.as_tensor(values)
        mask_shape = tuple(torch.as_tensor(mask).shape)
        n_obs = int(obs.sum())
        if values.dim() == 1 and values.shape[0] == n_obs:
            v = values
        elif tuple(values.shape) == mask_shape:
            v = values.reshape(self.D)[obs.to(values.device)]
        else:
            raise ValueError(f"values must have shape (n_obs,) = ({n_obs},) (the observed values) or mask's shape "
                             f"{mask_shape} (a full vector); got {tuple(values.shape)}")
        v = v.to(device=self.means.device, dtype=self.means.dtype)
        if not bool(torch.isfinite(v).all()):
            raise ValueError("values must be finite")
        obs = obs.to(self.means.device)
        mu_o, mu_u = self.means[:, obs], self.means[:, ~obs]
        var = self.stds**2
        log_n = -0.5 * n_obs * torch.log(2 * math.pi * var) - 0.5 * (v[None, :] - mu_o).pow(2).sum(1) / var
        logw = torch.log(self.weights) + log_n
        return GaussianMixture(mu_u, self.stds, torch.softmax(logw, dim=0))

    def _check_mask(self, mask) -> torch.Tensor:
        """``mask`` as a flat ``(D,)`` bool tensor, checked (``D`` entries, bool, at least one unobserved)."""
        mask = torch.as_tensor(mask)
        if mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor (True = observed); got dtype {mask.dtype}")
        if mask.numel() != self.D or mask.dim() == 0:
            raise ValueError(f"mask must have shape (D,) = ({self.D},) or a data shape with prod(dims) = D; got {tuple(mask.shape)}")
        flat = mask.reshape(self.D)
        if bool(flat.all()):
            raise ValueError("mask must leave at least one coordinate unobserved (False); got every coordinate observed")
        return flat

    def log_prob(self, x: torch.Tensor, t=None, sde: SDE | None = None) -> torch.Tensor:
        """Exact ``log p_0(x)`` or, with ``t`` and ``sde``, ``log p_t(x)``; shape ``(B,)``."""
        xf = self._flat(x)
        m, s = self._coef(x, t, sde)
        logj, _, _ = self._components(xf, m, s)
        return torch.logsumexp(logj, dim=1)

    def score(self, x: torch.Tensor, t=None, sde: SDE | None = None) -> torch.Tensor:
        """Exact ``grad_x log p_t(x)`` (or of ``p_0`` without ``t``/``sde``); shape of ``x``."""
        m, s = self._coef(x, t, sde)
        return self._score(self._flat(x), m, s).reshape(x.shape)

    def _score(self, xf: torch.Tensor, m: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """Score ``(B, D)`` of the mixture perturbed by ``x = m x_0 + s z`` (per-sample ``m``, ``s``)."""
        logj, diff, var = self._components(xf, m, s)
        r = torch.softmax(logj, dim=1)  # (B, K) responsibilities
        return -((r / var)[:, :, None] * diff).sum(1)

    def score_fn(self, sde: SDE):
        """The exact score of the perturbed marginals of ``sde`` as ``score_fn(x, t)`` (``t`` of shape ``(B,)``)."""

        def score_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.score(x, t, sde)

        return score_fn

    def ddpm_eps(self, x: torch.Tensor, i: torch.Tensor, sde: VPSDE) -> torch.Tensor:
        """Exact ``E[eps | x_i]`` of the discrete DDPM chain ``x_i = sqrt(a_i) x_0 + sqrt(1 - a_i) eps``.

        ``a_i = sde.alphas_cumprod[i]`` (0-based ``i``, shape ``(B,)`` integers). Equals
        ``-sqrt(1 - a_i) grad log q(x_i)``, ``q(x_i)`` the mixture perturbed by that kernel. Shape of ``x``.
        """
        if not isinstance(sde, VPSDE):
            raise TypeError(f"ddpm_eps needs a VPSDE (the discrete DDPM chain); got {type(sde).__name__}")
        i = torch.as_tensor(i, device=x.device)
        if i.dtype.is_floating_point or i.shape != (x.shape[0],):
            raise ValueError(f"i must be an integer tensor of shape (batch,) = ({x.shape[0]},); got {i.dtype} {tuple(i.shape)}")
        if bool(((i < 0) | (i >= sde.N)).any()):
            raise ValueError(f"i must lie in [0, N-1] = [0, {sde.N - 1}]")
        ab = sde.alphas_cumprod.to(x.device)[i].to(x.dtype)
        m, s = torch.sqrt(ab), torch.sqrt(1 - ab)
        return (-s[:, None] * self._score(self._flat(x), m, s)).reshape(x.shape)

    def ddpm_eps_fn(self, sde: VPSDE):
        """``eps_fn(x, i)``: the exact DDPM ε-prediction at integer steps ``i`` (see ``ddpm_eps``)."""

        def eps_fn(x: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
            return self.ddpm_eps(x, i, sde)

        return eps_fn
