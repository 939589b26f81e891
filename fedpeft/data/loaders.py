"""Loaders for real site data: CSV, JSONL and a ``datasets`` dataset saved to disk.

Every error names the file, the row/line and the field. Labels are mapped through one fixed
label list shared by all sites, so no site can silently renumber classes.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Sequence
from pathlib import Path


class DataLoadError(ValueError):
    """Site data cannot be used; the message names file, row/line and field."""


def _read_text(path: Path) -> str:
    if not path.exists():
        raise DataLoadError(f"{path}: file not found")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataLoadError(f"{path}: line {line}: not UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start})") from None
    if not text.strip():
        raise DataLoadError(f"{path}: file is empty")
    return text


def _rows_csv(path: Path, text: str, text_col: str, label_col: str) -> Iterable[tuple[str, object, object]]:
    reader = csv.DictReader(io.StringIO(text))
    header = reader.fieldnames or []
    for col in (text_col, label_col):
        if col not in header:
            raise DataLoadError(f"{path}: header: missing column {col!r} (columns: {header})")
    for row in reader:
        yield f"row {reader.line_num}", row.get(text_col), row.get(label_col)


def jsonl_objects(path: Path, text: str) -> Iterable[tuple[int, dict]]:
    """(line number, object) for each non-empty line; a line that is not a JSON object is an error naming it."""
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataLoadError(f"{path}: line {i}: invalid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise DataLoadError(f"{path}: line {i}: expected a JSON object, got {type(obj).__name__}")
        yield i, obj


def _rows_jsonl(path: Path, text: str, text_col: str, label_col: str) -> Iterable[tuple[str, object, object]]:
    for i, obj in jsonl_objects(path, text):
        for col in (text_col, label_col):
            if col not in obj:
                raise DataLoadError(f"{path}: line {i}: missing field {col!r}")
        yield f"line {i}", obj[text_col], obj[label_col]


def _rows_dataset(path: Path, text_col: str, label_col: str) -> Iterable[tuple[str, object, object]]:
    from datasets import load_from_disk

    ds = load_from_disk(str(path))
    if hasattr(ds, "keys"):  # DatasetDict: take 'train'
        if "train" not in ds:
            raise DataLoadError(f"{path}: dataset dict has no 'train' split (splits: {list(ds.keys())})")
        ds = ds["train"]
    for col in (text_col, label_col):
        if col not in ds.column_names:
            raise DataLoadError(f"{path}: missing column {col!r} (columns: {ds.column_names})")
    if len(ds) == 0:
        raise DataLoadError(f"{path}: dataset is empty")
    names = getattr(ds.features[label_col], "names", None)
    for i, row in enumerate(ds):
        lab = row[label_col]
        yield f"row {i}", row[text_col], names[lab] if names and isinstance(lab, int) else lab


def load_labelled_texts(
    path: str | Path, *, labels: Sequence[str], text_column: str = "text", label_column: str = "label"
) -> tuple[list[str], list[int]]:
    """Read (text, label) pairs; labels given as names (or as their index in ``labels``)."""
    path = Path(path)
    if path.is_dir():
        rows = _rows_dataset(path, text_column, label_column)
    else:
        text = _read_text(path)
        suffix = path.suffix.lower()
        if suffix == ".csv":
            rows = _rows_csv(path, text, text_column, label_column)
        elif suffix in (".jsonl", ".json"):
            rows = _rows_jsonl(path, text, text_column, label_column)
        else:
            raise DataLoadError(f"{path}: unsupported file type {suffix!r} (use .csv, .jsonl or a saved dataset folder)")
    index = {name: i for i, name in enumerate(labels)}
    texts: list[str] = []
    ys: list[int] = []
    for where, txt, lab in rows:
        if txt is None or not str(txt).strip():
            raise DataLoadError(f"{path}: {where}: field {text_column!r} is empty")
        key = str(lab).strip() if lab is not None else ""
        if key in index:
            y = index[key]
        elif isinstance(lab, int) and not isinstance(lab, bool) and 0 <= lab < len(labels):
            y = lab
        else:
            raise DataLoadError(
                f"{path}: {where}: field {label_column!r}: unknown label {lab!r} (known: {list(labels)})"
            )
        texts.append(str(txt))
        ys.append(y)
    if not texts:
        raise DataLoadError(f"{path}: no data rows")
    return texts, ys
