"""Defaults shared by ``ScorePipeline`` and the ``score-toolkit sample`` command (one definition; this module
imports nothing, so the command line stays fast to start). Public as ``score_toolkit.pipeline.DEFAULT_SAMPLER``
and ``DEFAULT_STEPS``.

Measured on the shipped digits model (900 samples, classifier Frechet distance, floor 3.44): dpmpp_2m with 25
steps 3.38, as good as the converged ODE (pf_ode dopri5 at 1e-4, 110 NFE: 3.24) and better than ancestral at 100
or 200 steps (7.2, 4.9); about 0.5 s per 64 samples (docs/pipeline.md). Those numbers were measured with
dpmpp_2m's earlier defaults (uniform log-SNR grid, no final step); its defaults are now the data-free fitted grid
and ``to_zero=True`` (26 NFE at 25 steps; docs/fast_samplers.md), not yet re-measured on the digits model.
"""

#: the default sampler
DEFAULT_SAMPLER = "dpmpp_3m"
#: its number of steps when none is given (NFE = DEFAULT_STEPS + 1: the final step to noise level zero)
DEFAULT_STEPS = 24
