"""Benchmark `scratchgpt prepare` (BPE training + encoding) and training from sharded token files.

    python bench/prepare.py                                   # 200 MB of .txt documents, as before
    python bench/prepare.py --mb 2000 --format parquet        # 2 GB of web-page-sized documents in parquet
    python bench/prepare.py --mb 2000 --format jsonl.zst      # the same documents as zstd-compressed JSONL
    python bench/prepare.py --corpus DIR_OR_FILE              # or measure your own inputs
    python bench/prepare.py --mb 2000 --format parquet --keep -- --workers 2   # flags after -- go to prepare
    python bench/prepare.py --train-shards 8 --mb 30 --rounds 3               # training tok/s: 8 shards vs 1 file
    python bench/prepare.py --train-shards 8 --mb 30 --train-flags "--model.n_layer 6 --model.n_embd 384"

The generated text is CPython's bundled pydoc topics (or --source), its lines shuffled afresh for every
~0.5 MB, so no network is needed and no block repeats verbatim. --format txt writes one such shuffle
per document and file (the corpus of the earlier figures in BENCHMARKS.md); parquet and jsonl.* write documents of
1-20 KB, like web pages, in --files files. `scratchgpt prepare` runs as a subprocess; reported: wall
time, MB/s of text (after decompression), CPU time, the peak RSS of the largest single process
(getrusage) and the peak summed RSS of the whole process tree (sampled from /proc every 0.1 s, so
prepare's worker processes are counted together).

--train-shards N prepares one corpus twice, as one train.bin and as N files, then runs
`scratchgpt train` on each in turn (--rounds times) and reports the median steady-state tok/s.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}


def source_lines(source: str | None) -> list[str]:
    if source:
        text = Path(source).read_text(encoding="utf-8")
    else:
        from pydoc_data.topics import topics

        text = "\n".join(topics[k] for k in sorted(topics))
    return text.split("\n")


def _pools(lines: list[str], seed: int):
    """Endless ~0.5 MB texts, each the source's lines in a fresh order."""
    rng = random.Random(seed)
    lines = list(lines)
    while True:
        rng.shuffle(lines)
        yield "\n".join(lines) + "\n"


def web_documents(mb: int, source: str | None, seed: int = 0):
    """Documents of 1-20 KB (cut at line ends) until `mb` MB of text."""
    rng = random.Random(seed + 1)
    total, target = 0, mb * 1_000_000
    for pool in _pools(source_lines(source), seed):
        pos = 0
        while pos < len(pool) - 20_000 and total < target:
            end = pool.find("\n", pos + rng.randint(1_000, 20_000)) + 1
            doc = pool[pos:end]
            pos = end
            total += len(doc.encode("utf-8"))
            yield doc
        if total >= target:
            return


def build_corpus(directory: Path, mb: int, source: str | None, fmt: str = "txt", files: int = 8, seed: int = 0) -> int:
    """Write the corpus; returns its text bytes."""
    directory.mkdir(parents=True, exist_ok=True)
    if fmt == "txt":  # a document (and file) per shuffle, cut after 1 MB
        total, i = 0, 0
        for pool in _pools(source_lines(source), seed):
            data = pool[: (pool.find("\n", 1_000_000) + 1) or len(pool)].encode("utf-8")
            (directory / f"doc{i:05d}.txt").write_bytes(data)
            total, i = total + len(data), i + 1
            if total >= mb * 1_000_000:
                return total
    per_file = mb * 1_000_000 / files
    total, k, batch, writer = 0, 0, [], None
    for doc in web_documents(mb, source, seed):
        if writer is None:
            writer = _writer(directory / f"part-{k:05d}.{fmt}", fmt)
        batch.append(doc)
        total += len(doc.encode("utf-8"))
        if len(batch) == 2000:
            writer.write(batch)
            batch = []
        if total >= per_file * (k + 1) and k < files - 1:
            writer.write(batch)
            writer.close()
            writer, batch, k = None, [], k + 1
    if writer is None:
        writer = _writer(directory / f"part-{k:05d}.{fmt}", fmt)
    writer.write(batch)
    writer.close()
    return total


