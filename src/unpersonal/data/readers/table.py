"""The label CSV shared by the file-based readers (images, DICOM, NIfTI).

    path,pneumonia,patient_id,split
    scans/a.png,1,P001,train

`path` is relative to the dataset folder and may not leave it; every other column but
`patient_id` and `split` is a label column unless `data.label_columns` names them.
Errors name the CSV and its line (line 1 is the header), as a spreadsheet would show it.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from unpersonal.errors import UserError

RESERVED = ("path", "patient_id", "split")
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val",
                 "validation": "val", "test": "test", "testing": "test"}


@dataclass(frozen=True)
class CsvRow:
    line: int
    path: Path
    relative: str
    labels: list[float]
    patient_id: str | None
    split: str | None

    @property
    def ref(self) -> str:
        """How errors and the canonical `ref` column name this row's image."""
        return self.ref_for(None)

    def ref_for(self, part: str | None) -> str:
        """The ref of one part of the file (a DICOM frame, a NIfTI slice)."""
        inside = f" {part}" if part else ""
        return f"{self.relative}{inside} (CSV line {self.line})"


@dataclass(frozen=True)
class CsvTable:
    csv_path: Path
    rows: list[CsvRow]
    label_names: list[str]
    has_patient_column: bool


def find_csv(folder: Path, explicit: Path | None) -> Path:
    """The label CSV: the one given, else the only *.csv in the dataset folder."""
    if explicit is not None:
        if not explicit.is_file():
            raise UserError(f"data.csv: {explicit} does not exist")
        return explicit
    found = sorted(folder.glob("*.csv"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise UserError(f"{folder} has no label CSV (path, label column(s), patient_id[, split]); "
                        "put one in the folder or pass --csv")
    names = ", ".join(path.name for path in found)
    raise UserError(f"{folder} has several CSV files ({names}); choose one with --csv")


def read_table(csv_path: Path, root: Path, label_columns: list[str] | None) -> CsvTable:
    """Parse and check the label CSV; file paths are resolved but not opened here."""
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            header = [name.strip() for name in (reader.fieldnames or [])]
            records = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise UserError(f"cannot read CSV {csv_path}: {error}") from None
    if "path" not in header:
        raise UserError(f"{csv_path} has no 'path' column (columns: {', '.join(header) or 'none'})")
    labels = label_columns or [name for name in header if name not in RESERVED]
    missing = [name for name in labels if name not in header]
    if missing:
        raise UserError(f"{csv_path} has no label column {missing[0]!r} (columns: {', '.join(header)})")
    if not labels:
        raise UserError(f"{csv_path} has no label column: add one besides {', '.join(RESERVED)}")
    if not records:
        raise UserError(f"{csv_path} lists no images: the dataset is empty")
    root = root.resolve()
    rows = [_parse_row(csv_path, root, line, record, labels) for line, record in
            enumerate(({k.strip(): v for k, v in rec.items() if k is not None} for rec in records),
                      start=2)]
    _check_split_column(csv_path, rows, "split" in header)
    return CsvTable(csv_path, rows, labels, "patient_id" in header)


def _parse_row(csv_path: Path, root: Path, line: int, record: dict[str, str | None],
               label_names: list[str]) -> CsvRow:
    where = f"{csv_path.name} line {line}"
    relative = (record.get("path") or "").strip()
    if not relative:
        raise UserError(f"{where}: empty path")
    path = (root / relative).resolve()
    if not path.is_relative_to(root):
        raise UserError(f"{where}: path {relative!r} escapes the dataset folder {root}")
    if path.is_dir():
        raise UserError(f"{where}: path {relative!r} is a folder, not an image file")
    if not path.is_file():
        raise UserError(f"{where}: file {relative!r} does not exist")
    values = [_number(where, name, record.get(name)) for name in label_names]
    patient = (record.get("patient_id") or "").strip() or None
    split_text = (record.get("split") or "").strip().lower()
    split = SPLIT_ALIASES.get(split_text) if split_text else None
    if split_text and split is None:
        raise UserError(f"{where}: split {split_text!r} is not train, val or test")
    return CsvRow(line, path, relative, values, patient, split)


def _number(where: str, column: str, text: str | None) -> float:
    cleaned = (text or "").strip()
    try:
        return float(cleaned)
    except ValueError:
        shown = repr(cleaned) if cleaned else "empty"
        raise UserError(f"{where}: label column {column!r} is {shown}, not a number") from None


def one_line_reason(error: Exception, row: CsvRow) -> str:
    """A library's error message on one line, naming the file as the CSV does, not by full path."""
    text = str(error).replace(str(row.path), row.relative)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return "; ".join(lines) or type(error).__name__


def _check_split_column(csv_path: Path, rows: list[CsvRow], has_column: bool) -> None:
    """A split column must be filled on every row or none: a half-given split is a mistake."""
    if not has_column:
        return
    given = [row.split is not None for row in rows]
    if any(given) and not all(given):
        blank = rows[given.index(False)]
        raise UserError(f"{csv_path.name} line {blank.line}: empty split while other rows have one")
