"""Faults of the machine, not of the program: a full disk, a file size limit, a read-only or impossible path.

They reach the command line as OSError (safetensors reports them as SafetensorError, which
`save_tensors` turns back into the OSError it was), and `one_line` says them in the one line the
CLI prints. Whatever a command had written before stays as it was: checkpoints and outputs are
written under temporary names and renamed into place only when complete (checkpoint/store.py,
utils.atomic_write), so a failed write loses nothing that existed.
"""

from __future__ import annotations

import errno
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    import torch

# errno values that mean "the machine refused", never "the program is wrong": said in one line, no traceback
MACHINE_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS,
                            errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG, errno.ELOOP,
                            errno.EIO, errno.EMFILE, errno.ENFILE, errno.ENXIO, errno.ENODEV, errno.EXDEV})

# the names a file or folder has while it is written, and the name it will have: utils.atomic_write's
# .NAME.XXXXXXXX.tmp, a staged folder's .NAME.tmp-XXXXXXXX, a checkpoint's .tmp-step-N
_TEMP = [re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp$"), re.compile(r"^\.(?P<name>.+)\.tmp-[a-z0-9_]{8}$"),
         re.compile(r"^\.tmp-(?P<name>step-\d+)$")]


def save_tensors(tensors: dict[str, "torch.Tensor"], path: str | os.PathLike) -> None:
    """safetensors' save_file, with its I/O failures (a full disk, a file size limit) raised as the OSError they are."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata={"format": "pt"})
    except SafetensorError as e:
        m = re.search(r"os error (\d+)", str(e))
        if m is None:
            raise
        code = int(m.group(1))
        raise OSError(code, os.strerror(code), str(path)) from None


def is_machine_fault(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in MACHINE_ERRNOS


def one_line(e: OSError) -> str:
    """`PATH: what went wrong`; a temp file is named by the file it was to become."""
    what = e.strerror or str(e)
    if e.filename is None:
        return what
    path = Path(os.fsdecode(e.filename))
    return f"{Path(*(final_name(part) or part for part in path.parts))}: {what}"


class NamedStdout:
    """sys.stdout, whose write failures (stdout on a full disk) name it: `standard output: No space left on device`."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError as e:
            raise _named(e) from None

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as e:
            raise _named(e) from None

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def _named(e: OSError) -> OSError:
    return e if e.filename is not None else type(e)(e.errno, e.strerror, "standard output")


def quiet_stdout() -> None:
    """Point stdout at /dev/null: what could not be written is dropped, instead of failing again at exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


def final_name(name: str) -> Optional[str]:
    """The name a temp file or folder (a kill mid-write leaves them) was to get; None for any other name."""
    for pattern in _TEMP:
        m = pattern.match(name)
        if m:
            return m.group("name")
    return None
