"""Benchmark `scratchgpt prepare`: BPE training plus encoding of a >= 200 MB corpus.

    python bench/prepare.py                       # builds a 200 MB corpus in a temp dir
    python bench/prepare.py --corpus DIR_OR_FILE  # or measure your own text
    python bench/prepare.py --mb 400 --source /path/to/tinyshakespeare.txt

The generated corpus is made of 1 MB documents, each a seeded shuffle of the source's
lines (CPython's bundled pydoc topics unless --source is given), so no network is needed
and the text is not one block repeated verbatim. `scratchgpt prepare` runs as a
subprocess; reported: wall time, MB/s of input, the peak RSS of the largest single
process (getrusage) and the peak summed RSS of the whole process tree (sampled from
/proc every 0.1 s, so prepare's worker processes are counted together).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def source_lines(source: str | None) -> list[str]:
    if source:
        text = Path(source).read_text(encoding="utf-8")
    else:
        from pydoc_data.topics import topics

        text = "\n".join(topics[k] for k in sorted(topics))
    return [ln for ln in text.split("\n")]


def build_corpus(directory: Path, mb: int, source: str | None, seed: int = 0) -> int:
    lines = source_lines(source)
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    total = 0
    i = 0
    while total < mb * 1_000_000:
        rng.shuffle(lines)
        doc, size = [], 0
        for ln in lines:
            doc.append(ln)
            size += len(ln) + 1
            if size >= 1_000_000:
                break
        data = ("\n".join(doc) + "\n").encode("utf-8")
        (directory / f"doc{i:05d}.txt").write_bytes(data)
        total += len(data)
        i += 1
    return total


def _tree_rss(root: int) -> int:
    """Summed RSS (bytes) of `root` and all its descendants, from /proc."""
    parent: dict[int, int] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        pid = int(entry)
        parent[pid] = int(fields.get("PPid", "0").strip())
        rss[pid] = int(fields.get("VmRSS", "0 kB").split()[0]) * 1024
    total = 0
    for pid in rss:
        p = pid
        while p and p != root:
            p = parent.get(p, 0)
        if p == root:
            total += rss[pid]
    return total


def run(corpus: Path, out: Path, vocab_size: int, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "scratchgpt", "prepare", str(corpus), "--out", str(out),
           "--tokenizer", "bpe", "--vocab-size", str(vocab_size), "--force", *extra]
    print("$", " ".join(cmd), file=sys.stderr)
    load_start = [round(x, 2) for x in os.getloadavg()]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _tree_rss(proc.pid))
            done.wait(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    rc = proc.wait()
    wall = time.perf_counter() - t0
    done.set()
    sampler.join()
    if rc != 0:
        raise SystemExit(f"prepare failed with exit code {rc}")
    meta = json.loads((out / "meta.json").read_text())
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    max_single = usage.ru_maxrss * 1024  # KiB on Linux
    cpu = usage.ru_utime + usage.ru_stime  # prepare and its (joined) workers
    mb = meta["bytes_in"] / 1e6
    return {
        "command": " ".join(cmd),
        "input_mb": round(mb, 1),
        "wall_s": round(wall, 1),
        "mb_per_s": round(mb / wall, 2),
        # CPU seconds spent, all processes: on an otherwise idle machine the wall time is
        # about cpu_s / cores when the parallel passes dominate.
        "cpu_s": round(cpu, 1),
        "mb_per_cpu_s": round(mb / cpu, 2),
        "peak_rss_single_process_mib": round(max_single / 2**20),
        "peak_rss_process_tree_mib": round(peak / 2**20),
        "train_tokens": meta["train_tokens"],
        "val_tokens": meta["val_tokens"],
        "vocab_size": meta["vocab_size"],
        "bpe_training": meta.get("bpe_training"),
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "load_average_at_start": load_start,
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", help="existing text file or directory to prepare (default: build one)")
    ap.add_argument("--mb", type=int, default=200, help="size of the generated corpus")
    ap.add_argument("--source", help="text whose lines make up the generated corpus (default: pydoc topics)")
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    ap.add_argument("extra", nargs="*", help="more flags for `scratchgpt prepare` (after --)")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="scratchgpt-bench-"))
    try:
        corpus = Path(a.corpus) if a.corpus else tmp / "corpus"
        if not a.corpus:
            t0 = time.perf_counter()
            size = build_corpus(corpus, a.mb, a.source)
            print(f"built {size / 1e6:.0f} MB corpus in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
        result = run(corpus, tmp / "out", a.vocab_size, a.extra)
        print(json.dumps(result, indent=2))
    finally:
        if not a.keep:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
