"""Small shared helpers: atomic file writes, hashing, JSON, and reading files a user names (bounded, one-line errors)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import stat
import tempfile
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Optional

from . import UserError


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (a no-op where directories can't be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def umask() -> int:
    """The process's umask (read without changing it where /proc says it; else set and put back)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_temp_dir(prefix: str, dir: str | os.PathLike) -> Path:
    """tempfile.mkdtemp, with the mode a plain mkdir gives (mkdtemp makes it 0700 whatever the umask), for
    folders that are renamed into place and then read by others."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=dir))
    os.chmod(tmp, 0o777 & ~umask())
    return tmp


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)`, fsync the result, then rename it over `path`.

    A crash at any point leaves either the old file or the new one, never a torn file. The file gets
    the mode a plain open() would give it (0666 less the umask), not mkstemp's private 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask())  # after: a writer may have made the file anew (safetensors does)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError) and e.filename is None:  # f.write() names no file: say which one failed
            raise type(e)(e.errno, e.strerror, str(path)) from None
        raise
    fsync_dir(path.parent)


def replace_dir(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """Put the finished directory `tmp` at `final`: at every instant the old or the new one is complete.

    The old directory is moved aside (not deleted) until the new one is in place, and put back
    if that rename fails, so a crash or an error never loses what was there.
    """
    tmp, final = Path(tmp), Path(final)
    old = final.with_name(f".{final.name}.old")
    if old.exists():
        shutil.rmtree(old)  # left by a crash after an earlier swap: `final` is complete
    if final.exists():
        os.replace(final, old)
    try:
        os.replace(tmp, final)
    except BaseException:
        if old.exists() and not final.exists():
            os.replace(old, final)
        raise
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write(path, write)


def json_text(obj: Any, indent: Optional[int] = None) -> str:
    """Strict JSON (RFC 8259): NaN and Infinity, which strict parsers reject, raise ValueError here.
    Records that can legitimately hold them (losses of a diverged run) go through finite_or_null first."""
    return json.dumps(obj, indent=indent, ensure_ascii=False, allow_nan=False)


def finite_or_null(record: dict) -> dict:
    """`record` with each NaN/inf float (at any depth) as null, and a "nonfinite" entry saying which and why:
    {"val_loss": null, "nonfinite": {"val_loss": "nan"}}."""
    why: dict[str, str] = {}

    def clean(value: Any, key: str) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            why[key] = str(value)  # "nan", "inf" or "-inf"
            return None
        if isinstance(value, dict):
            return {k: clean(v, f"{key}.{k}" if key else str(k)) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v, f"{key}[{i}]") for i, v in enumerate(value)]
        return value

    out = clean(record, "")
    if why:
        out["nonfinite"] = why
    return out


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json_text(obj, indent=2) + "\n").encode("utf-8"))


def read_json(path: str | os.PathLike) -> Any:
    with open_regular(path) as f:
        return json.load(f)


def open_regular(path: str | os.PathLike) -> BinaryIO:
    """`path` opened for binary reading, if it is a regular file (or a link to one). A FIFO would block for
    ever and a device such as /dev/zero never ends, so anything else is a one-line UserError naming it
    (a file that can't be opened raises OSError, as open() does)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # O_NONBLOCK: a FIFO must not wait for a writer
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        what = "a directory" if stat.S_ISDIR(mode) else "not a regular file (a FIFO, device or socket)"
        raise UserError(f"{path}: {what}")
    return open(fd, "rb")


def read_text(path: str | os.PathLike, encoding: str = "utf-8", limit: Optional[int] = None) -> str:
    """A whole text file the user named; not a regular file, not text in `encoding`, unreadable or (with `limit`)
    over `limit` bytes: a one-line UserError naming the file."""
    try:
        with open_regular(path) as f:
            data = f.read(-1 if limit is None else limit + 1)
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
    if limit is not None and len(data) > limit:
        raise UserError(f"{path}: larger than {limit:,} bytes (is it the right file?)")
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not {'UTF-8' if 'utf' in encoding else encoding} text ({e.reason} at byte "
                        f"{e.start})") from None


YAML_MAX_VALUES = 100_000  # a config or search space has hundreds; an alias bomb expands to billions


def load_yaml(text: str, what: str) -> Any:
    """YAML (or JSON) text as Python values, safely: no tags run (safe_load), and a document whose aliases
    expand to more than YAML_MAX_VALUES values (a "billion laughs" bomb) or that refers to itself is refused in
    one line before anything expands it."""
    import yaml

    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is not None:
            _check_yaml_size(node, what)
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UserError(f"{what} is not valid YAML/JSON: {' '.join(str(e).split())[:200]}") from None
    except RecursionError:
        raise UserError(f"{what} is nested too deeply") from None


def _check_yaml_size(root: Any, what: str) -> None:
    """Refuse `root` if it expands to more than YAML_MAX_VALUES values. Each distinct node is counted once, with
    its children's expanded sizes, so checking an alias bomb costs what its text costs, not what it expands to."""
    import yaml

    sizes: dict[int, int] = {}
    busy: set[int] = set()

    def size(node: Any) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in busy:
            raise UserError(f"{what} refers to itself (a recursive YAML alias)")
        busy.add(key)
        if isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
        else:
            children = node.value if isinstance(node, yaml.SequenceNode) else []
        n = 1 + sum(size(child) for child in children)
        if n > YAML_MAX_VALUES:
            raise UserError(f"{what} expands to more than {YAML_MAX_VALUES:,} values (YAML aliases that multiply?)")
        busy.discard(key)
        sizes[key] = n
        return n

    size(root)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """The sha256 of a regular file, taken from sha256_early's result where that hashed this very file unchanged."""
    with open_regular(path) as f:
        early = _EARLY.get(_identity(os.fstat(f.fileno())))
        digest = early.result() if early is not None else None
        return digest if digest is not None else _digest(f, chunk)


def _digest(f: BinaryIO, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    buf = bytearray(chunk)  # (one buffer: a fresh 1 MiB block per read would fault its pages in each time)
    view = memoryview(buf)
    while n := f.readinto(buf):
        h.update(view[:n])
    return h.hexdigest()


# (device, inode, size, mtime, ctime) of a file sha256_early hashed -> its digest (None: it changed meanwhile)
_EARLY: dict[tuple[int, ...], Future] = {}


def _identity(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def sha256_early(paths: Iterable[str | os.PathLike]) -> None:
    """Start the sha256 of `paths` (regular files; others are skipped) on a background thread; sha256_file then
    takes each result, once the file is still what was hashed (same inode, size and times). The CLI starts the
    checkpoint's while torch imports (~1 s of one core): a fresh `sample` verifies its weights (0.4 s for 538 MB)
    on the other core meanwhile, not after."""
    jobs = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and _identity(st) not in _EARLY:
            _EARLY[_identity(st)] = Future()
            jobs.append((path, _identity(st)))
    if jobs:
        threading.Thread(target=_hash_early, args=(jobs,), name="sha256-early", daemon=True).start()


def _hash_early(jobs: list[tuple[str | os.PathLike, tuple[int, ...]]]) -> None:
    for path, key in jobs:
        digest = None
        try:
            with open_regular(path) as f:
                if _identity(os.fstat(f.fileno())) == key:
                    digest = _digest(f)
                    digest = digest if _identity(os.fstat(f.fileno())) == key else None  # (written meanwhile)
        except (OSError, UserError):
            pass  # (sha256_file hashes it itself, and says what is wrong)
        finally:
            _EARLY[key].set_result(digest)  # (always: sha256_file waits for it)


MAX_ERROR_CHARS = 600  # an error quoting a 30 MB value shows its start and end, not all of it


def first_line(e: BaseException, limit: int = 200) -> str:
    """A library's error as its first line, short (its type's name when it says nothing)."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:limit]


def one_line_message(message: str) -> str:
    """An error message as one line, even when it quotes text with line breaks in it, and short when it quotes
    a huge value (the middle is cut, saying how much)."""
    line = message.strip().replace("\r", "\\r").replace("\n", "\\n")
    if len(line) <= MAX_ERROR_CHARS:
        return line
    head, tail = MAX_ERROR_CHARS * 2 // 3, MAX_ERROR_CHARS // 4
    return f"{line[:head]} [... {len(line) - head - tail:,} characters cut ...] {line[-tail:]}"


def human_number(n: float) -> str:
    """3 significant digits with a k/M/G/T/P suffix: 27k, 3.07M (the training progress bar, report.py's headline)."""
    for unit in ("", "k", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.3g}{unit}"
        n /= 1000
    return f"{n:.3g}P"
