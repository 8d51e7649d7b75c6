"""The calibration's CSV files: read (refusing a truncated or foreign file) and append per case.

``calibration.csv`` holds one row per case x method x alpha, ``pvalues.csv`` one row per
case x seed. Both are rewritten whole, atomically (:func:`fluxbench.fileio.write_text`),
after every case: an interrupted run loses at most the case in progress, and a rerun
skips the cases already stored.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pandas as pd

from fluxbench.fileio import write_text

from .cases import CASES

__all__ = ["read_table", "append_case", "in_case_order"]


def read_table(path: Path) -> pd.DataFrame | None:
    """The table at ``path`` (None if absent or empty), refusing a truncated or foreign file.

    pandas alone accepts a file cut mid-row (it pads the short row with NaN), so the
    resumable run would keep a half-written case as if it were complete.

    Raises:
        ValueError: naming the file (and the line) when the header is not a calibration
            table's, the last line has no newline, or a row has another number of fields
            than the header.
    """
    if not (path.exists() and path.stat().st_size > 0):
        return None
    text = path.read_text()
    rows = list(csv.reader(io.StringIO(text)))
    header = rows[0]
    if "case" not in header or ("seed" not in header and "method" not in header):
        raise ValueError(f"{path} is not a calibration table (header {header[:4]}...); move it away or pass another --out")
    if not text.endswith("\n"):
        raise ValueError(f"{path} is truncated: its last line ends without a newline; delete that line or the file")
    short = next((i for i, r in enumerate(rows[1:], start=2) if len(r) != len(header)), None)
    if short is not None:
        raise ValueError(
            f"{path}:{short}: {len(rows[short - 1])} fields where the header has {len(header)} "
            "(truncated or corrupted row); delete that row or the file"
        )
    return pd.read_csv(io.StringIO(text), keep_default_na=False, na_values=["nan", "NaN", ""])


def append_case(path: Path, new: pd.DataFrame, case: str) -> pd.DataFrame:
    """Replace the rows of ``case`` in the table at ``path`` by ``new``; return the whole table."""
    old = read_table(path)
    if old is not None:
        old = old[old["case"] != case]
        new = pd.concat([old, new], ignore_index=True)
    buf = io.StringIO()
    new.to_csv(buf, index=False)
    write_text(path, buf.getvalue())
    return new


def in_case_order(table: pd.DataFrame) -> pd.DataFrame:
    """Rows sorted by the order of :data:`~.cases.CASES` (stable within a case)."""
    order = {c.name: i for i, c in enumerate(CASES)}
    return table.sort_values(by=["case"], key=lambda s: s.map(order), kind="stable")
