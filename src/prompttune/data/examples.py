"""Rows from TSV/CSV/JSONL files, lists of dicts or `datasets.Dataset` become `Example`s."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..artifacts import write_file_atomically
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


def load_examples(
    source: Any,
    label_field: str | None = None,
    require_label: bool = True,
    label_columns: Sequence[str] | None = None,
) -> list[Example]:
    """Load examples from a path, a directory's train split, a list of dicts/strings, or a `datasets.Dataset`.

    Args:
        label_field: the column holding the label (a value, or a list of values for multi-label data).
        label_columns: multi-label data as one 0/1 column per label: the column names, or `["all"]` for every
            column whose values are all 0/1 (see `detect_label_columns`). The label becomes the tuple of the columns
            set to 1, in column order; every other column is a text field.

    Raises:
        PromptTuneError: missing or empty file, unknown format, missing label column, malformed row or label value.
    """
    if isinstance(source, (list, tuple)) and all(isinstance(e, Example) for e in source):
        return list(source)
    records, where, lines = _records(source)
    if label_columns:
        return _from_binary_columns(records, where, list(label_columns), require_label, lines)
    return _from_records(records, where, label_field, require_label, lines=lines)


def detect_label_columns(source: Any) -> list[str]:
    """The columns of `source` whose every value is 0 or 1 (ints, bools, or the strings "0"/"1"), in column order.

    Raises:
        PromptTuneError: no such column.
    """
    records, where, _ = _records(source)
    return _binary_columns(records, where)


def _binary_columns(records: list[Mapping[str, Any]], where: str) -> list[str]:
    columns = [c for c in records[0] if all(_as_bit(r.get(c, None)) is not None for r in records)]
    if not columns:
        raise PromptTuneError(
            f"{where}: label_columns 'all' found no column of 0/1 values; columns are {list(records[0])}"
        )
    return columns


def _records(source: Any) -> tuple[list[Mapping[str, Any]], str, list[int] | None]:
    """Raw records, a name for messages, and the file line of each record (None for in-memory data)."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_dir():
            split = find_split(path, "train")
            if split is None:
                raise PromptTuneError(f"{path}: directory holds no train.tsv/.csv/.jsonl")
            path = split
        records, lines = _read_file(path)
        return [_flatten(r) for r in records], str(path), lines
    if hasattr(source, "to_list"):  # datasets.Dataset
        source = source.to_list()
    if isinstance(source, Iterable):
        records = [{"text": r} if isinstance(r, str) else r for r in source]
        if not records:
            raise PromptTuneError("<data>: no examples")
        if not all(isinstance(r, Mapping) for r in records):
            raise PromptTuneError("<data>: expected a dict of columns (or a plain string) per example")
        return [_flatten(r) for r in records], "<data>", None
    raise PromptTuneError(f"data: expected a file path, directory, list of dicts or Dataset, got {type(source)}")


