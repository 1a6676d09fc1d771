"""The work of `prepare`'s passes 2 and 3, cut into units and tasks, and the processes that run it.

A split's text (spans of the spool) is cut into units of at most UNIT_BYTES, at points where
tokenization does not depend on the cut; consecutive units make ~1 MB blocks, the grain of
the BPE sample. Tasks (groups of units) go to worker processes, which count pieces (bpe),
collect characters (char) or encode. The units, the tasks and hence the output do not depend
on the number of workers or the buffer size.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import threading
import time
from typing import Any, BinaryIO, Callable, Iterator

import numpy as np

from .. import UserError

CHAR_DOC_SEPARATOR = "\n\n"
# Documents longer than this are cut into units; consecutive units make ~1 MB blocks, the
# grain of the BPE sample and of the work sent to worker processes.
UNIT_BYTES = 1 << 20


class Units:
    """One split's text as spool spans of at most UNIT_BYTES, in order; `sep[i]`: a document
    separator goes before unit i (it starts a document other than the first)."""

    def __init__(self, spans: tuple[np.ndarray, np.ndarray], spool: BinaryIO) -> None:
        starts, ends = (np.asarray(a, dtype=np.int64) for a in spans)
        keep = ends > starts
        starts, ends = starts[keep], ends[keep]
        self.documents = len(starts)
        sep = np.ones(len(starts), dtype=bool)
        sep[:1] = False
        out_s, out_e, out_sep, done = [], [], [], 0
        for b in np.flatnonzero(ends - starts > UNIT_BYTES):  # cut long documents where BPE splits anyway
            bounds = [int(starts[b])]
            while int(ends[b]) - bounds[-1] > UNIT_BYTES:
                bounds.append(_safe_cut(spool, bounds[-1] + UNIT_BYTES // 2, bounds[-1] + UNIT_BYTES))
            bounds.append(int(ends[b]))
            out_s += [starts[done:b], np.array(bounds[:-1], dtype=np.int64)]
            out_e += [ends[done:b], np.array(bounds[1:], dtype=np.int64)]
            out_sep += [sep[done:b], np.array([sep[b]] + [False] * (len(bounds) - 2))]
            done = b + 1
        if out_s:
            starts = np.concatenate(out_s + [starts[done:]])
            ends = np.concatenate(out_e + [ends[done:]])
            sep = np.concatenate(out_sep + [sep[done:]])
        self.starts, self.ends, self.sep = starts, ends, sep
        self.sizes = ends - starts
        self.bytes = int(self.sizes.sum())

    def blocks(self) -> np.ndarray:
        """Block number of each unit: consecutive units starting in the same UNIT_BYTES window
        of the split's text (so a block holds at most 2 * UNIT_BYTES; numbers run 0, 1, ...)."""
        offset = np.cumsum(self.sizes) - self.sizes
        _, block = np.unique(offset // UNIT_BYTES, return_inverse=True)
        return block.reshape(-1)

    def task(self, lo: int, hi: int, key: int = -1) -> tuple:
        """Units [lo, hi) as a task for a worker; `key` names its saved pieces (-1: none)."""
        return key, self.starts[lo:hi], self.ends[lo:hi], self.sep[lo:hi]


def _group(sizes: np.ndarray, lo: int, hi: int, target: int) -> list[tuple[int, int]]:
    """Cut units [lo, hi) into consecutive ranges of about `target` bytes."""
    if hi <= lo:
        return []
    cum = np.cumsum(sizes[lo:hi])
    ends = np.flatnonzero(np.diff(cum // target, append=-1)) + 1  # last unit of each target window
    out, a = [], lo
    for e in ends:
        out.append((a, lo + int(e)))
        a = lo + int(e)
    return out


def sampled_blocks(n_blocks: int, fraction: float) -> np.ndarray:
    """An evenly spread `fraction` of the blocks (all when fraction >= 1)."""
    if fraction >= 1.0:
        return np.ones(n_blocks, dtype=bool)
    i = np.arange(n_blocks)
    return np.floor((i + 1) * fraction) > np.floor(i * fraction)


def make_tasks(units: Units, task_bytes: int, sampled: np.ndarray | None) -> list[tuple]:
    """Tasks covering all units in order. Each sampled block is a task of its own (its pieces
    are counted, saved, and reused when encoding); the other units are grouped by size."""
    if sampled is None or not sampled.any():
        return [units.task(a, b) for a, b in _group(units.sizes, 0, len(units.sizes), task_bytes)]
    block = units.blocks()
    unit_sampled = sampled[block]
    tasks: list[tuple] = []
    edges = np.flatnonzero(np.diff(block, prepend=-1, append=-2))  # where each block starts (and the end)
    run_start = 0
    for b in range(len(edges) - 1):
        lo, hi = int(edges[b]), int(edges[b + 1])
        if unit_sampled[lo]:
            tasks += [units.task(a, z) for a, z in _group(units.sizes, run_start, lo, task_bytes)]
            tasks.append(units.task(lo, hi, key=b))
            run_start = hi
    tasks += [units.task(a, z) for a, z in _group(units.sizes, run_start, len(units.sizes), task_bytes)]
    return tasks


def task_size(task: tuple) -> int:
    """The bytes of text a task covers."""
    return int((task[2] - task[1]).sum())


_SAFE_CUT = re.compile(rb"[\x21-\x7e]\n[\x21-\x7e]")


def _safe_cut(f: BinaryIO, lo: int, hi: int) -> int:
    """A cut in (lo, hi] right after a newline between two visible ASCII characters:
    byte-level BPE splits there in any case, so encoding both halves separately gives the
    same ids as encoding the whole. Falls back to any newline, then to a character boundary."""
    window = os.pread(f.fileno(), hi - lo + 1, lo)
    best = None
    for m in _SAFE_CUT.finditer(window):
        best = m.start() + 2
    if best is None:
        nl = window.rfind(b"\n", 0, len(window) - 1)
        best = nl + 1 if nl >= 0 else None
    if best is None:
        best = len(window) - 1
        while best > 1 and window[best] & 0xC0 == 0x80:
            best -= 1
    return lo + best


# -- work for the pool --------------------------------------------------------------------

_WORKER_STATE: dict[str, Any] = {}


def _read_span(fd: int, start: int, end: int) -> str:
    return os.pread(fd, end - start, start).decode("utf-8")


def count_task(spool: str, piece_dir: str, task: tuple) -> tuple[list[str], list[int]]:
    """Pass 2 (bpe): distinct byte-level pieces of the task's text and their counts.

    The piece sequence is also saved (as indices into the distinct pieces) so that pass 3
    does not split the text again: splitting is the most expensive step in Python.
    """
    from ..tokenizer import index_pieces, split_pieces

    key, starts, ends, _ = task
    pieces: list[str] = []
    seg_pieces = []
    fd = os.open(spool, os.O_RDONLY)
    try:
        for start, end in zip(starts.tolist(), ends.tolist()):
            p = split_pieces(_read_span(fd, start, end))
            pieces += p
            seg_pieces.append(len(p))
    finally:
        os.close(fd)
    uniq, inv, counts = index_pieces(pieces)
    dtype = "uint16" if len(uniq) <= 65536 else "uint32"
    inv.astype(dtype).tofile(os.path.join(piece_dir, f"{key}.bin"))
    with open(os.path.join(piece_dir, f"{key}.json"), "w", encoding="utf-8") as f:
        json.dump({"uniq": uniq, "segments": seg_pieces, "dtype": dtype}, f, ensure_ascii=False)
    return uniq, counts.tolist()


def encode_task(spool: str, tok_path: str, dtype: str, piece_dir: str | None, task: tuple) -> tuple[bytes, int]:
    """Pass 3: the task's token ids as raw bytes (separators between documents included),
    and how many ids are <unk>. Uses the pieces saved by `count_task` when there are some."""
    from ..tokenizer import Tokenizer

    key, starts, ends, seps = task
    tok = _WORKER_STATE.get(tok_path)
    if tok is None:
        _WORKER_STATE.clear()
        tok = _WORKER_STATE[tok_path] = Tokenizer.load(tok_path)
    if piece_dir is not None and key >= 0:
        segments = _saved_segments(tok, piece_dir, key, len(starts))
    else:
        fd = os.open(spool, os.O_RDONLY)
        try:
            segments = [tok.encode_array(_read_span(fd, s, e)) for s, e in zip(starts.tolist(), ends.tolist())]
        finally:
            os.close(fd)
    parts = []
    sep = None
    for sep_before, seg in zip(seps.tolist(), segments):
        if sep_before:
            if sep is None:
                sep = separator_ids(tok)
            parts.append(sep)
        parts.append(seg)
    ids = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    unknown = int((ids == tok.unk_id).sum()) if tok.unk_id is not None else 0
    return ids.astype(dtype).tobytes(), unknown


def _saved_segments(tok, piece_dir: str, key: int, n_units: int) -> list[np.ndarray]:
    """Each unit's ids, from the pieces `count_task` saved for this block."""
    with open(os.path.join(piece_dir, f"{key}.json"), encoding="utf-8") as f:
        saved = json.load(f)
    inv = np.fromfile(os.path.join(piece_dir, f"{key}.bin"), dtype=saved["dtype"]).astype(np.int64)
    ids, piece_ends = tok.encode_indexed(saved["uniq"], inv)
    bounds = np.concatenate([[0], piece_ends])[np.cumsum([0] + saved["segments"])]
    return [ids[bounds[k]:bounds[k + 1]] for k in range(n_units)]


def separator_ids(tok) -> np.ndarray:
    """What goes between two documents: <|endoftext|> (bpe), an imported tokenizer's eos followed by what
    it puts before a text (Llama: `</s><s>`), or a blank line (char)."""
    if tok.eot_id is not None:
        return np.array([tok.eot_id] + tok.bos_ids, dtype=np.int64)
    return tok.encode_array(CHAR_DOC_SEPARATOR)


def char_task(spool: str, task: tuple) -> str:
    """Pass 2 (char): the distinct characters in the task's text."""
    chars: set[str] = set()
    fd = os.open(spool, os.O_RDONLY)
    try:
        for start, end in zip(task[1].tolist(), task[2].tolist()):
            chars.update(_read_span(fd, start, end))
    finally:
        os.close(fd)
    return "".join(sorted(chars))


class Runner:
    """Maps a task function over tasks in order: in worker processes, or inline when the
    corpus is small or one worker is asked for (the results are the same either way)."""

    def __init__(self, workers: int, corpus_bytes: int | None = None) -> None:
        small = corpus_bytes is not None and corpus_bytes <= 4 * UNIT_BYTES  # not worth starting processes
        self.workers = 1 if small else workers
        self._pool = None

    def map(self, fn: Callable, args: tuple, tasks: list) -> Iterator[Any]:
        from functools import partial

        f = partial(fn, *args)
        if self.workers <= 1 or len(tasks) <= 1:
            return map(f, tasks)
        if self._pool is None:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            # spawn, not fork: the parent may already run tokenizers' thread pool. An
            # executor (unlike mp.Pool) raises instead of hanging if a worker dies.
            self._pool = ProcessPoolExecutor(self.workers, mp_context=mp.get_context("spawn"),
                                             initializer=_worker_init, initargs=(os.getpid(),))
        return _results(self._pool.map(f, tasks))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def _results(results: Iterator[Any]) -> Iterator[Any]:
    from concurrent.futures.process import BrokenProcessPool

    try:
        yield from results
    except BrokenProcessPool:
        raise UserError("a worker process died (killed, or out of memory?): try fewer --workers or a smaller "
                        "--buffer-mb") from None


def _worker_init(parent: int) -> None:
    """Each worker dies with the process that started it: a killed `prepare` leaves no worker
    blocked for ever on a pipe nobody reads (Linux: at once, by the kernel; elsewhere: within
    a second, by a thread watching the parent)."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the parent died before the line above took effect
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent,), name="watch-parent", daemon=True).start()


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def progress_bar(show: bool, total: int | None, desc: str):
    """A tqdm bar on stderr in bytes, or a silent one when `show` is false."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                disable=not show, file=sys.stderr, dynamic_ncols=True, leave=False)