class _writer:
    def __init__(self, path: Path, fmt: str) -> None:
        self.fmt = fmt
        if fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            self.pa = pa
            self.w = pq.ParquetWriter(str(path), pa.schema([("text", pa.string())]), compression="zstd")
        elif fmt == "jsonl.zst":
            import zstandard

            self.f = open(path, "wb")
            self.w = zstandard.ZstdCompressor(level=3).stream_writer(self.f)
        elif fmt == "jsonl.gz":
            import gzip

            self.w = gzip.open(path, "wb", compresslevel=6)
        else:
            raise SystemExit(f"unknown --format {fmt}")

    def write(self, docs: list[str]) -> None:
        if not docs:
            return
        if self.fmt == "parquet":
            self.w.write_table(self.pa.table({"text": docs}))  # one row group per batch of documents
        else:
            self.w.write("".join(json.dumps({"text": d}) + "\n" for d in docs).encode("utf-8"))

    def close(self) -> None:
        self.w.close()
        if self.fmt == "jsonl.zst":
            self.f.close()


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
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=ENV)
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
    cpu = usage.ru_utime + usage.ru_stime - before.ru_utime - before.ru_stime  # prepare and its (joined) workers
    mb = meta["bytes_in"] / 1e6
    return {
        "command": " ".join(cmd),
        "input_mb": round(mb, 1),
        "input_mb_on_disk": round(sum(p.stat().st_size for p in ([corpus] if corpus.is_file() else corpus.rglob("*"))
                                      if p.is_file()) / 1e6, 1),
        "wall_s": round(wall, 1),
        "mb_per_s": round(mb / wall, 2),
        # CPU seconds spent, all processes: on an otherwise idle machine the wall time is
        # about cpu_s / cores when the parallel passes dominate.
        "cpu_s": round(cpu, 1),
        "mb_per_cpu_s": round(mb / cpu, 2),
        "peak_rss_single_process_mib": round(max_single / 2**20),
        "peak_rss_process_tree_mib": round(peak / 2**20),
        "documents": meta["train_documents"] + meta["val_documents"],
        "train_tokens": meta["train_tokens"],
        "val_tokens": meta["val_tokens"],
        "train_shards": len(meta["shards"]["train"]),
        "vocab_size": meta["vocab_size"],
        "bpe_training": meta.get("bpe_training"),
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "load_average_at_start": load_start,
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
    }


def shards_bench(tmp: Path, a) -> dict:
    """Training tok/s from one train.bin and from `a.train_shards` shards of the same tokens, taking turns."""
    corpus = tmp / "corpus"
    build_corpus(corpus, a.mb, a.source, "parquet", files=4)
    one, many = tmp / "one", tmp / "sharded"
    prep = [sys.executable, "-m", "scratchgpt", "prepare", str(corpus), "--vocab-size", str(a.vocab_size)]
    subprocess.run(prep + ["--out", str(one)], check=True, env=ENV)
    n = json.loads((one / "meta.json").read_text())["train_tokens"]
    subprocess.run(prep + ["--out", str(many), "--tokenizer-from", str(one), "--shard-tokens",
                           str(math.ceil(n / a.train_shards))], check=True, env=ENV)
    assert len(json.loads((many / "meta.json").read_text())["shards"]["train"]) == a.train_shards
    flags = ["--train.max_iters", str(a.iters), "--train.eval_interval", "1000000", "--train.log_interval", "1",
             "--train.sample_tokens", "0", "--train.progress", "false", "--train.plot", "false",
             "--train.tensorboard", "false", "--train.final_eval", "false", "--optim.warmup_iters",
             str(min(100, a.iters)), *shlex.split(a.train_flags)]
    rates: dict[str, list[float]] = {"one file": [], f"{a.train_shards} shards": []}
    for r in range(a.rounds):
        for label, data in zip(rates, (one, many)):
            run_dir = tmp / f"run-{r}-{data.name}"
            cmd = [sys.executable, "-m", "scratchgpt", "train", "--data", str(data), "--out", str(run_dir), *flags]
            subprocess.run(cmd, check=True, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
            rows = [x for x in rows if "tok_per_s" in x][5:]  # steady state: the first steps warm up
            rates[label].append(statistics.median(x["tok_per_s"] for x in rows))
            shutil.rmtree(run_dir)
    med = {k: round(statistics.median(v), 1) for k, v in rates.items()}
    base = med["one file"]
    return {"train_tokens": n, "train_flags": flags, "tok_per_s_median": med,
            "tok_per_s_runs": {k: [round(x, 1) for x in v] for k, v in rates.items()},
            "ratio_to_one_file": {k: round(v / base, 3) for k, v in med.items()},
            "load_average": [round(x, 2) for x in os.getloadavg()]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", help="existing inputs to prepare (default: build a corpus)")
    ap.add_argument("--mb", type=int, default=200, help="size of the generated corpus (text, before compression)")
    ap.add_argument("--format", default="txt", choices=["txt", "parquet", "jsonl.zst", "jsonl.gz"],
                    help="of the generated corpus")
    ap.add_argument("--files", type=int, default=16, help="parquet/jsonl files the generated corpus is spread over")
    ap.add_argument("--source", help="text whose lines make up the generated corpus (default: pydoc topics)")
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--train-shards", type=int, default=0,
                    help="instead: training tok/s from this many shards against one file")
    ap.add_argument("--rounds", type=int, default=3, help="--train-shards: training runs per variant, taking turns")
    ap.add_argument("--iters", type=int, default=60, help="--train-shards: steps per training run")
    ap.add_argument("--train-flags", default="", help="--train-shards: more flags for `scratchgpt train`, one string")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (printed)")
    ap.add_argument("extra", nargs="*", help="more flags for `scratchgpt prepare` (after --)")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="scratchgpt-bench-"))
    try:
        if a.train_shards:
            print(json.dumps(shards_bench(tmp, a), indent=2))
            return
        corpus = Path(a.corpus) if a.corpus else tmp / "corpus"
        if not a.corpus:
            t0 = time.perf_counter()
            size = build_corpus(corpus, a.mb, a.source, a.format, a.files)
            print(f"built {size / 1e6:.0f} MB {a.format} corpus in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
        result = run(corpus, tmp / "out", a.vocab_size, a.extra)
        result["format"] = a.format if not a.corpus else "given"
        print(json.dumps(result, indent=2))
    finally:
        if a.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
