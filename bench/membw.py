"""A stream-like memory bandwidth measurement: what one-token decoding can move per second at best.

Decoding a 135M model one token at a time reads every weight once per token, so tokens/s x weight bytes
is the bandwidth a contender reaches; this gives the machine's ceiling to put beside it (BENCHMARKS.md:
each contender as a fraction of it). STREAM's Copy and Triad kernels on arrays far larger than the caches,
with torch on `--threads` threads (the decoders' 2); bytes counted as STREAM counts them (Copy: read +
write, Triad: two reads + a write), best of `--repeats`.

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mb", type=int, default=512, help="size of each array in MB (far above the last cache level)")
    ap.add_argument("--repeats", type=int, default=10)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    n = a.mb * (1 << 20) // 4
    x, y, z = torch.rand(n), torch.empty(n), torch.rand(n)
    copy = best_seconds(lambda: y.copy_(x), a.repeats)
    triad = best_seconds(lambda: torch.add(x, z, alpha=3.0, out=y), a.repeats)
    gb = n * 4 / 1e9
    print(json.dumps({"threads": a.threads, "array_mb": a.mb, "copy_GBps": round(2 * gb / copy, 2),
                      "triad_GBps": round(3 * gb / triad, 2)}))


if __name__ == "__main__":
    main()
