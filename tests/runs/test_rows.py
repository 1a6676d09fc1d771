"""metrics.jsonl / samples.jsonl / trials.jsonl (runs/rows.py): one rule for a torn last line, everywhere."""

from __future__ import annotations

import json

import pytest

from scratchgpt import UserError
from scratchgpt.runs.rows import append_row, cut_back, drop_torn_tail, read_rows


def rows_file(tmp_path, text: bytes):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(text)
    return path


def test_a_torn_last_line_is_dropped_by_readers_and_cut_by_writers(tmp_path):
    path = rows_file(tmp_path, b'{"step": 1}\n{"step": 2}\n{"ste')
    assert read_rows(path) == [{"step": 1}, {"step": 2}] == read_rows(path, strict=True)
    assert drop_torn_tail(path) and path.read_bytes() == b'{"step": 1}\n{"step": 2}\n'
    append_row(path, {"step": 3, "loss": float("nan")})  # NaN is written as null, said in "nonfinite"
    assert read_rows(path)[-1] == {"step": 3, "loss": None, "nonfinite": {"loss": "nan"}}
    assert not drop_torn_tail(path)


def test_a_whole_last_row_without_its_newline_is_kept(tmp_path):
    path = rows_file(tmp_path, b'{"step": 1}\n{"step": 2}')
    assert read_rows(path) == [{"step": 1}, {"step": 2}]
    cut_back(path, 5)
    assert path.read_bytes() == b'{"step": 1}\n{"step": 2}\n'


def test_damage_before_the_last_line_is_skipped_for_display_and_refused_for_resume(tmp_path):
    path = rows_file(tmp_path, b'{"step": 1}\n\xff\xfe garbage\n[1, 2]\n{"step": 2}\n')
    assert read_rows(path) == [{"step": 1}, {"step": 2}]
    with pytest.raises(UserError, match="line 2 is not a JSON object"):
        read_rows(path, strict=True)
    before = path.read_bytes()
    with pytest.raises(UserError, match="line 2"):
        cut_back(path, 1)
    assert path.read_bytes() == before


@pytest.mark.parametrize("step", [-5, 1.5, True, "3", None])
def test_cut_back_checks_the_step_before_changing_anything(tmp_path, step):
    path = rows_file(tmp_path, b'{"step": 1}\n{"step": 2}\n')
    with pytest.raises(UserError, match="non-negative integer"):
        cut_back(path, step)
    assert path.read_bytes() == b'{"step": 1}\n{"step": 2}\n'


def test_cut_back_keeps_the_rows_up_to_the_step_byte_for_byte(tmp_path):
    lines = [json.dumps({"step": s, "x": 0.1 * s}) for s in range(5)]
    path = rows_file(tmp_path, ("\n".join(lines) + "\n").encode())
    cut_back(path, 2)
    assert path.read_text() == "\n".join(lines[:3]) + "\n"
    cut_back(tmp_path / "missing.jsonl", 2)  # nothing to cut
    assert not (tmp_path / "missing.jsonl").exists()
