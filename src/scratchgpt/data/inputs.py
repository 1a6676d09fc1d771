"""Reading `prepare`'s inputs as documents: text, JSONL, parquet, `datasets.save_to_disk` folders,
compressed text and JSONL, stdin and the embedded corpus.

Everything is streamed: text in 1 MB blocks, parquet and arrow in record batches of the text
column only, compressed files through their decompressors; no input is ever held in memory
whole. A bad input is a one-line UserError naming the file and the line, row or byte offset.

Each file is one document, except JSONL (one per line), parquet and arrow (one per row).
"""

from __future__ import annotations

import codecs
import glob
import io
import json
import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Sequence

from .. import UserError
from ..utils import first_line

TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
# Compressed .txt/.md/.jsonl/.ndjson, streamed through the standard library or zstandard.
COMPRESSION_SUFFIXES = {".gz": "gzip", ".bz2": "bzip2", ".xz": "xz", ".zst": "zstd"}
BUILTIN = "<builtin:pydoc_data.topics>"
READ_BLOCK = 1 << 20
# Rows per record batch read from parquet/arrow: small enough that a batch of long documents
# (books) stays a few hundred MB at most, large enough that per-batch overhead vanishes.
_BATCH_ROWS = 256
# A file with more replaced (undecodable) bytes than this share is binary, not text.
_MAX_REPLACED_SHARE = 0.1


@dataclass
class Source:
    """One input: a file (of a kind), stdin, or the embedded corpus."""

    kind: str  # "text" | "jsonl" | "parquet" | "arrow" | "stdin" | "builtin" | "hub"
    name: str
    path: Path | None = None
    compression: str | None = None  # "gzip" | "bzip2" | "xz" | "zstd"
    is_val: bool = False
    hub: Any = None  # kind "hub": a hub.HubDataset, which reads itself

    def size(self) -> int:
        """Bytes on disk (0 for stdin and the embedded corpus): how parts are balanced."""
        return self.path.stat().st_size if self.path is not None else 0


# -- resolving paths ----------------------------------------------------------------------


def resolve_inputs(inputs: Sequence[str | os.PathLike], *, is_val: bool) -> list[Source]:
    """Sources for the given paths: files, directories (recursive, sorted), globs and "-".

    A directory written by `datasets.save_to_disk` becomes its arrow files; any other
    directory contributes its text, JSONL, parquet and compressed text/JSONL files.
    """
    if not inputs:
        return [Source("builtin", BUILTIN, is_val=is_val)]
    sources: list[Source] = []
    seen: set[str] = set()

    def add(src: Source) -> None:
        real = os.path.realpath(src.path)
        if real not in seen:
            seen.add(real)
            sources.append(src)

    for raw in inputs:
        s = os.fspath(raw)
        if s == "-":
            sources.append(Source("stdin", "<stdin>", None, is_val=is_val))
            continue
        p = Path(s)
        if p.exists():
            matches = [p]
        elif glob.has_magic(s):
            matches = [Path(m) for m in sorted(glob.glob(s, recursive=True))]
            if not matches:
                raise UserError(f"no files match {s!r}")
        else:
            raise UserError(f"input not found: {s}")
        for m in matches:
            if m.is_dir():
                found = _sources_under(m, is_val)
                if not found:
                    raise UserError(f"{m}: directory holds no text (no *.txt, *.md, *.jsonl or *.parquet files, "
                                    "compressed or not)")
                for src in found:
                    add(src)
            elif m.is_file():
                add(_file_source(m, is_val))
            else:
                raise UserError(f"{m}: not a regular file or directory")
    return sources


def _split_suffix(name: str) -> tuple[str, str | None]:
    """(the suffix that says what the content is, the compression or None)."""
    lower = name.lower()
    compression = None
    for suffix, kind in COMPRESSION_SUFFIXES.items():
        if lower.endswith(suffix):
            lower, compression = lower[: -len(suffix)], kind
            break
    return os.path.splitext(lower)[1], compression


def _file_source(p: Path, is_val: bool) -> Source:
    suffix, compression = _split_suffix(p.name)
    if suffix in PARQUET_SUFFIXES or suffix == ".arrow":
        if compression:
            raise UserError(f"{p}: compressed {suffix} files are not supported (parquet compresses internally)")
        return Source("parquet" if suffix in PARQUET_SUFFIXES else "arrow", str(p), p, None, is_val)
    kind = "jsonl" if suffix in JSONL_SUFFIXES else "text"  # a file named explicitly is text by default
    return Source(kind, str(p), p, compression, is_val)


