"""Every file name of a run, data dir or search is spelled once, in runs/files.py (issue 21: "every file name,
defined once"); the rest of the package takes the constant."""

from __future__ import annotations

import ast
from pathlib import Path

import scratchgpt
from scratchgpt.runs import files

PACKAGE = Path(scratchgpt.__file__).parent
# Hugging Face's own formats happen to use some of the same names (a transformers folder's config.json,
# model.safetensors and tokenizer.json; a datasets folder's state.json): those are the formats' names, not ours
THEIR_FORMATS = {"hf": None, "export.py": {"config.json"}, "data/inputs.py": {"state.json"}}


def our_file_names() -> set[str]:
    names = {v for k, v in vars(files).items() if k.isupper() and isinstance(v, str)} | set(files.SPLIT_FILES)
    return {n for n in names if "." in n.strip(".")} | {files.eval_file("lm"), files.CHECKPOINTS}


def test_file_names_are_spelled_only_in_runs_files():
    names, found = our_file_names(), []
    for path in sorted(PACKAGE.rglob("*.py")):
        where = path.relative_to(PACKAGE).as_posix()
        allowed = THEIR_FORMATS.get(where, THEIR_FORMATS.get(where.split("/")[0], set()))
        if where == "runs/files.py" or allowed is None:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and node.value in names and node.value not in allowed:
                found.append(f"{where}:{node.lineno}: {node.value!r}")
    assert found == []