def _flatten(record: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested JSON objects become dotted columns (`{"meta": {"title": ...}}` -> `meta.title`), so a template can name
    `{meta.title}` and `label_field` can be `meta.label`; lists stay values (multi-label labels)."""
    flat: dict[str, Any] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


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
    # A file object, not a list of lines: a quoted field may span lines, and its newline belongs to the text.
    reader = csv.DictReader(io.StringIO(text), delimiter=delimiter)
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
        if require_label:
            raise PromptTuneError(f"{where}: label column {label_field!r} not found; columns are {columns}")
        label_col = None  # unlabelled data (texts to predict) need not carry the label column
    if label_col is None and require_label:
        header = " (the first line of a TSV/CSV file is its header)" if where.lower().endswith((".tsv", ".csv")) else ""
        raise PromptTuneError(
            f"{where}: no label column; expected one of {LABEL_COLUMNS} (or set label_field); columns are "
            f"{columns}{header}"
        )
    examples = []
    for i, rec in enumerate(records):
        line = f"{where}:{lines[i] if lines else i + 1}"
        fields = {k: _as_text(v) for k, v in rec.items() if k != label_col}
        label = _as_label(rec.get(label_col), line, label_col) if label_col else None
        if require_label and label is None:
            raise PromptTuneError(f"{line}: missing value in label column {label_col!r}")
        examples.append(Example(fields=fields, label=label, source=line))
    return examples


def _from_binary_columns(
    records: list[Mapping[str, Any]],
    where: str,
    label_columns: list[str],
    require_label: bool,
    lines: list[int] | None,
) -> list[Example]:
    """Multi-label rows given as one 0/1 column per label."""
    if label_columns == ["all"]:
        try:
            label_columns = _binary_columns(records, where)
        except PromptTuneError:
            if require_label:
                raise
            label_columns = []  # unlabelled data (prediction inputs): no 0/1 column is fine
    present = set(records[0])
    missing = [c for c in label_columns if c not in present]
    if missing and require_label:
        raise PromptTuneError(f"{where}: label column(s) {missing} not found; columns are {list(records[0])}")
    examples = []
    for i, rec in enumerate(records):
        line = f"{where}:{lines[i] if lines else i + 1}"
        fields = {k: _as_text(v) for k, v in rec.items() if k not in label_columns}
        label: tuple[str, ...] | None = None
        if require_label or any(c in rec for c in label_columns):  # unlabelled rows may omit every label column
            label = tuple(c for c in label_columns if _bit(rec, c, line))
        examples.append(Example(fields=fields, label=label, source=line))
    return examples


def _bit(record: Mapping[str, Any], column: str, line: str) -> bool:
    if column not in record:
        raise PromptTuneError(f"{line}: label column {column!r} is missing")
    bit = _as_bit(record[column])
    if bit is None:
        raise PromptTuneError(f"{line}: label column {column!r}: expected 0 or 1, got {record[column]!r}")
    return bit


def _as_bit(value: Any) -> bool | None:
    """0/1 (int, float, bool or their strings) -> bool; anything else -> None."""
    if isinstance(value, str):
        value = value.strip()
        return {"0": False, "1": True, "0.0": False, "1.0": True}.get(value)
    if isinstance(value, (bool, int, float)) and value in (0, 1):
        return bool(value)
    return None


def _as_text(value: Any) -> str:
    return "" if value is None else str(value).replace("\r", "")


def _as_label(value: Any, line: str = "<data>", column: str | None = None) -> str | tuple[str, ...] | None:
    """A label value, or a tuple for a list-valued field (a JSON list, or a CSV/TSV cell holding one)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str) and value.strip().startswith("[") and value.strip().endswith("]"):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass  # a label that merely looks like a list stays a string
    if isinstance(value, (list, tuple)):
        bad = [v for v in value if not isinstance(v, (str, int, float, bool)) or (isinstance(v, str) and not v.strip())]
        if bad:
            raise PromptTuneError(
                f"{line}: label column {column!r}: expected a list of label names, got the item {bad[0]!r}"
            )
        return tuple(dict.fromkeys(str(_as_label(v)) for v in value))  # repeats of a label mean the label once
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


def write_examples(path: str | Path, examples: Sequence[Example], label_column: str = "label") -> Path:
    """Write examples as TSV/CSV (header row) or JSONL, chosen by suffix; atomically (temp file + rename)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".tsv", ".csv", ".jsonl"):
        raise PromptTuneError(f"{path}: unknown output format {suffix!r}; expected .tsv, .csv or .jsonl")
    columns = list(dict.fromkeys(c for ex in examples for c in ex.fields))
    labelled = any(ex.label is not None for ex in examples)
    records = []
    for ex in examples:
        rec: dict[str, Any] = {c: ex.fields.get(c, "") for c in columns}
        if labelled:
            rec[label_column] = list(ex.label) if isinstance(ex.label, tuple) else ex.label
        records.append(rec)
    if suffix == ".jsonl":
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    else:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(records[0]), delimiter="\t" if suffix == ".tsv" else ",")
        writer.writeheader()
        writer.writerows({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()} for r in records)
        text = buf.getvalue()
    return write_file_atomically(path, text)
