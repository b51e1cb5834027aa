"""torchdiffeq's failures (it reports them with ``assert``), and those of the likelihood's own stepper (worded the
same way), as the clear errors of the samplers and likelihoods that call them."""

from __future__ import annotations

from .base import NonFiniteError


def raise_odeint_failure(err: Exception, *, who: str, t: float, steps: int, too_many: str,
                         error: type[Exception] = RuntimeError):
    """Turn one of torchdiffeq's assertion failures (it checks with ``assert``) into a clear error: ``too_many`` for
    the step limit, ``error`` for a step-size underflow, :class:`NonFiniteError` for a NaN/inf state; any other
    assertion is re-raised as it is. ``who`` names the caller in the message, ``t`` and ``steps`` say where."""
    msg = str(err)
    if msg.startswith("max_num_steps exceeded"):
        raise error(too_many) from err
    if msg.startswith("underflow in dt"):
        raise error(f"{who}: the adaptive step size underflowed at t = {t:.6g} after {steps} steps; the ODE is too "
                    f"stiff for rtol/atol, or the score is not smooth") from err
    if msg.startswith("non-finite values in state"):
        raise NonFiniteError(f"{who}: the state became NaN or infinite at step {steps} (t = {t:.6g})") from err
    raise err
