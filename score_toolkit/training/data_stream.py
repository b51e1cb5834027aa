"""The data order and the noise seeds of a run: functions of ``(seed, step)`` only, so that a resumed run
reproduces the uninterrupted one and the global batch of a step does not depend on the number of processes.
The data order itself lives with the data (:class:`score_toolkit.data.SampleOrder`,
:func:`score_toolkit.data.training_batches`); the loop mixes its noise seeds with the same :func:`_mix`.
"""

from __future__ import annotations

from ..data import SampleOrder as _DataStream  # noqa: F401  (the former name of the data order)
from ..data.order import _mix  # noqa: F401
