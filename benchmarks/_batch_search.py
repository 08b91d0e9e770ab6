"""The largest batch that trains on a GPU: grow by doubling, then bisect; every try in a fresh process.

A fresh process per try means an out-of-memory error never leaves a fragmented allocator behind
for the next try. The search stops once the gap is within 1/16 of the batch (about 6%), which keeps
the number of tries (each one a model build and two steps) small.
"""

from __future__ import annotations

from _launch import WorkerFailed, launch
from _worker import OOM_EXIT


def _fits(job: dict, batch: int, timeout: float | None) -> bool:
    status, result, stderr = launch({**job, "mode": "fits", "batch": batch}, timeout=timeout)
    if status == OOM_EXIT:
        return False
    if result is None:
        raise WorkerFailed(f"batch {batch} failed for another reason than memory (exit {status}):\n{stderr}")
    return True


def largest_batch(job: dict, start: int, *, limit: int = 8192, timeout: float | None = 600) -> int:
    """Largest batch (within ~6%) for which two training steps of ``job`` fit; 0 if even 1 does not."""
    fits_at, fails_at = 0, None
    batch = max(1, start)
    while batch <= limit:
        if _fits(job, batch, timeout):
            fits_at, batch = batch, batch * 2
        else:
            fails_at = batch
            break
    if fails_at is None:
        return fits_at
    while fails_at - fits_at > max(1, fits_at // 16):
        mid = (fits_at + fails_at) // 2
        if _fits(job, mid, timeout):
            fits_at = mid
        else:
            fails_at = mid
    return fits_at
