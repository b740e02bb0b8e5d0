"""Rows from TSV/CSV/JSONL files, lists of dicts or `datasets.Dataset` become `Example`s."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ..errors import PromptTuneError
from ..types import Example

LABEL_COLUMNS = ("label", "labels", "target", "answer")
SUFFIXES = (".tsv", ".csv", ".jsonl", ".json")


def find_split(directory: str | Path, split: str) -> Path | None:
    """`dir/<split>.tsv|csv|jsonl|json`, or None."""
    for suffix in SUFFIXES:
        path = Path(directory) / f"{split}{suffix}"
        if path.is_file():
            return path
    return None


def load_examples(source: Any, label_field: str | None = None, require_label: bool = True) -> list[Example]:
    """Load examples from a path, a directory's train split, a list of dicts/strings, or a `datasets.Dataset`.

    Raises:
        PromptTuneError: missing or empty file, unknown format, missing label column, malformed row.
    """
    if isinstance(source, (list, tuple)) and all(isinstance(e, Example) for e in source):
        return list(source)
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_dir():
            split = find_split(path, "train")
            if split is None:
                raise PromptTuneError(f"{path}: directory holds no train.tsv/.csv/.jsonl")
            path = split
        records, lines = _read_file(path)
        return _from_records(records, str(path), label_field, require_label, lines=lines)
    if hasattr(source, "to_list"):  # datasets.Dataset
        source = source.to_list()
    if isinstance(source, Iterable):
        records = [{"text": r} if isinstance(r, str) else r for r in source]
        return _from_records(records, "<data>", label_field, require_label)
    raise PromptTuneError(f"data: expected a file path, directory, list of dicts or Dataset, got {type(source)}")


def _read_file(path: Path) -> tuple[list[dict[str, Any]], list[int]]:
    """Records and the file line each one starts on (for error messages)."""
    if not path.exists():
        raise PromptTuneError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise PromptTuneError(f"{path}: unknown data format {suffix!r}; expected one of {', '.join(SUFFIXES)}")
    text = path.read_text(encoding="utf-8-sig")
    if not text.strip():
        raise PromptTuneError(f"{path}: file is empty")
    if suffix in (".jsonl", ".json"):
        return _read_json(path, text)
    delimiter = "\t" if suffix == ".tsv" else ","
    reader = csv.DictReader(text.splitlines(), delimiter=delimiter)
    rows, lines = [], []
    for row in reader:
        if None in row or any(v is None for v in row.values()):
            raise PromptTuneError(
                f"{path}:{reader.line_num}: expected {len(reader.fieldnames or [])} columns "
                f"({', '.join(reader.fieldnames or [])})"
            )
        rows.append({k.strip(): v for k, v in row.items()})
        lines.append(reader.line_num)  # counts blank lines too (DictReader skips them)
    if not rows:
        raise PromptTuneError(f"{path}: no data rows after the header")
    return rows, lines


def _read_json(path: Path, text: str) -> tuple[list[dict[str, Any]], list[int]]:
    stripped = text.lstrip()
    if path.suffix == ".json" and stripped.startswith("["):
        records = json.loads(text)
        lines = list(range(1, len(records) + 1))  # "line" = record number in a JSON array
    else:
        records, lines = [], []
        for i, line in enumerate(text.splitlines()):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
                lines.append(i + 1)
            except json.JSONDecodeError as err:
                raise PromptTuneError(f"{path}:{i + 1}: not valid JSON ({err.msg})") from None
    for rec, line in zip(records, lines, strict=True):
        if not isinstance(rec, dict):
            raise PromptTuneError(f"{path}:{line}: expected a JSON object per line, got {type(rec).__name__}")
    return records, lines


def _from_records(
    records: list[Mapping[str, Any]],
    where: str,
    label_field: str | None,
    require_label: bool,
    lines: list[int] | None = None,
) -> list[Example]:
    if not records:
        raise PromptTuneError(f"{where}: no examples")
    columns = list(records[0].keys())
    label_col = label_field or next((c for c in LABEL_COLUMNS if c in columns), None)
    if label_field and label_field not in columns:
        raise PromptTuneError(f"{where}: label column {label_field!r} not found; columns are {columns}")
    if label_col is None and require_label:
        raise PromptTuneError(
            f"{where}: no label column; expected one of {LABEL_COLUMNS} (or set label_field); columns are {columns}"
        )
    examples = []
    for i, rec in enumerate(records):
        line = f"{where}:{lines[i] if lines else i + 1}"
        fields = {k: _as_text(v) for k, v in rec.items() if k != label_col}
        label = _as_label(rec.get(label_col)) if label_col else None
        if require_label and label is None:
            raise PromptTuneError(f"{line}: missing value in label column {label_col!r}")
        examples.append(Example(fields=fields, label=label, source=line))
    return examples


def _as_text(value: Any) -> str:
    return "" if value is None else str(value).replace("\r", "")


def _as_label(value: Any) -> str | tuple[str, ...] | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, (list, tuple)):
        return tuple(str(v) for v in value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()
