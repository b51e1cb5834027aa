"""Defaults shared by ``ScorePipeline`` and the ``score-toolkit sample`` command (one definition; this module
imports nothing, so the command line stays fast to start). Public as ``score_toolkit.pipeline.DEFAULT_SAMPLER``
and ``DEFAULT_STEPS``.

Chosen by measurement (docs/fast_samplers.md, "Defaults"; benchmarks/results/defaults.md): dpmpp_3m on its data-free
fitted grid with the final step to noise level zero is within 1.5x of the exact noise floor (within-mode sliced W2
and mean NLL, N = 10,000) from 25 NFE on the 16-D mixture under VE and VP and on the 2-D ring under VE (30 under
VP), where dpmpp_2m's defaults stay 12-16x off in NLL on the 16-D mixture. On the shipped digits model (900 samples,
classifier Frechet distance, benchmarks/results/defaults_digits.md) 25 NFE read 4.65 against the converged ODE's
4.55 from the same noise (15 NFE: 5.08).
"""

#: the default sampler
DEFAULT_SAMPLER = "dpmpp_3m"
#: its number of steps when none is given (NFE = DEFAULT_STEPS + 1: the final step to noise level zero)
DEFAULT_STEPS = 24
