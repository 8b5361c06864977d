"""Isotropic Gaussian mixtures: the toolkit's ground truth.

For data ``p_0 = sum_k w_k N(mu_k, sigma_k^2 I)`` in ``D`` dimensions and any SDE with
affine drift (``x_t = m(t) x_0 + s(t) z``), every perturbed marginal is again a mixture::

    p_t(x) = sum_k w_k N(x; m(t) mu_k, v_k(t) I),   v_k(t) = m(t)^2 sigma_k^2 + s(t)^2

so its log-density and score are exact::

    grad_x log p_t(x) = - sum_k r_k(x, t) (x - m(t) mu_k) / v_k(t),   r_k = softmax_k(log w_k + log N_k)

Classes and conditionals (controllable generation, Song et al. 2021 §5): a class ``y = c`` is a set of components
``C_c``; the classes partition ``{0, ..., K-1}``. Then ``p_0(x | c)`` is the sub-mixture over ``C_c`` with renormalised
weights (``subset``), its perturbed marginals are the same sub-mixture perturbed, and the noise-conditional classifier
is exact::

    p_t(y = c | x) = sum_{k in C_c} r_k(x, t)        (class_log_prob)

so ``grad_x log p_t(x) + grad_x log p_t(c | x) = grad_x log p_t(x | c)`` holds exactly. ``condition`` gives the exact
distribution of unobserved coordinates given observed ones, and ``cfg_gaussian_target`` the exact target of
classifier-free guidance where it is closed-form (two Gaussians with one std).

Inputs may be ``(B, D)`` or image-shaped ``(B, *dims)`` with ``prod(dims) = D``; outputs keep the
input's shape (per-sample quantities are ``(B,)``). Computation is in the input's dtype.
"""

from __future__ import annotations

import math

import torch

from ._validate import check_number
from .sde import SDE, VPSDE, as_time, batch_broadcast

__all__ = ["GaussianMixture", "labelled_score_fn", "cfg_gaussian_target"]


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

    def _check_components(self, components, name: str = "components") -> torch.Tensor:
        """A non-empty list of distinct component indices in ``[0, K)`` as a ``(n,)`` long tensor."""
        c = torch.as_tensor(components) if not isinstance(components, (list, tuple)) or len(components) else None
        if c is None or c.dim() != 1 or c.numel() == 0 or c.dtype.is_floating_point or c.dtype == torch.bool:
            raise ValueError(f"{name} must be a non-empty list of component indices in [0, K) = [0, {self.K}); got {components!r}")
        c = c.long().cpu()
        if bool(((c < 0) | (c >= self.K)).any()) or len(set(c.tolist())) != c.numel():
            raise ValueError(f"{name} must be distinct component indices in [0, K) = [0, {self.K}); got {c.tolist()}")
        return c

    def _check_classes(self, classes) -> list[torch.Tensor]:
        """``classes``: a list of component-index lists that partitions ``{0, ..., K-1}``."""
        if not isinstance(classes, (list, tuple)) or not classes:
            raise ValueError(f"classes must be a non-empty list of component-index lists partitioning [0, K) = [0, {self.K}); got {classes!r}")
        idx = [self._check_components(c, f"classes[{i}]") for i, c in enumerate(classes)]
        flat = sorted(int(k) for c in idx for k in c)
        if flat != list(range(self.K)):
            raise ValueError(f"classes must partition the components [0, K) = [0, {self.K}) (each index in exactly one class); "
                             f"got {[c.tolist() for c in idx]}")
        return idx

    def subset(self, components) -> "GaussianMixture":
        """The class-conditional data distribution ``p_0(x | y) = sum_{k in C} w_k N(mu_k, sigma_k^2 I) / sum_{k in C} w_k``
        of a class made of the ``components`` ``C`` (list of distinct indices in ``[0, K)``); a mixture of ``|C|``
        components in ``D`` dimensions, in the given order."""
        c = self._check_components(components)
        if not float(self.weights[c].sum()) > 0:
            raise ValueError(f"components {c.tolist()} have total weight 0; a class needs positive probability")
        return GaussianMixture(self.means[c], self.stds[c], self.weights[c])

    def class_log_prob(self, x: torch.Tensor, t, sde: SDE | None, classes) -> torch.Tensor:
        """Exact noise-conditional classifier ``log p_t(y = c | x) = logsumexp_{k in C_c} log(w_k N_k) - log p_t(x)``.

        Args:
            x: ``(B, D)`` or ``(B, *dims)``. t, sde: both given (``t`` ``(B,)`` or a scalar) for ``p_t``, or both
                ``None`` for the data distribution.
            classes: ``C`` lists of component indices that partition ``[0, K)``; class ``c`` is ``classes[c]``.
        Returns:
            ``(B, C)`` log-probabilities (each row's ``exp`` sums to 1).
        """
        idx = self._check_classes(classes)
        m, s = self._coef(x, t, sde)
        logj, _, _ = self._components(self._flat(x), m, s)
        log_class = torch.stack([torch.logsumexp(logj[:, c.to(x.device)], dim=1) for c in idx], dim=1)
        return log_class - torch.logsumexp(logj, dim=1, keepdim=True)

    def class_log_prob_fn(self, sde: SDE, classes):
        """``log_prob_fn(x, t) -> (B, C)``: the exact ``log p_t(y | x)`` of ``class_log_prob`` for ``sde``, in the form a
        classifier takes in ``scoresde.samplers.classifier_guided_score_fn``."""
        self._check_classes(classes)

        def log_prob_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.class_log_prob(x, t, sde, classes)

        return log_prob_fn

    def class_score_fn(self, sde: SDE, components):
        """``score_fn(x, t)``: the exact class-conditional score ``grad_x log p_t(x | y)`` of the class made of
        ``components`` (the perturbed marginals of ``subset(components)``)."""
        return self.subset(components).score_fn(sde)

    def label_score_fn(self, sde: SDE, classes):
        """``cond_score(x, t, y)``: the exact labelled score, ``y (B,)`` long in ``[0, C]``: label ``c < C`` gives the score
        of class ``classes[c]`` (``subset``), the null label ``C = len(classes)`` the unconditional score of the whole
        mixture (what a class-conditional network trained with label dropout learns). See ``labelled_score_fn``."""
        idx = self._check_classes(classes)
        return labelled_score_fn([self.subset(c) for c in idx] + [self], sde)

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


