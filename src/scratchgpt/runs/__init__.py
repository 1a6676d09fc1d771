"""The run directory and every other folder scratchgpt writes, in one place.

    files.py    every file and folder name, defined once
    guard.py    the data-safety rules: what --out, --force and --output may create or replace (the marker)
    staging.py  the staged writer: a temporary folder beside --out, renamed into place when complete
    rows.py     metrics.jsonl, samples.jsonl, trials.jsonl: append, read, cut back (one rule for a torn line)
    log.py      RunLog: a training run's metrics, samples, TensorBoard and loss.png
    kind.py     the run kind (lm, sft, classifier; LoRA or not), one vocabulary for every command
    info.py     `scratchgpt info RUN`
    config.py   RUN/config.json: written and read here (each checkpoint keeps a hashed copy)

Only files, guard, staging and rows are imported here: they need nothing beyond the standard library,
so the checkpoint store and the tokenizer can take their names from files.py without a cycle.
"""

from .files import MARKER_FILE
from .guard import artifact_kind, check_out, check_output_file, write_marker, write_output_file
from .rows import append_row, cut_back, read_rows, write_rows
from .staging import staged

__all__ = ["MARKER_FILE", "append_row", "artifact_kind", "check_out", "check_output_file", "cut_back", "read_rows",
           "staged", "write_marker", "write_output_file", "write_rows"]
