"""Running beside other work: OpenMP's idle threads wait passively on a busy machine.

PyTorch's CPU threads (GNU OpenMP) spin while they wait for each other at the end of every
parallel operation. On an idle machine that is fastest; beside other CPU jobs the spinning
thread takes the core the thread it waits for needs, and a run of many small operations
(generating context templates, scoring prompts, the target optimisation's steps) slows several
times, while on a quiet machine passive waiting is slower (measured: bench/RESULTS.md, "Under
load" and "core/threads.py: the wait policy"). So the command line looks at the machine
when it starts, before torch loads: if other work keeps half a core or more busy, and the user
has not chosen, it sets ``OMP_WAIT_POLICY=PASSIVE``. The choice is recorded in every result's
``versions``.
"""

from __future__ import annotations

import os
import sys
import time


def busy_cores(seconds: float = 0.1) -> float:
    """Cores kept busy by other processes now (from /proc/stat over ``seconds``); 0.0 where unknown."""

    def read() -> tuple[int, int]:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
        return sum(v) - v[3] - v[4], sum(v)  # busy, total (idle and iowait are not busy)

    try:
        b0, t0 = read()
        time.sleep(seconds)
        b1, t1 = read()
    except (OSError, ValueError, IndexError):
        return 0.0
    return (b1 - b0) / max(t1 - t0, 1) * (os.cpu_count() or 1)


def choose_wait_policy(threshold: float = 0.5, torch_loaded: bool | None = None) -> str | None:
    """Set OMP_WAIT_POLICY=PASSIVE on a busy machine, if torch is not loaded yet (``torch_loaded``:
    default, whether it is imported) and the user has not set it; returns the policy in force."""
    if torch_loaded is None:
        torch_loaded = "torch" in sys.modules
    if "OMP_WAIT_POLICY" not in os.environ and not torch_loaded and busy_cores() >= threshold:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return os.environ.get("OMP_WAIT_POLICY")
