"""Results of :func:`~score_toolkit.likelihood.log_likelihood` on several processes: every process learns whether
any failed (one small collective, so none waits forever), then the per-sample results are gathered in the
input's order.
"""

from __future__ import annotations

import math

import torch


def _exchange(accelerator, outputs, error, chunks, mine, n, x, rank, world, return_latent):
    """Tell every process whether any failed (one small collective), then gather the per-sample results."""
    from accelerate.utils import gather, gather_object

    failed = torch.tensor([1 if error is not None else 0], device=accelerator.device)
    flags = gather(failed).cpu()
    if bool(flags.any()):
        messages = gather_object([f"process {rank}: {type(error).__name__}: {error}" if error is not None else None])
        text = "; ".join(m for m in messages if m)
        if error is not None:
            if _rebuildable(error):
                raise type(error)(f"{error} [log_likelihood on {world} processes: {text}]") from error
            raise error
        raise RuntimeError(f"log_likelihood: another process failed, so this one stops too: {text}")
    # every process knows how many samples each holds, so all can pad to the same length without asking
    counts = [sum(hi - lo for lo, hi in chunks[r::world]) for r in range(world)]
    m = max(counts)
    d = math.prod(x.shape[1:])
    cols = 6 + (d if return_latent else 0)  # index, log_prob, std_err, prior, delta, nfe[, latent]
    local = torch.full((m, cols), -1.0, dtype=torch.float64, device=accelerator.device)
    row = 0
    for lo, hi, out in outputs:
        k = hi - lo
        local[row : row + k, 0] = torch.arange(lo, hi, dtype=torch.float64)
        for j, key in enumerate(("log_prob", "std_err", "prior", "delta"), start=1):
            local[row : row + k, j] = out[key].to(torch.float64)
        local[row : row + k, 5] = float(out["nfe"])
        if return_latent:
            local[row : row + k, 6:] = out["latent"].reshape(k, -1).to(torch.float64)
        row += k
    table = gather(local).cpu()
    table = table[table[:, 0] >= 0]
    order = torch.argsort(table[:, 0])
    table = table[order]
    if table.shape[0] != n or not torch.equal(table[:, 0].long(), torch.arange(n)):
        raise RuntimeError(f"log_likelihood: gathered {table.shape[0]} results for {n} samples")
    merged = []
    for lo, hi in chunks:
        part = table[lo:hi]
        out = {key: part[:, j].to(x.dtype).to(x.device) for j, key in
               enumerate(("log_prob", "std_err", "prior", "delta"), start=1)}
        out["nfe"] = int(part[0, 5])
        out["latent"] = part[:, 6:].to(x.dtype).to(x.device).reshape(hi - lo, *x.shape[1:]) if return_latent else None
        merged.append((lo, hi, out))
    return merged


def _rebuildable(error: BaseException) -> bool:
    try:
        type(error)("probe")
        return True
    except Exception:  # noqa: BLE001
        return False
