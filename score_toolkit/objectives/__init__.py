"""Score-matching objectives, all with one call shape.

Every objective is a small class built with its options (an unknown option is a ``TypeError``, a bad
value a ``ValueError``) and called as::

    loss = objective(score_fn, x, generator=None)

``score_fn(x, t)`` is the canonical score function (a :class:`~score_toolkit.scores.ScoreAdapter`
around a network, or any callable; ``t`` is a float tensor (B,)), ``x`` a data batch (B, ...) of any
rank. The result is the batch mean of the per-sample losses (``reduction="mean"``) or the per-sample
losses (B,) (``reduction="none"``). Per-sample losses are sums over all features (not means), as in
the formulas. Randomness enters only through ``generator`` (one ``torch.Generator`` or a list with one
per sample, in which case sample ``i``'s noise comes from ``generator[i]`` only).

Formulas (FORMULAS.md, "Objectives"; s = s_theta, d = number of features):

=================  ==========================================================================
``ESM``            1/2 E ||s(x) - grad log p(x)||^2                        (Hyvarinen 2005, eq. 2)
``ISM``            E [1/2 ||s(x)||^2 + tr(grad_x s(x))]                    (Hyvarinen 2005, Theorem 1)
``SSM``            E_v E_x [v^T (grad_x s) v + 1/2 (v^T s)^2]              (Song et al. 2019, eq. 7)
``SSM`` (VR)       E_v E_x [v^T (grad_x s) v + 1/2 ||s||^2]                (Song et al. 2019, eq. 8)
``DSM``            1/2 E ||s(x + sigma z) + z / sigma||^2                  (Vincent 2011, eq. 11)
``NCSN``           1/L sum_i sigma_i^2 DSM(sigma_i)                        (Song & Ermon 2019, eqs. 5-6)
``ContinuousDSM``  E_t lambda(t) 1/2 ||s(x_t, t) + z / sigma(t)||^2        (Song et al. 2021, eq. 7)
``EpsilonLoss``    E_t ||eps_theta(x_t, t) - z||^2                         (Ho et al. 2020, eq. 14)
=================  ==========================================================================

The 1/2 factors follow FORMULAS.md. ``ContinuousDSM`` keeps the 1/2 of ``DSM`` (FORMULAS.md writes the
continuous loss without it): with ``weighting="uniform"`` (lambda = sigma^2) it is half the epsilon
loss, and with ``weighting="likelihood"`` (lambda = g^2) ``(1 - t_min)`` times it is the score-matching
term of the likelihood bound of Song et al. 2021b (Theorem 1), up to a constant in theta.

The package's modules: :mod:`.base` (the :class:`Objective` base class and shared helpers),
:mod:`.noise_free` (ESM, ISM, SSM) and :mod:`.denoising` (DSM, NCSN, ContinuousDSM, EpsilonLoss); every name
is importable from ``score_toolkit.objectives``, and :func:`get_objective` builds one by name.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable

from .base import REDUCTIONS, Objective
from .denoising import DSM, NCSN, WEIGHTINGS, ContinuousDSM, EpsilonLoss
from .noise_free import ESM, ISM, PROJECTIONS, SSM

__all__ = [
    "Objective",
    "ESM",
    "ISM",
    "SSM",
    "DSM",
    "NCSN",
    "ContinuousDSM",
    "EpsilonLoss",
    "OBJECTIVES",
    "get_objective",
    "REDUCTIONS",
    "PROJECTIONS",
    "WEIGHTINGS",
]


def _ssm_vr(**options) -> SSM:
    if "variance_reduction" in options:
        raise TypeError("'ssm_vr' fixes variance_reduction=True; use 'ssm' to choose it")
    return SSM(variance_reduction=True, **options)


_FACTORIES: dict[str, Callable[..., Objective]] = {
    "esm": ESM,
    "ism": ISM,
    "ssm": SSM,
    "ssm_vr": _ssm_vr,
    "dsm": DSM,
    "ncsn": NCSN,
    "continuous_dsm": ContinuousDSM,
    "epsilon": EpsilonLoss,
}

#: The names :func:`get_objective` knows.
OBJECTIVES: tuple[str, ...] = tuple(_FACTORIES)


def get_objective(name: str, **options) -> Objective:
    """Build the objective called ``name`` (one of :data:`OBJECTIVES`) with its ``options``, e.g.
    ``get_objective("continuous_dsm", process=VPSDE(), weighting="likelihood")``."""
    if not isinstance(name, str):
        raise TypeError(f"expected the objective name to be a str, found {type(name).__name__}")
    if name not in _FACTORIES:
        close = difflib.get_close_matches(name.lower().replace("-", "_"), OBJECTIVES, n=1, cutoff=0.5)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown objective {name!r}.{hint} Available: {', '.join(OBJECTIVES)}")
    return _FACTORIES[name](**options)
