"""Final-level MCMC correction of a conditional sampler (docs/conditioning.md, "Sampling the tempered target").

A conditional score transform defines, at every noise level t, a density ``q_t`` whose score it is (classifier
guidance of scale w: ``q_t ~ p_t(x) p_t(c | x)^w``). Following that score with a sampler does not have to end at
``q_{t_min}`` when the family ``q_t`` is not the diffusion of one law (guidance at w != 1, DPS, PiGDM, replacement):
the sampler then carries a bias that more steps do not remove. A Markov chain that leaves ``q_{t_min}`` invariant, run
at the last level from the sampler's output, removes that bias up to the chain's mixing (cf. Du et al. 2023, "Reduce,
Reuse, Recycle", MCMC correctors for guided and composed diffusion models):

* :func:`sample_with_final_correction`: any registered sampler (ending at ``t_min``), then ``corrector_steps`` Langevin
  steps at ``t_min`` (MALA with ``metropolis=True``, exact at stationarity; it needs the score function's ``energy``;
  ULA otherwise, biased at the order of its step size).
* :class:`ObservationLikelihood`: the score of ``p_t(x) N(y; A x / alpha, sigma_y^2 I + (sigma / alpha)^2 A A^T)``,
  the prior's score plus the likelihood of an observation ``y = A x_0 + sigma_y n`` under the flat-prior
  approximation ``x_0 | x_t ~ N(x_t / alpha, (sigma / alpha)^2 I)``; its error vanishes as t -> 0, so at ``t_min`` it is
  the posterior's score up to ``O(sigma(t_min)^2)``; the corrector target for inverse problems.

The chain cannot move mass between well separated modes (nor can any local MCMC in a practical number of steps): it
corrects the shape of every mode, while mode weights are corrected only where the target's modes overlap at ``t_min``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..processes import Process
from ..samplers.base import Sampler, SamplerOutput
from ..samplers.langevin import LangevinSampler, energy_or_none
from .inverse import InverseProblemScore, Twist

__all__ = ["ObservationLikelihood", "energy_or_none", "sample_with_final_correction"]


class ObservationLikelihood(InverseProblemScore):
    """``s(x, t) + grad_x log N(y; A x / alpha, sigma_y^2 I + (sigma / alpha)^2 A A^T)``: the prior's score plus the
    likelihood of ``y = A x_0 + sigma_y n`` with ``x_0 | x_t`` taken as ``N(x_t / alpha, (sigma / alpha)^2 I)``.

    Exact in the limit t -> 0 (``alpha -> 1``, ``sigma -> 0``: the posterior's score is the prior's plus
    ``A^T (y - A x) / sigma_y^2``); at larger t it ignores the prior in the likelihood, so it is meant as the target of a
    final-level corrector (:func:`sample_with_final_correction`), not for the whole path. With a prior score that has
    an ``energy``, so has this one (``energy(x, t) = E_prior + r^T G^{-1} r / 2``, ``r = y - A x / alpha``, up to a
    constant in x), so MALA can use it. Needs ``noise_std > 0`` or ``A A^T`` invertible. Cost: one score evaluation,
    no gradient.
    """

    method = "likelihood"

    def __init__(self, score_fn, process, operator, observation, noise_std: float = 0.0):
        super().__init__(score_fn, process, operator, observation, noise_std)
        self._prior_energy = energy_or_none(score_fn)
        if self._prior_energy is not None:
            self.energy = self._energy

    def _twist(self, x, t, y):
        r, solved, a, shape = self._flat_parts(x, t, y)
        s = self.score_fn(x, t)
        return Twist(s, s + self.operator.adjoint(solved, shape) / a, -0.5 * (r * solved).reshape(x.shape[0], -1).sum(1))

    def _energy(self, x: torch.Tensor, t) -> torch.Tensor:
        t, y = self._checked(x, t)
        r, solved, _, _ = self._flat_parts(x, t, y)
        return self._prior_energy(x, t) + 0.5 * (r * solved).reshape(x.shape[0], -1).sum(1)


def sample_with_final_correction(
    sampler: Sampler,
    score_fn: Callable,
    process: Process,
    x_init: torch.Tensor | None = None,
    *,
    shape=None,
    corrector_steps: int,
    step_size: float,
    metropolis: bool = True,
    corrector_score_fn: Callable | None = None,
    generator=None,
    device=None,
    dtype=None,
) -> SamplerOutput:
    """``sampler`` with ``score_fn`` from the prior to ``t_min``, then ``corrector_steps`` Langevin steps at ``t_min``
    targeting the density whose score is ``corrector_score_fn`` (default ``score_fn``).

    Args:
        sampler: any sampler whose final time is ``process.t_min`` (not with ``denoise`` or ``to_zero``: the chain
            works at ``t_min``).
        corrector_steps: Langevin steps at ``t_min`` (0: the sampler alone).
        step_size: ``eps`` of :class:`~score_toolkit.samplers.langevin.LangevinSampler`
            (``x + (eps / 2) s + sqrt(eps) z``); keep it below the target's smallest variance at ``t_min``.
        metropolis: MALA (exact at stationarity; needs ``corrector_score_fn.energy``) or ULA (``False``).
        corrector_score_fn: the chain's target score, e.g. :class:`ObservationLikelihood` for an inverse problem
            sampled with an approximate transform (DPS, PiGDM, replacement).
        shape, generator, device, dtype: passed to ``sampler.sample`` (the chain runs where its samples are).

    Returns a :class:`~score_toolkit.samplers.base.SamplerOutput` whose ``nfe`` counts both stages (MALA: a score and
    an energy evaluation per step, plus both at the start) and whose ``info`` holds ``sampler_nfe``,
    ``corrector_nfe`` and ``acceptance`` (the fraction of proposals accepted; 1 for ULA).
    """
    if not isinstance(sampler, Sampler):
        raise TypeError(f"expected a score_toolkit Sampler, found {type(sampler).__name__}")
    for key in ("denoise", "to_zero"):
        if sampler.config.get(key):
            raise ValueError(f"sample_with_final_correction: sampler {sampler.name!r} with {key}=True ends below t_min; "
                             f"the corrector works at t_min (pass {key}=False)")
    t_end = sampler._final_time(process)
    if abs(t_end - process.t_min) > 1e-12:
        raise ValueError(f"sample_with_final_correction: sampler {sampler.name!r} ends at t = {t_end:g}, expected "
                         f"process.t_min = {process.t_min:g}")
    if isinstance(corrector_steps, bool) or not isinstance(corrector_steps, int) or corrector_steps < 0:
        raise ValueError(f"expected corrector_steps to be an int >= 0, found {corrector_steps!r}")
    first = sampler.sample(score_fn, process, x_init, shape=shape, generator=generator, device=device, dtype=dtype)
    if corrector_steps == 0:
        return SamplerOutput(first.samples, first.nfe, info={"sampler_nfe": first.nfe, "corrector_nfe": 0,
                                                             "acceptance": float("nan")})
    target = score_fn if corrector_score_fn is None else corrector_score_fn
    chain = LangevinSampler(step_size=float(step_size), num_steps=corrector_steps, metropolis=bool(metropolis))
    moved, prev = [], [first.samples]

    def count(info):
        x = info["x"]
        moved.append((x != prev[0]).flatten(1).any(1).double().mean().item())
        prev[0] = x

    second = chain.sample(target, process, first.samples, generator=generator, callback=count)
    acceptance = sum(moved) / len(moved) if metropolis else 1.0
    return SamplerOutput(second.samples, first.nfe + second.nfe,
                         info={"sampler_nfe": first.nfe, "corrector_nfe": second.nfe, "acceptance": acceptance})