def labelled_score_fn(mixtures, sde: SDE):
    """``cond_score(x, t, y) -> tensor like x``: row ``b`` gets the exact score of ``mixtures[y_b]`` perturbed by ``sde``.

    Args:
        mixtures: a list of ``L`` ``GaussianMixture`` of one dimension ``D``; label ``l`` means ``mixtures[l]``.
        sde: the SDE whose perturbed marginals are scored.
    The returned function takes ``x`` ``(B, D)`` or ``(B, *dims)``, ``t`` ``(B,)`` and ``y`` ``(B,)`` integer labels in
    ``[0, L)``; it evaluates each label's rows with that mixture's ``score``.
    """
    if not isinstance(mixtures, (list, tuple)) or not mixtures or not all(isinstance(g, GaussianMixture) for g in mixtures):
        raise TypeError(f"mixtures must be a non-empty list of GaussianMixture; got {mixtures!r}")
    if len({g.D for g in mixtures}) != 1:
        raise ValueError(f"mixtures must all have one dimension D; got {[g.D for g in mixtures]}")

    def cond_score(x: torch.Tensor, t, y: torch.Tensor) -> torch.Tensor:
        if not torch.is_tensor(y) or y.shape != (x.shape[0],) or y.dtype.is_floating_point or y.dtype == torch.bool:
            raise ValueError(f"y must be an integer tensor of shape (B,) = ({x.shape[0]},); got {y!r}")
        if bool(((y < 0) | (y >= len(mixtures))).any()):
            raise ValueError(f"y must lie in [0, {len(mixtures) - 1}]; got {y.unique().tolist()}")
        t = as_time(t, x, sde.T)
        out = torch.empty_like(x)
        for label in y.unique().tolist():
            rows = y == label
            out[rows] = mixtures[label].score(x[rows], t[rows], sde)
        return out

    return cond_score


def cfg_gaussian_target(cond: GaussianMixture, uncond: GaussianMixture, w: float) -> GaussianMixture:
    """The exact target of classifier-free guidance for two isotropic Gaussians with the same std.

    For ``p_0(x | c) = N(mu_c, sigma^2 I)`` and ``p_0(x) = N(mu_u, sigma^2 I)`` and any SDE with affine drift
    (``x_t = m(t) x_0 + s(t) z``), both perturbed marginals have the variance ``v(t) = m^2 sigma^2 + s^2``, so::

        (1 + w) s_c - w s_u = -[(1 + w)(x - m mu_c) - w (x - m mu_u)] / v = -(x - m mu_w) / v,
        mu_w = (1 + w) mu_c - w mu_u,

    which is, at every ``t``, the score of the perturbed ``N(mu_w, sigma^2 I)``. The guided reverse SDE / ODE is
    therefore that of the data distribution ``N(mu_w, sigma^2 I)`` and every sampler must reach it.

    With different stds ``sigma_c != sigma_u`` the guided score is ``-[(1 + w)/v_c - w/v_u] x + ...``: its precision
    ``(1 + w)/v_c(t) - w/v_u(t)`` is not ``1/(m^2 sigma^2 + s^2)`` for one ``sigma`` at all ``t`` (and can be negative),
    so the guided family is not the family of perturbed marginals of any ``p_0``, and there is no closed-form target;
    this function refuses that case. (Neither is there for mixtures: guidance tilts each ``p_t`` differently.)

    Args:
        cond, uncond: one-component ``GaussianMixture`` of one dimension ``D`` and equal stds (relative 1e-12).
        w: the guidance weight, any finite number (``w = 0``: ``cond``; ``w = -1``: ``uncond``).
    Returns:
        ``GaussianMixture`` ``N(mu_w, sigma^2 I)`` (one component, ``cond``'s dtype).
    """
    for name, g in (("cond", cond), ("uncond", uncond)):
        if not isinstance(g, GaussianMixture) or g.K != 1:
            raise ValueError(f"{name} must be a one-component GaussianMixture (a Gaussian); got {g!r}")
    if cond.D != uncond.D:
        raise ValueError(f"cond and uncond must have the same dimension; got D = {cond.D} and {uncond.D}")
    sc, su = float(cond.stds[0]), float(uncond.stds[0])
    if abs(sc - su) > 1e-12 * max(sc, su):
        raise ValueError(f"cond and uncond must have the same std for a closed-form guided target (with different stds "
                         f"the guided scores are not the perturbed marginals of any distribution); got {sc!r} and {su!r}")
    w = check_number("w", w, lambda v: True, "a finite number")
    mu_w = (1 + w) * cond.means - w * uncond.means.to(cond.means.dtype)
    return GaussianMixture(mu_w, cond.stds)
