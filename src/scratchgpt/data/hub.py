"""`prepare --hf-dataset NAME --hf-config C --split S`: the rows of a Hugging Face dataset as documents.

The dataset is streamed through the `datasets` library (`load_dataset(..., streaming=True)`): rows
arrive one by one (the text column alone) and are cleaned, split and tokenized as any local input, so
memory stays bounded however large the dataset is. NAME is a hub dataset (ORG/NAME, read from the
hub, or from huggingface_hub's local cache when HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set) or a
local folder laid out as the hub lays one out (data files, and a README.md whose `configs:` header
names the configurations and splits).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterator, Optional

from .. import UserError

_MAX_MESSAGE = 300


@dataclass(frozen=True)
class HubDataset:
    """One split of a dataset, named as `--hf-dataset`, `--hf-config`, `--split`, `--hf-revision` name it."""

    name: str
    config: Optional[str] = None
    split: str = "train"
    revision: Optional[str] = None

    @property
    def label(self) -> str:
        """How messages name it: NAME[/CONFIG]:SPLIT."""
        return self.name + (f"/{self.config}" if self.config else "") + f":{self.split}"

    def documents(self, text_field: str, reading: Any) -> Iterator[Iterator[str]]:
        """Each row's `text_field` as one document; `reading.bytes_in` counts its UTF-8 bytes."""
        rows = self._open()
        features = getattr(rows, "features", None)
        if features is not None:  # known up front (parquet, or declared): check once, decode that column only
            _check_feature(features, text_field, self.label)
            rows = rows.select_columns([text_field]) if hasattr(rows, "select_columns") else rows
        for i, row in enumerate(self._rows(rows)):
            text = row.get(text_field)
            if not isinstance(text, str):
                what = "is null" if text is None else "is missing" if text_field not in row else \
                    f"holds {type(text).__name__}, not text"
                raise UserError(f"{self.label}: row {i}: the text field {text_field!r} {what} "
                                "(rows count from 0; choose the field with --text-field)")
            reading.bytes_in += len(text.encode("utf-8", "surrogatepass"))
            yield iter([text])

    def _open(self):
        try:
            import datasets
        except ImportError:
            raise UserError("--hf-dataset needs the datasets library: pip install datasets "
                            "(or scratchgpt[datasets])") from None
        path, revision = self.name, self.revision
        if not os.path.isdir(self.name) and datasets.config.HF_HUB_OFFLINE:
            path, revision = self._cached_snapshot(), None  # datasets itself refuses hub names offline
        try:
            return datasets.load_dataset(path, self.config, split=self.split, revision=revision, streaming=True)
        except Exception as e:  # the library's many kinds (not found, bad split, no network): one line each
            offline = isinstance(e, ConnectionError)
            hint = " (no network? with HF_HUB_OFFLINE=1 the local cache is read)" if offline else ""
            raise UserError(f"--hf-dataset {self.label}: {_first_line(e)}{hint}") from None

    def _cached_snapshot(self) -> str:
        """The dataset's folder in huggingface_hub's cache (what `hf download --repo-type dataset` fills)."""
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            return snapshot_download(self.name, repo_type="dataset", revision=self.revision, local_files_only=True)
        except LocalEntryNotFoundError:
            raise UserError(f"--hf-dataset {self.name}: not in the local Hugging Face cache, and HF_HUB_OFFLINE "
                            "or HF_DATASETS_OFFLINE is set: download it first (hf download --repo-type dataset "
                            f"{self.name}) or go online") from None
        except Exception as e:  # a name the hub would refuse ('a/b/c'), an unreadable cache
            raise UserError(f"--hf-dataset {self.name}: {_first_line(e)}") from None

    def _rows(self, rows) -> Iterator[dict]:
        """The rows; a failure while streaming (network, a damaged file) is one line naming the row."""
        it = iter(rows)
        n = 0
        while True:
            try:
                row = next(it, None)
            except Exception as e:
                raise UserError(f"{self.label}: reading failed after row {n} ({_first_line(e)})") from None
            if row is None:
                return
            n += 1
            yield row


def _check_feature(features, field: str, label: str) -> None:
    names = list(features)
    if field not in names:
        cols = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
        raise UserError(f"{label}: no column {field!r} (columns: {cols}; choose one with --text-field)")
    dtype = getattr(features[field], "dtype", None)
    if dtype not in ("string", "large_string", "string_view"):
        raise UserError(f"{label}: column {field!r} holds {dtype or type(features[field]).__name__}, not text "
                        "(choose another with --text-field)")


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    text = (lines[0] if lines else "") or type(e).__name__
    return text if len(text) <= _MAX_MESSAGE else text[:_MAX_MESSAGE] + "..."
