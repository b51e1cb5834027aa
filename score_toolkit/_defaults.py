"""Defaults shared by ``ScorePipeline`` and the ``score-toolkit sample`` command (one definition; this module
imports nothing, so the command line stays fast to start). Public as ``score_toolkit.pipeline.DEFAULT_SAMPLER``
and ``DEFAULT_STEPS``.

Chosen by measurement (docs/fast_samplers.md, "Defaults"; benchmarks/results/defaults_unipc.md): UniPC (order-3
predictor + corrector) on its data-free fitted grid with the final step to noise level zero is within 1.5x of the
exact noise floor (within-mode sliced W2 and mean NLL, N = 10,000) from 15 NFE on the 2-D ring under VE, VP and the
DDPM table and from 25 NFE on the 16-D mixture under VE and VP, with no relapse up to 30 (dpmpp_3m, the default
before: 25-30 on the ring). On the shipped digits model (900 samples, classifier Frechet distance,
benchmarks/results/defaults_digits.md) 15 NFE read 4.79 against the converged ODE's 4.55 from the same noise
(dpmpp_3m: 5.08). Judged again over 8 independent draws (benchmarks/results/defaults_unipc_seeds.md), with the
lower-order final steps switched on from 29 steps (``lower_order_final="auto"``), the 64-D mixture passes at 30 NFE;
docs/fast_samplers.md gives what the ring and the 16-D mixture read under that protocol.
"""

#: the default sampler
DEFAULT_SAMPLER = "unipc"
#: its number of steps when none is given (NFE = DEFAULT_STEPS + 1: the final step to noise level zero)
DEFAULT_STEPS = 24
