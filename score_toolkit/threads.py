"""The CPU thread policy of every command and of the Python entry points that train or sample.

torch starts with one thread per core. For the networks of this project (MLPs on 2-D points, small UNets
on 8x8 images) more threads only add synchronisation, and on a machine whose cores are busy with other
work each extra thread waits for a core at every operation: ``benchmarks/results/threads.md`` measured
the README's first example and ``score-toolkit demo`` many times slower with 2 threads than with 1
on 2 busy cores. Hence one rule, applied by every ``score-toolkit`` command and by
:meth:`Sampler.sample <score_toolkit.samplers.base.Sampler.sample>`, ``ScorePipeline.__call__``,
:func:`score_toolkit.training.train`, :func:`score_toolkit.likelihood.log_likelihood` and
:func:`score_toolkit.demo.run_demo` while they run on the CPU:

* torch uses ``SCORE_TOOLKIT_NUM_THREADS`` threads if that environment variable is set, else 1;
* ``0`` leaves torch's own setting alone (use it for large networks on a machine of your own);
* the commands' ``--threads N`` overrides the environment variable;
* the previous setting is restored on return, and inside an outer policy block (a command that trains
  and then samples) the outer setting stands.

Use processes for parallelism (``accelerate launch``, see docs/pipeline.md), not threads.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from typing import Any

__all__ = ["ENV_VAR", "DEFAULT_THREADS", "policy_threads", "cpu_threads"]

ENV_VAR = "SCORE_TOOLKIT_NUM_THREADS"
DEFAULT_THREADS = 1

_state = threading.local()


def policy_threads(requested: int | None = None) -> int:
    """The thread count of the policy: ``requested`` if given, else ``$SCORE_TOOLKIT_NUM_THREADS``, else 1.
    ``0`` means torch's own setting. A bad value is a ``ValueError`` naming where it came from."""
    if requested is None:
        raw = os.environ.get(ENV_VAR, "").strip()
        if not raw:
            return DEFAULT_THREADS
        try:
            requested = int(raw)
        except ValueError:
            raise ValueError(f"expected {ENV_VAR} to be an integer >= 0, found {raw!r}") from None
        where = ENV_VAR
    else:
        where = "threads"
    if isinstance(requested, bool) or not isinstance(requested, int) or requested < 0:
        raise ValueError(f"expected {where} to be an integer >= 0, found {requested!r}")
    return requested


@contextlib.contextmanager
def cpu_threads(requested: int | None = None, *, device: Any = None) -> Iterator[int]:
    """Run the block under the thread policy (see the module docstring) and restore torch's setting after.

    Does nothing (yields torch's current count) when ``device`` is not a CPU device, when the policy is 0, or
    inside an outer ``cpu_threads`` block of the same thread: the outermost block decides. Also a decorator:
    ``@cpu_threads()`` applies the policy to every call of a function."""
    import torch  # here, not at module level: ``score-toolkit --help`` stays free of torch

    outer = getattr(_state, "depth", 0)
    on_cpu = device is None or torch.device(device).type == "cpu"
    n = policy_threads(requested) if (on_cpu and outer == 0) else 0
    before = torch.get_num_threads()
    if n and n != before:
        torch.set_num_threads(n)
    _state.depth = outer + 1
    try:
        yield torch.get_num_threads()
    finally:
        _state.depth = outer
        if n and n != before:
            torch.set_num_threads(before)
