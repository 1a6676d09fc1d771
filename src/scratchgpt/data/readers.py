"""Reading labelled and conversational files for fine-tuning and evaluation.

Data files are CSV/TSV (header row) or JSONL (one object a line), chosen by extension; every
error names the file and line: a ragged CSV row, a non-JSON line, a missing column, an empty
label, a malformed conversation.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .. import UserError, utils


def read_text(path: str | os.PathLike, encoding: str = "utf-8") -> str:
    """A whole text file; a missing, unreadable or non-UTF-8 file, or one that is not a regular file (a FIFO
    would block, /dev/zero never ends), is a one-line error naming it."""
    return utils.read_text(path, encoding)


def read_rows(path: str | os.PathLike) -> list[tuple[int, dict]]:
    """(line number, row) for each record of a .csv/.tsv (header row) or .jsonl/.ndjson file.

    Errors name the file and line: a ragged CSV row, a non-JSON line, a line that is not a
    JSON object. Blank lines are skipped.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    suffix = path.suffix.lower()
    raw = read_text(path, encoding="utf-8-sig")  # -sig: a byte-order mark is not part of the first column's name
    if suffix in (".jsonl", ".ndjson"):
        return _jsonl_rows(path, raw)
    if suffix in (".csv", ".tsv"):
        return _csv_rows(path, raw, delimiter="\t" if suffix == ".tsv" else ",")
    raise UserError(f"{path}: unknown format {suffix or '(no extension)'!r}; use .csv, .tsv or .jsonl")


def _jsonl_rows(path: Path, raw: str) -> list[tuple[int, dict]]:
    rows = []
    for i, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{i}: not valid JSON ({e.msg}, column {e.colno})") from None
        if not isinstance(obj, dict):
            raise UserError(f"{path}:{i}: expected a JSON object, got {type(obj).__name__}")
        rows.append((i, obj))
    return rows


def _csv_rows(path: Path, raw: str, delimiter: str) -> list[tuple[int, dict]]:
    reader = csv.reader(io.StringIO(raw, newline=""), delimiter=delimiter)
    rows, header, start = [], None, 1
    try:
        for record in reader:
            line, start = start, reader.line_num + 1  # a quoted field may span lines: report the first
            if not record or (len(record) == 1 and not record[0].strip()):
                continue
            if header is None:
                header = _csv_header(path, line, record)
                continue
            if len(record) != len(header):
                raise UserError(f"{path}:{line}: row has {len(record)} fields, the header has {len(header)}")
            rows.append((line, dict(zip(header, record))))
    except csv.Error as e:
        raise UserError(f"{path}:{reader.line_num}: malformed CSV ({e})") from None
    if header is None:
        raise UserError(f"{path}: empty file (expected a header row)")
    return rows


def _csv_header(path: Path, line: int, record: list[str]) -> list[str]:
    header = [h.strip() for h in record]
    dup = sorted({h for h in header if header.count(h) > 1})
    if dup:
        raise UserError(f"{path}:{line}: duplicate column name(s) {', '.join(map(repr, dup))}")
    return header


def _field(path: Path, line: int, row: dict, name: str) -> Any:
    if name not in row:
        raise UserError(f"{path}:{line}: no field {name!r} (fields: {', '.join(map(repr, row))})")
    return row[name]


def _check_columns(path: Path, rows: list[tuple[int, dict]], names: Sequence[str]) -> None:
    """A CSV's missing column is one error naming the file, not one per row."""
    if path.suffix.lower() in (".csv", ".tsv") and rows:
        have = list(rows[0][1])
        for name in names:
            if name not in have:
                raise UserError(f"{path}: no column {name!r} (columns: {', '.join(map(repr, have))})")


