"""A stream-like memory bandwidth measurement: what one-token decoding can move per second at best.

Decoding a 135M model one token at a time reads every weight once per token, so tokens/s x weight bytes
is the bandwidth a contender reaches; this gives the machine's ceiling to put beside it (BENCHMARKS.md:
each contender as a fraction of it). STREAM's Copy and Triad kernels on arrays far larger than the caches,
with torch on `--threads` threads (the decoders' 2); bytes counted as STREAM counts them (Copy: read +
write, Triad: two reads + a write), best of `--repeats`. Beside them Read (a sum over one array: reads only,
as decoding's weight traffic is). `measure()` is what bench/generate.py's SmolLM2 mode imports.

    python bench/membw.py --threads 2 --mb 512
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def best_seconds(fn, repeats: int) -> float:
    fn()  # (first touch: page faults out of the timing)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def measure(threads: int = 2, mb: int = 512, repeats: int = 10) -> dict:
    """Copy, Triad and Read bandwidth in GB/s (1e9 bytes) on `threads` torch threads (the thread count is restored)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        n = mb * (1 << 20) // 4
        x, y, z = torch.rand(n), torch.empty(n), torch.rand(n)
        copy = best_seconds(lambda: y.copy_(x), repeats)
        triad = best_seconds(lambda: torch.add(x, z, alpha=3.0, out=y), repeats)
        read = best_seconds(lambda: x.sum(), repeats)
    finally:
        torch.set_num_threads(saved)
    gb = n * 4 / 1e9
    return {"threads": threads, "array_mb": mb, "copy_GBps": round(2 * gb / copy, 2),
            "triad_GBps": round(3 * gb / triad, 2), "read_GBps": round(gb / read, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mb", type=int, default=512, help="size of each array in MB (far above the last cache level)")
    ap.add_argument("--repeats", type=int, default=10)
    a = ap.parse_args()
    print(json.dumps(measure(a.threads, a.mb, a.repeats)))


if __name__ == "__main__":
    main()
