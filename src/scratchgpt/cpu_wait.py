"""How torch's idle CPU threads wait, chosen from the machine's load before torch loads.

Between the thousands of small parallel regions of a training step, an idle OpenMP thread spins
for a while before it sleeps. On a quiet machine the spin saves a wake-up per region. On a busy
one the spinning thread holds a core that the thread it waits for needs, so every region waits
for a time slice: with one CPU-bound process beside it on 2 cores, 60 steps of the fast recipe
took 69.5 s instead of 3.0 s under libgomp's default spin (300,000), 9.9 s at 10,000 and 6.9 s
at 1,000 (BENCHMARKS.md, "Busy machines"). So the spin follows the load seen at start: short on
a quiet machine (as fast as the default there, and a load that arrives mid-run costs ~3x, not
~20x), shorter still on a busy one.

The spin never changes a number the model computes, so it may depend on the load. The thread
count, which does change the order of sums, is settled once per machine (numerics.py). libgomp
reads GOMP_SPINCOUNT once, when torch loads it, so choose() runs before the first `import torch`;
a value the user set (GOMP_SPINCOUNT or OMP_WAIT_POLICY) is kept.
"""

from __future__ import annotations

import os
import sys
import time
from typing import MutableMapping, Optional

QUIET_SPIN = 10_000
BUSY_SPIN = 1_000
BUSY_CORES = 0.5  # other processes using half a core or more during the sample: busy
SAMPLE_S = 0.03

_choice = ""  # what choose() did, for the start-up line


def other_cores_in_use(sample_s: float = SAMPLE_S, samples: int = 10) -> Optional[float]:
    """Other processes' runnable threads, averaged over `sample_s` seconds; None off Linux.

    /proc/stat's procs_running counts the threads running or waiting for a CPU at the moment it is read,
    this one included (the only thread of this process that runs before torch loads), so a sleep of a
    few milliseconds between reads is enough: no need to wait for CPU-time counters to move."""
    def running() -> int:
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith("procs_running"):
                    return int(line.split()[1])
        raise ValueError("no procs_running in /proc/stat")

    try:
        counts = []
        for _ in range(samples):
            counts.append(running())
            time.sleep(sample_s / samples)
    except (OSError, ValueError, IndexError):
        return None
    return max(0.0, sum(counts) / len(counts) - 1)


def choose(environ: MutableMapping[str, str] = os.environ, sample_s: float = SAMPLE_S) -> str:
    """Set GOMP_SPINCOUNT from the load now, unless torch is loaded already or the user chose; say what was done."""
    global _choice
    if "torch" in sys.modules:
        _choice = ""  # too late to matter: libgomp has read its settings
    elif "GOMP_SPINCOUNT" in environ or "OMP_WAIT_POLICY" in environ:
        _choice = "idle threads wait as the environment says"
    else:
        load = other_cores_in_use(sample_s)
        busy = load is not None and load >= BUSY_CORES
        environ["GOMP_SPINCOUNT"] = str(BUSY_SPIN if busy else QUIET_SPIN)
        seen = "load unknown" if load is None else f"{load:.1f} other cores busy at start"
        _choice = f"idle threads spin {environ['GOMP_SPINCOUNT']} ({seen})"
    return _choice


def described() -> str:
    """The last choice, for the start-up line ('' when none was made in this process)."""
    return _choice