def read_texts(path: str | os.PathLike, text_field: str) -> tuple[list[str], list[str]]:
    """(texts, where) from a CSV/JSONL file, or every non-blank line of a .txt file."""
    path = Path(path)
    if path.suffix.lower() == ".txt":
        lines = read_text(path).splitlines()
        pairs = [(i, ln) for i, ln in enumerate(lines, 1) if ln.strip()]
        return [t for _, t in pairs], [f"{path}:{i}" for i, _ in pairs]
    rows = read_rows(path)
    _check_columns(path, rows, [text_field])
    texts, wheres = [], []
    for line, row in rows:
        text = _field(path, line, row, text_field)
        if not isinstance(text, str):
            raise UserError(f"{path}:{line}: field {text_field!r} must be a string, got {type(text).__name__}")
        if not text.strip():
            raise UserError(f"{path}:{line}: empty text in field {text_field!r}")
        texts.append(text)
        wheres.append(f"{path}:{line}")
    if not texts:
        raise UserError(f"{path}: no rows")
    return texts, wheres


def read_labelled(path: str | os.PathLike, text_field: str = "text",
                  label_field: str = "label") -> tuple[list[str], list[str], list[str]]:
    """(texts, labels, where) from a CSV/JSONL file. Labels become strings; an empty one is an error."""
    path = Path(path)
    rows = read_rows(path)
    _check_columns(path, rows, [text_field, label_field])
    texts, wheres = read_texts(path, text_field)
    labels = []
    for line, row in rows:
        label = _field(path, line, row, label_field)
        if isinstance(label, (dict, list)):
            raise UserError(f"{path}:{line}: label must be a string or number, got {type(label).__name__}")
        label = "" if label is None else str(label).strip()
        if not label:
            raise UserError(f"{path}:{line}: empty label in field {label_field!r}")
        labels.append(label)
    return texts, labels, wheres


@dataclass
class SFTExample:
    """One conversation: (role, content) turns; system first if any, then user/assistant alternating."""

    turns: list[tuple[str, str]]
    where: str

    @property
    def context(self) -> list[tuple[str, str]]:
        """Every turn before the final assistant reply: what a model is prompted with."""
        return self.turns[:-1]

    @property
    def reference(self) -> str:
        return self.turns[-1][1]


def read_sft(path: str | os.PathLike) -> list[SFTExample]:
    """{"prompt", "response"} rows (JSONL or CSV), or JSONL {"messages": [{"role", "content"}, ...]}."""
    path = Path(path)
    rows = read_rows(path)
    out = []
    for line, row in rows:
        where = f"{path}:{line}"
        if "messages" in row:
            turns = _messages(row["messages"], where)
        elif "prompt" in row and "response" in row:
            p, r = row["prompt"], row["response"]
            if not isinstance(p, str) or not isinstance(r, str):
                raise UserError(f"{where}: \"prompt\" and \"response\" must be strings")
            if not r:
                raise UserError(f"{where}: empty response")
            turns = [("user", p), ("assistant", r)]
        else:
            raise UserError(f"{where}: expected \"prompt\" and \"response\" fields, or \"messages\" "
                            f"(fields: {', '.join(map(repr, row))})")
        out.append(SFTExample(turns, where))
    if not out:
        raise UserError(f"{path}: no examples")
    return out


def _messages(msgs: Any, where: str) -> list[tuple[str, str]]:
    if not isinstance(msgs, list) or not msgs:
        raise UserError(f"{where}: \"messages\" must be a non-empty list")
    turns = []
    for k, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise UserError(f"{where}: message {k} needs string \"role\" and \"content\"")
        turns.append((m["role"], m["content"]))
    expect = "user"
    for k, (role, _) in enumerate(turns):
        if role == "system" and k == 0:
            continue
        if role not in ("user", "assistant", "system"):
            raise UserError(f"{where}: message {k} has unknown role {role!r} (system, user, assistant)")
        if role != expect:
            raise UserError(f"{where}: message {k} is {role!r}, expected {expect!r} "
                            "(system first if any, then user and assistant alternating)")
        expect = "assistant" if role == "user" else "user"
    if turns[-1][0] != "assistant":
        raise UserError(f"{where}: the last message must be the assistant's (the reply to learn)")
    return turns
