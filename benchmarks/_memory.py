"""Memory probes for one benchmark process: host RSS on CPU, the caching allocator on CUDA.

On CPU there is no allocator to ask, so we read the kernel's view of this process: VmRSS now and
VmHWM (the high-water mark), which writing "5" to /proc/self/clear_refs resets to the current RSS.
RSS only follows what PyTorch frees if glibc hands large blocks back to the kernel, which it does
when they are mmap()ed; the parent therefore starts each worker with MALLOC_MMAP_THRESHOLD_=65536
(`cpu_worker_env`), since glibc reads it once, at start-up.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

MMAP_THRESHOLD = "65536"
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def cpu_worker_env() -> dict[str, str]:
    """The environment for a CPU worker: ours plus glibc's mmap threshold."""
    return {**os.environ, "MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD}


def _status_kib(field: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} missing from {_STATUS}")


class CpuProbe:
    """RSS now, and the RSS high-water mark since the last `reset_peak`, in bytes."""

    kind = "rss"

    def __init__(self) -> None:
        if not _STATUS.exists():
            raise RuntimeError("CPU memory is measured through /proc/self/status (Linux only)")

    def check_env(self) -> None:
        """RSS numbers mean something only with the mmap threshold set at process start."""
        if os.environ.get("MALLOC_MMAP_THRESHOLD_") != MMAP_THRESHOLD:
            raise RuntimeError(
                "run CPU memory measurements with MALLOC_MMAP_THRESHOLD_=65536 in the environment "
                "(compare.py sets it for its workers): without it freed memory stays in RSS"
            )

    def current(self) -> int:
        return _status_kib("VmRSS") * 1024

    def reset_peak(self) -> None:
        _CLEAR_REFS.write_text("5")

    def peak(self) -> int:
        return _status_kib("VmHWM") * 1024

    def sync(self) -> None:
        pass


class CudaProbe:
    """Bytes held by PyTorch's CUDA caching allocator (allocated, not reserved)."""

    kind = "cuda_allocated"

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def current(self) -> int:
        return torch.cuda.memory_allocated(self.device)

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int:
        return torch.cuda.max_memory_allocated(self.device)

    def sync(self) -> None:
        torch.cuda.synchronize(self.device)

    def check_env(self) -> None:
        pass


def probe_for(device: torch.device) -> CpuProbe | CudaProbe:
    return CudaProbe(device) if device.type == "cuda" else CpuProbe()
