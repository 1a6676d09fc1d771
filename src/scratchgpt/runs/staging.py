"""The one staged writer for every folder scratchgpt makes in one go (data dirs from `prepare`, Hugging
Face and adapter exports, `import-hf` and `merge-lora` runs): the check on --out (guard.py), a temporary
directory beside it, renamed into place once complete (nothing half-written is ever seen at --out,
and with --force the old directory survives a failure), then the marker that says what it is.

While a temporary directory is in use, its writer holds a lock on a file inside it; a killed
writer's lock goes with it, so the next `prepare` of the same --out removes that directory.
Only directories named as `new_tmp` names them and holding that lock file are ever removed.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import stat
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

from .. import UserError
from ..utils import fsync_dir, replace_dir, umask
from .guard import Kind, check_out, write_marker

try:
    import fcntl
except ImportError:  # not on POSIX: no locks, so leftovers stay (they are hidden, and never read)
    fcntl = None  # type: ignore[assignment]

_OWNER = ".scratchgpt-writing"  # inside a temporary directory: locked by the process writing it
_TMP_SUFFIX = re.compile(r"[a-z0-9_]{8}")  # what tempfile.mkdtemp puts after the prefix
_held: dict[Path, int] = {}  # temporary directory -> the open, locked owner file


def remove_replaced(out: Path) -> None:
    """Delete a run that --force replaces in place (train, finetune write runs as they go, so they can't be
    staged): the caller's guard.check_out said it may go. Renamed aside first, so `out` is either the old run
    or absent, never half of one; a kill mid-delete leaves only a hidden .OUT.old-* folder."""
    aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.replace(out, aside / out.name)
    shutil.rmtree(aside, ignore_errors=True)


@contextmanager
def staged(out: str | os.PathLike, kind: Kind, *, force: bool = False, inputs: Iterable[Path] = (),
           exists: Optional[str] = None, empty_is_new: bool = True, summarize: bool = False) -> Iterator[Path]:
    """Write the folder `out` of this kind: checks it (guard.check_out), yields a temporary directory to
    fill, then marks it and renames it into place (checking again: nothing appeared meanwhile). On any
    failure the temporary directory is removed and `out` is as it was. An OSError (a full disk, a
    read-only folder) goes on to the CLI, which names the file in one line (faults.one_line, temp names
    said as the final ones); `summarize` says it as one line about `out` instead (prepare's)."""
    out, inputs = Path(out), list(inputs)
    check_out(out, kind, force=force, inputs=inputs, exists=exists, empty_is_new=empty_is_new)
    tmp = new_tmp(out)
    try:
        yield tmp
        write_marker(tmp, kind)
        fsync_dir(tmp)
        check_out(out, kind, force=force, inputs=inputs, exists=exists, empty_is_new=empty_is_new)
        _release(tmp)
        replace_dir(tmp, out)
    except BaseException as e:
        discard_tmp(tmp)
        if isinstance(e, OSError) and summarize:
            raise write_failure(e, out, tmp) from None
        raise


def new_tmp(out: Path) -> Path:
    """A temporary directory beside `out`, renamed to it when complete (after removing those
    that killed runs left beside it)."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        blocker = next(p for p in out.parents if p.exists())
        raise UserError(f"cannot write the output directory {out}: {blocker} is not a directory") from None
    except OSError as e:
        raise UserError(f"cannot write the output directory {out}: {e.strerror or e}") from None
    remove_stale_tmps(out)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as e:
        raise UserError(f"cannot write the output directory {out}: {e.strerror or e}") from None
    try:
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes it private; the result should not be
        _hold(tmp)
    except OSError as e:
        discard_tmp(tmp)
        raise UserError(f"cannot write the output directory {out}: {e.strerror or e}") from None
    return tmp


def _hold(tmp: Path) -> None:
    """Create and lock the owner file (locked before it gets the name others look for)."""
    if fcntl is None:
        return
    fd = os.open(tmp / (_OWNER + ".new"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.replace(tmp / (_OWNER + ".new"), tmp / _OWNER)
    except BaseException:
        os.close(fd)
        raise
    _held[tmp] = fd


def _release(tmp: Path) -> None:
    fd = _held.pop(tmp, None)
    if fd is not None:
        try:
            os.unlink(tmp / _OWNER)
        except FileNotFoundError:
            pass
        os.close(fd)


def discard_tmp(tmp: Path) -> None:
    """Remove a temporary directory after a failure."""
    _release(tmp)
    shutil.rmtree(tmp, ignore_errors=True)


def remove_stale_tmps(out: Path) -> list[Path]:
    """Remove the temporary directories of `out` whose writer is gone (killed); returns them.

    Only real directories named `.OUT.tmp-XXXXXXXX` that hold the owner file, and whose lock
    no living process holds, are removed: never a symlink, another name, or a running write.
    """
    if fcntl is None:
        return []
    prefix = f".{out.name}.tmp-"
    try:
        entries = [e for e in os.scandir(out.parent) if e.name.startswith(prefix)]
    except OSError:
        return []
    removed = []
    for entry in entries:
        d = Path(entry.path)
        if _TMP_SUFFIX.fullmatch(entry.name[len(prefix):]) and entry.is_dir(follow_symlinks=False) \
                and _remove_if_abandoned(d):
            removed.append(d)
    return removed


def _remove_if_abandoned(d: Path) -> bool:
    try:
        fd = os.open(d / _OWNER, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False  # no owner file: not ours, or not yet locked
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False  # its writer is alive
        shutil.rmtree(d, ignore_errors=True)
        return True
    finally:
        os.close(fd)


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM (what schedulers send) stops a staged write as Ctrl-C does: the temporary directory is
    removed and the workers are stopped (only where the handler can be set: the main thread)."""
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt("terminated (SIGTERM)")

    signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def write_failure(e: OSError, out: Path, tmp: Path) -> UserError:
    """The one line for an OSError met while making `out` in `tmp` (a full disk, a file size limit,
    permissions): nothing at `out` was changed, and `tmp` is removed by the caller."""
    name = os.fspath(e.filename) if e.filename else ""
    if name and not os.path.abspath(name).startswith(os.path.abspath(tmp) + os.sep):
        return UserError(f"{name}: {e.strerror or e}")  # not one of ours: an input
    return UserError(f"cannot write the output directory {out}: {e.strerror or e} (nothing was changed)")
