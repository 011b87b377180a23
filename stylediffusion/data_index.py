"""The image and edit index (CSV files under ``data/``), parsed as data, never evaluated as code."""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from . import validate
from .errors import UserError

DEFAULT_DATA_DIR = Path(__file__).resolve().parent.parent / "data"
PROMPTS_FILE = "stylediffusion_prompts.csv"
EDITING_FILE = "stylediffusion_editing.csv"


@dataclass
class ImageRow:
    case_number: int
    prompt: str
    image_path: Path


@dataclass
class EditRow(ImageRow):
    target: str
    blend_word: tuple[str, str] | None
    eq_params: dict | None
    tau_v: float
    tau_c: float | dict
    tau_s: float
    tau_u: float
    edit_type: str


def _literal(cell: str, column: str, where: str):
    """A Python literal (number, tuple, dict) from a cell; empty -> None."""
    cell = (cell or "").strip()
    if not cell:
        return None
    return validate.literal(cell, f"{where}: column '{column}'")


def _number(cell: str, column: str, where: str) -> float:
    try:
        return float(cell)
    except (TypeError, ValueError) as err:
        raise UserError(f"{where}: column '{column}' holds {cell!r}, which is not a number.") from err


def _case_number(row: dict, path: Path, line: int) -> int:
    cell = (row.get("case_number") or "").strip()
    try:
        return int(cell)
    except ValueError as err:
        raise UserError(f"index file '{path}' row {line}: case_number {cell!r} is not a whole number.") from err


def _read(path: Path, required: list[str]) -> list[dict]:
    if not path.is_file():
        raise UserError(f"index file '{path}' does not exist: pass --data_dir pointing at the folder that holds it.")
    try:
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except UnicodeDecodeError as err:
        raise UserError(f"index file '{path}' is not UTF-8 text (byte {err.start}): save it as UTF-8.") from err
    except csv.Error as err:  # e.g. a cell beyond csv's field size limit
        raise UserError(f"index file '{path}' is not a valid CSV file: {err}.") from err
    missing = [c for c in required if rows and c not in rows[0]]
    if missing:
        raise UserError(f"index file '{path}' lacks the column(s) {', '.join(missing)}.")
    for n, row in enumerate(rows):
        if None in row or any(row.get(c) is None for c in required):  # more or fewer cells than columns
            raise UserError(f"index file '{path}' row {n + 2} does not have one cell per column.")
        row["case_number"] = _case_number(row, path, n + 2)
    return rows


def _image_row(row: dict, data_dir: Path, where: str) -> ImageRow:
    prompt = validate.prompt(row["prompt"], f"{where}: column 'prompt'").strip()
    if not row["image_path"].strip():
        raise UserError(f"{where}: column 'image_path' is empty.")
    return ImageRow(row["case_number"], prompt, data_dir / row["image_path"].strip())


def _select(rows: list[dict], idx: int, path: Path) -> list[dict]:
    chosen = [r for r in rows if r["case_number"] == idx]
    if not chosen:
        cases = sorted({r["case_number"] for r in rows})
        raise UserError(f"--idx {idx} is not in '{path}' (cases there: {', '.join(map(str, cases))}).")
    return chosen


def image_row(idx: int, data_dir: Path = DEFAULT_DATA_DIR) -> ImageRow:
    path = Path(data_dir) / PROMPTS_FILE
    row = _select(_read(path, ["case_number", "prompt", "image_path"]), idx, path)[0]
    return _image_row(row, Path(data_dir), f"{path.name} case {idx}")


def edit_rows(idx: int | None = None, data_dir: Path = DEFAULT_DATA_DIR) -> list[EditRow]:
    """Every edit row of case ``idx`` (all rows when ``idx`` is None), in file order."""
    path = Path(data_dir) / EDITING_FILE
    columns = ["case_number", "prompt", "image_path", "target", "blend_word", "eq_params", "tau_v", "tau_c",
               "tau_s", "tau_u", "edit_type"]
    rows = _read(path, columns)
    if idx is not None:
        rows = _select(rows, idx, path)
    out = []
    for n, row in enumerate(rows):
        where = f"{path.name} case {row['case_number']} (row {n + 1})"
        blend = _literal(row["blend_word"], "blend_word", where)
        if isinstance(blend, str):
            blend = tuple(blend.split())
        blend = validate.blend_words(blend or None, f"{where}: column 'blend_word'")
        base = _image_row(row, Path(data_dir), where)
        out.append(
            EditRow(
                base.case_number,
                base.prompt,
                base.image_path,
                validate.prompt(row["target"], f"{where}: column 'target'").strip(),
                blend,
                _literal(row["eq_params"], "eq_params", where),
                _number(row["tau_v"], "tau_v", where),
                _literal(row["tau_c"], "tau_c", where),
                _number(row["tau_s"], "tau_s", where),
                _number(row["tau_u"], "tau_u", where),
                row["edit_type"].strip(),
            )
        )
    return out