def _sources_under(d: Path, is_val: bool) -> list[Source]:
    """Every input in a directory tree, sorted; a save_to_disk folder inside counts as its rows."""
    wanted = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
    found = []
    for root, dirs, files in os.walk(d):
        saved = _saved_dataset(Path(root), is_val)
        if saved is not None:
            found += saved
            dirs[:] = []
            continue
        dirs[:] = sorted(x for x in dirs if not x.startswith("."))
        for f in sorted(files):
            if not f.startswith(".") and _split_suffix(f)[0] in wanted:
                found.append(_file_source(_regular(Path(root) / f), is_val))
    return found


def _regular(p: Path) -> Path:
    """`p`, if it is a regular file (or a link to one): a FIFO, device or socket would block or never end."""
    try:
        mode = p.stat().st_mode
    except OSError as e:
        raise UserError(f"{p}: cannot read ({e.strerror})") from None
    if not stat.S_ISREG(mode):
        raise UserError(f"{p}: not a regular file (a FIFO, device or socket): move it out of the folder, "
                        "or name the input files")
    return p


def _saved_dataset(d: Path, is_val: bool) -> list[Source] | None:
    """The arrow files of a `datasets.save_to_disk` folder, in order; None for other folders."""
    if (d / "dataset_dict.json").is_file():
        try:
            splits = json.loads((d / "dataset_dict.json").read_text(encoding="utf-8")).get("splits", [])
        except (OSError, ValueError, AttributeError):
            splits = []
        names = ", ".join(f"{d / s}" for s in splits) or "its split folders"
        raise UserError(f"{d} holds a DatasetDict: give one split as the input, e.g. one of {names} "
                        "(and another with --val)")
    state = d / "state.json"
    if not (state.is_file() and (d / "dataset_info.json").is_file()):
        return None
    try:
        files = [f["filename"] for f in json.loads(state.read_text(encoding="utf-8"))["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{state}: not a datasets state.json (no list of _data_files)") from None
    sources = []
    for name in files:
        p = d / name
        if not p.is_file():
            raise UserError(f"{p} is missing (listed in {state})")
        sources.append(Source("arrow", str(p), p, None, is_val))
    return sources


# -- reading documents --------------------------------------------------------------------


class Reading:
    """What reading needs to know and what it counts (the counts land in the cleaning report)."""

    def __init__(self, errors: str = "strict", text_field: str = "text") -> None:
        self.errors = errors
        self.text_field = text_field
        self.bytes_in = 0  # text bytes read (after decompression): what MB/s is measured in
        self.byte_order_marks_removed = 0
        self.invalid_utf8_replaced = 0


def documents(src: Source, r: Reading, stdin: BinaryIO | None = None) -> Iterator[Iterator[str]]:
    """Yield each document of a source as an iterator over its raw (uncleaned) text chunks."""
    if src.kind == "builtin":
        try:
            from pydoc_data.topics import topics
        except ImportError:
            raise UserError("this Python has no pydoc_data module: give input files") from None
        for key in sorted(topics):
            r.bytes_in += len(topics[key].encode("utf-8"))
            yield iter([topics[key]])
        return
    if src.kind == "stdin":
        yield _decode_stream(stdin if stdin is not None else sys.stdin.buffer, src.name, r)
        return
    if src.kind in ("parquet", "arrow"):
        yield from _table_documents(src, r)
        return
    if src.kind == "hub":
        yield from src.hub.documents(r.text_field, r)
        return
    f = _open(src)
    with f:
        if src.kind == "text":
            yield _decode_stream(f, src.name, r)
        else:
            yield from _jsonl_documents(f, src.name, r)


def _open(src: Source) -> BinaryIO:
    try:  # O_NONBLOCK: a FIFO put in the file's place must not block the open
        fd = os.open(src.path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise UserError(f"{src.name}: cannot read ({e.strerror})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UserError(f"{src.name}: not a regular file (a FIFO, device or socket)")
    f = open(fd, "rb")
    if src.compression is None:
        return f
    if src.compression == "gzip":
        import gzip

        stream = gzip.GzipFile(fileobj=f)
    elif src.compression == "bzip2":
        import bz2

        stream = bz2.BZ2File(f)
    elif src.compression == "xz":
        import lzma

        stream = lzma.LZMAFile(f)
    else:
        stream = _ZstdReader(f, src.name)
    return io.BufferedReader(_Checked(stream, f, src.name, src.compression), READ_BLOCK)


def _decompress_errors() -> tuple[type[BaseException], ...]:
    import lzma
    import zlib

    errors: tuple[type[BaseException], ...] = (OSError, EOFError, zlib.error, lzma.LZMAError)
    try:
        import zstandard

        errors += (zstandard.ZstdError,)
    except ImportError:
        pass
    return errors


class _Checked(io.RawIOBase):
    """A decompressing stream whose errors (corrupt or truncated data) become one-line UserErrors."""

    def __init__(self, stream: Any, raw: BinaryIO, name: str, compression: str) -> None:
        self._stream, self._raw, self._name, self._compression = stream, raw, name, compression
        self._errors = _decompress_errors()
        self._out = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        try:
            data = self._stream.read(len(b))
        except UserError:
            raise
        except self._errors as e:
            raise UserError(f"{self._name}: corrupt {self._compression} data after {self._out:,} decompressed "
                            f"bytes ({e})") from None
        n = len(data)
        b[:n] = data
        self._out += n
        return n

    def close(self) -> None:
        self._raw.close()
        super().close()


class _ZstdReader:
    """Zstandard frames, one after another, read in blocks; a truncated last frame is an error
    (zstandard's own stream reader ends quietly there)."""

    def __init__(self, raw: BinaryIO, name: str) -> None:
        try:
            import zstandard
        except ImportError:
            raise UserError(f"{name}: reading .zst files needs zstandard: pip install 'scratchgpt[data]'") from None
        self._zstd = zstandard
        self._raw = raw
        self._dobj = zstandard.ZstdDecompressor().decompressobj()
        self._in_frame = False
        self._buf = b""

    def read(self, n: int) -> bytes:
        while not self._buf:
            chunk = self._raw.read(READ_BLOCK)
            if not chunk:
                if self._in_frame:
                    raise EOFError("the file ends inside a zstd frame (truncated)")
                return b""
            out = []
            while chunk:
                out.append(self._dobj.decompress(chunk))
                self._in_frame = not self._dobj.eof
                chunk = self._dobj.unused_data if self._dobj.eof else b""
                if self._dobj.eof:
                    self._dobj = self._zstd.ZstdDecompressor().decompressobj()
            self._buf = b"".join(out)
        data, self._buf = self._buf[:n], self._buf[n:]
        return data


# Undecodable bytes replaced since the last reset (module-level: codecs error handlers
# are registered globally, so one handler serves every file).
_replaced = [0]


def _count_replacement(e: UnicodeDecodeError) -> tuple[str, int]:
    _replaced[0] += e.end - e.start
    return "\ufffd", e.end


codecs.register_error("scratchgpt-count-replace", _count_replacement)


def _complete_utf8_prefix(buf: bytes) -> int:
    """Length of `buf` without a trailing incomplete UTF-8 sequence."""
    n = len(buf)
    for i in range(1, min(4, n) + 1):
        b = buf[n - i]
        if b & 0xC0 == 0x80:
            continue
        need = 2 if b >> 5 == 0b110 else 3 if b >> 4 == 0b1110 else 4 if b >> 3 == 0b11110 else 1
        return n - i if need > i else n
    return n


def _decode_stream(f: BinaryIO, name: str, r: Reading) -> Iterator[str]:
    """Decode a byte stream block by block, rejecting binary data and (by default) bad UTF-8."""
    errors = "scratchgpt-count-replace" if r.errors == "replace" else "strict"
    _replaced[0] = 0
    base = 0  # offset of carry[0] in the (decompressed) stream
    carry = b""
    first = True
    while True:
        block = f.read(READ_BLOCK)
        r.bytes_in += len(block)
        nul = block.find(b"\0")
        if nul >= 0:
            raise UserError(f"{name}: looks like a binary file (NUL byte at offset {base + len(carry) + nul}); "
                            "only UTF-8 text can be prepared")
        buf = carry + block
        cut = _complete_utf8_prefix(buf) if block else len(buf)
        try:
            text = buf[:cut].decode("utf-8", errors)
        except UnicodeDecodeError as e:
            raise UserError(f"{name}: invalid UTF-8 at byte offset {base + e.start} "
                            "(pass --errors replace to replace undecodable bytes)") from None
        if first and text.startswith("\ufeff"):
            text = text[1:]
            r.byte_order_marks_removed += 1
        first = False
        base += cut
        carry = buf[cut:]
        if text:
            yield text
        if not block:
            break
    bad = _replaced[0]
    if bad:
        r.invalid_utf8_replaced += bad
        if bad > _MAX_REPLACED_SHARE * max(base, 1):
            raise UserError(f"{name}: looks like a binary file ({bad} of {base} bytes are not UTF-8)")


def _jsonl_documents(f: BinaryIO, name: str, r: Reading) -> Iterator[Iterator[str]]:
    errors = "scratchgpt-count-replace" if r.errors == "replace" else "strict"
    field = r.text_field
    _replaced[0] = 0
    offset = 0
    for lineno, raw in enumerate(f, 1):
        r.bytes_in += len(raw)
        if b"\0" in raw:
            nul = offset + raw.index(b"\0")
            raise UserError(f"{name}: looks like a binary file (NUL byte at offset {nul})")
        try:
            line = raw.decode("utf-8", errors)
        except UnicodeDecodeError as e:
            raise UserError(f"{name}: invalid UTF-8 at byte offset {offset + e.start} (line {lineno}; "
                            "pass --errors replace to replace undecodable bytes)") from None
        offset += len(raw)
        if lineno == 1 and line.startswith("\ufeff"):
            line = line[1:]
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise UserError(f"{name}:{lineno}: invalid JSON ({e})") from None
        text = obj.get(field) if isinstance(obj, dict) else None
        if not isinstance(text, str):
            null = isinstance(obj, dict) and field in obj and text is None
            what = "is null" if null else "is missing or not a string"
            raise UserError(f"{name}:{lineno}: the text field {field!r} {what} (choose the field with --text-field)")
        yield iter([text])
    r.invalid_utf8_replaced += _replaced[0]


def _pyarrow(name: str):
    try:
        import pyarrow
        import pyarrow.compute  # noqa: F401
        import pyarrow.ipc  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise UserError(f"{name}: reading parquet and arrow files needs pyarrow: "
                        "pip install 'scratchgpt[data]'") from None
    return pyarrow


def _table_documents(src: Source, r: Reading) -> Iterator[Iterator[str]]:
    """Rows of a parquet file or an arrow stream file (datasets.save_to_disk), one document each,
    read in record batches of the text column alone."""
    pa = _pyarrow(src.name)
    field = r.text_field
    what = "parquet" if src.kind == "parquet" else "arrow"
    try:
        if src.kind == "parquet":
            # buffer_size: column chunks are read in buffered pieces, not whole into memory.
            pf = pa.parquet.ParquetFile(src.path, buffer_size=READ_BLOCK)
            schema, close = pf.schema_arrow, pf.close
            _check_text_column(schema, field, src.name)
            batches = pf.iter_batches(batch_size=_BATCH_ROWS, columns=[field])
        else:
            f = pa.OSFile(str(src.path))  # not memory-mapped: mapped pages would count as resident memory
            close = f.close
            try:
                stream = pa.ipc.open_stream(f)  # what datasets.save_to_disk writes
                schema, batches = stream.schema, iter(stream)
            except pa.ArrowInvalid:
                f.seek(0)
                whole = pa.ipc.open_file(f)  # the random-access arrow file format
                schema = whole.schema
                batches = (whole.get_batch(i) for i in range(whole.num_record_batches))
            _check_text_column(schema, field, src.name)
    except UserError:
        raise
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{src.name}: not a readable {what} file ({first_line(e)})") from None
    try:
        index = schema.get_field_index(field)
        row = 0
        while True:
            try:
                batch = next(batches, None)
            except (pa.ArrowException, OSError) as e:
                raise UserError(f"{src.name}: unreadable {what} data after row {row} ({first_line(e)})") from None
            if batch is None:
                break
            col = batch.column(0 if src.kind == "parquet" else index)
            if col.null_count:
                i = int(pa.compute.index(col.is_null(), True).as_py())
                raise UserError(f"{src.name}: row {row + i}: the text field {field!r} is null (rows count from 0)")
            r.bytes_in += int(pa.compute.sum(pa.compute.binary_length(col)).as_py() or 0)
            try:
                texts = col.to_pylist()
            except UnicodeDecodeError:
                raise UserError(f"{src.name}: invalid UTF-8 in rows {row} to {row + len(col) - 1}") from None
            for text in texts:
                yield iter([text])
            row += len(col)
    finally:
        close()


def _check_text_column(schema, field: str, name: str) -> None:
    import pyarrow as pa

    if field not in schema.names:
        cols = ", ".join(schema.names[:20]) + (", ..." if len(schema.names) > 20 else "")
        raise UserError(f"{name}: no column {field!r} (columns: {cols}; choose one with --text-field)")
    typ = schema.field(field).type
    if not (pa.types.is_string(typ) or pa.types.is_large_string(typ) or str(typ) == "string_view"):
        raise UserError(f"{name}: column {field!r} holds {typ}, not text (choose another with --text-field)")


