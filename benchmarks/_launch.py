"""Start `_worker.py` in a fresh interpreter and read back its one RESULT line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from _memory import cpu_worker_env

WORKER = Path(__file__).with_name("_worker.py")


class WorkerFailed(RuntimeError):
    pass


def launch(job: dict, *, timeout: float | None = None) -> tuple[int, dict | None, str]:
    """(exit status, result or None, end of stderr). CPU memory jobs get glibc's mmap threshold;
    other jobs run without it even if the caller's environment has it (it would make every
    temporary a fresh page-faulting mmap and slow the timed steps)."""
    if job.get("mode") == "memory" and job.get("device", "cpu") == "cpu":
        env = cpu_worker_env()
    else:
        env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    proc = subprocess.run([sys.executable, str(WORKER), json.dumps(job)], env=env, cwd=WORKER.parent,
                          capture_output=True, text=True, timeout=timeout)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return proc.returncode, json.loads(line[len("RESULT "):]), ""
    return proc.returncode, None, proc.stderr[-2000:]


def run_job(job: dict, *, timeout: float | None = None) -> dict:
    """The worker's result; WorkerFailed with the end of its stderr when there is none."""
    status, result, stderr = launch(job, timeout=timeout)
    if result is None:
        raise WorkerFailed(f"worker failed (exit {status}) on {job}:\n{stderr}")
    return result
