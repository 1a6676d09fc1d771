"""The run's JSON-lines logs (metrics.jsonl, samples.jsonl, a search's trials.jsonl): append, read, cut back.

One rule for damage, everywhere: the last line may be torn (a crash in the middle of an append, so
it is not a whole JSON object, or has no newline yet) and is dropped, silently for a reader and
cut off by the next writer. Any other line that is not a JSON object is damage nobody's crash
makes: readers for display skip it (`strict=False`), everything that resumes from the file
refuses it (a UserError naming the line) before changing anything.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

from .. import UserError
from ..utils import atomic_write_bytes, finite_or_null, json_text


def _parse(line: bytes) -> Optional[dict]:
    try:
        row = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    return row if isinstance(row, dict) else None


def _lines(path: Path) -> list[bytes]:
    """The file's lines, without a torn last one (no newline and not a whole row)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return []
    except OSError as e:
        raise UserError(f"{path}: {e.strerror or e}") from None
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    if tail.strip() and _parse(tail) is not None:
        lines.append(tail)  # a whole row whose newline was lost: kept
    return lines


def read_rows(path: str | os.PathLike, strict: bool = False) -> list[dict]:
    """The rows of a JSON-lines file (none when it does not exist). A torn last line is dropped; another
    line that is not a JSON object is skipped, or with `strict` raises a UserError."""
    path = Path(path)
    lines = _lines(path)
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        row = _parse(line)
        if row is None:  # (a torn last line has no newline: _lines left it out) damage, even on the last line
            if strict:
                raise UserError(f"{path}: line {i + 1} is not a JSON object")
            continue
        rows.append(row)
    return rows


def append_row(path: str | os.PathLike, record: dict, durable: bool = False) -> None:
    """Add one row (NaN/inf as null). `durable`: fsync it, for rows that must survive a crash (a finished
    trial); a training log's rows are rewritten by the resumed run anyway."""
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json_text(finite_or_null(record)) + "\n")
            if durable:
                f.flush()
                os.fsync(f.fileno())
    except OSError as e:
        if e.filename is None:  # f.write() on a full disk names no file: say which one
            raise type(e)(e.errno, e.strerror, os.fspath(path)) from None
        raise


def write_rows(path: str | os.PathLike, rows: list[dict]) -> None:
    """Replace the file with `rows`, atomically."""
    atomic_write_bytes(path, "".join(json_text(finite_or_null(r)) + "\n" for r in rows).encode("utf-8"))


def row_step(row: dict[str, Any]) -> float:
    step = row.get("step")
    return step if isinstance(step, (int, float)) and not isinstance(step, bool) else float("inf")


def check_step(step: Any, where: str) -> int:
    """A checkpoint's step, before anything is cut back to it: a non-negative integer."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise UserError(f"{where}: step must be a non-negative integer, not {str(step)[:40]!r}")
    return step


def drop_torn_tail(path: str | os.PathLike) -> bool:
    """Cut a torn last line off, so the next append starts a line of its own; True when there was one."""
    path = Path(path)
    if not path.exists():
        return False
    lines = [ln for ln in _lines(path) if ln.strip()]
    data = b"".join(ln + b"\n" for ln in lines)
    if path.stat().st_size == len(data):
        return False
    atomic_write_bytes(path, data)
    return True


def cut_back(path: str | os.PathLike, step: int, where: str = "the checkpoint") -> None:
    """On resume: keep the rows up to `step` (the checkpoint's), which the resumed run continues from; the
    kept lines stay byte for byte. The step and every line are checked before the file changes."""
    check_step(step, where)
    path = Path(path)
    if not path.exists():
        return
    read_rows(path, strict=True)  # interior damage: refused before anything changes
    lines = [ln for ln in _lines(path) if ln.strip()]
    kept = [ln for ln in lines if row_step(_parse(ln) or {}) <= step]
    data = b"".join(ln + b"\n" for ln in kept)
    if path.stat().st_size != len(data):
        atomic_write_bytes(path, data)
