"""The records store: one CSV file of suite results, appended one finished run at a time.

File format (``fluxbench-records v1``)::

    # fluxbench-records v1
    suite,tier,run,target,model,objective,seed,step,metric,value,stderr,noise_floor,p_value,device,dtype,torch,commit,suite_hash,wall_s,recorded_at
    gmm2d,quick,triangle/flux/mlp/seed0,triangle,mlp,flux,0,0,w2,0.2513,nan,0.2371,nan,cpu,float32,2.5.1,0c8945c,1a2b3c4d5e6f,41.2,2025-01-01T00:00:00+00:00

The first line identifies the file (a foreign CSV is refused instead of being misread), the
second is the exact header; then one row per metric per checkpoint (``step`` = rollout step,
0 where not applicable). Every row is one physical line (fields may not contain newlines),
so a file cut mid-write is recognised: its last line has no newline. Floats are written
with ``repr`` (exact round trip; missing ``stderr``, ``noise_floor``, ``p_value``, ``wall_s``
are ``nan``), so loading gives back the same values and dtypes: ``seed``, ``step`` int64,
the five float columns float64, the rest strings.

The key of a row is ``(suite, tier, run, metric, step, commit, suite_hash)``; a file holds
each key at most once.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import operator
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from fluxbench.fileio import atomic_write

__all__ = ["COLUMNS", "KEY", "MAGIC", "RecordsError", "Records", "merge", "empty_records"]

MAGIC = "# fluxbench-records v1"
COLUMNS: tuple[str, ...] = (
    "suite", "tier", "run", "target", "model", "objective", "seed", "step", "metric", "value",
    "stderr", "noise_floor", "p_value", "device", "dtype", "torch", "commit", "suite_hash",
    "wall_s", "recorded_at",
)  # fmt: skip
KEY: tuple[str, ...] = ("suite", "tier", "run", "metric", "step", "commit", "suite_hash")
INT_COLUMNS = ("seed", "step")
FLOAT_COLUMNS = ("value", "stderr", "noise_floor", "p_value", "wall_s")
STRING_COLUMNS = tuple(c for c in COLUMNS if c not in INT_COLUMNS + FLOAT_COLUMNS)
OPTIONAL_FLOATS = ("stderr", "noise_floor", "p_value", "wall_s")  # default NaN
NONEMPTY = ("suite", "tier", "run", "metric", "commit", "suite_hash")
HEADER = ",".join(COLUMNS)


class RecordsError(ValueError):
    """A records file that is not one, or is damaged (message: ``path:line: problem``)."""


def empty_records() -> pd.DataFrame:
    """A records table with no rows and the columns and dtypes of a loaded file."""
    return _frame({c: [] for c in COLUMNS})


def _frame(cols: Mapping[str, list]) -> pd.DataFrame:
    data = {}
    for c in COLUMNS:
        if c in INT_COLUMNS:
            data[c] = pd.Series(np.asarray(cols[c], dtype=np.int64))
        elif c in FLOAT_COLUMNS:
            data[c] = pd.Series(np.asarray(cols[c], dtype=np.float64))
        else:
            data[c] = pd.Series(cols[c], dtype=str)
    return pd.DataFrame(data)


def _parse(path: Path, text: str) -> pd.DataFrame:
    """Validate and parse the text of a records file; errors name ``path:line``."""
    if not text:
        raise RecordsError(f"{path}:1: empty file, not a fluxbench records file (expected first line {MAGIC!r})")
    lines = text.split("\n")
    if not text.endswith("\n"):
        raise RecordsError(
            f"{path}:{len(lines)}: truncated: the last line has no newline (the file was cut mid-write); "
            "remove the partial line or restore the file"
        )
    lines.pop()  # the empty string after the final newline
    first = lines[0].rstrip("\r")
    if first != MAGIC:
        if first.startswith("# fluxbench-records"):
            raise RecordsError(f"{path}:1: unsupported records version {first!r} (this fluxbench reads {MAGIC!r})")
        raise RecordsError(f"{path}:1: not a fluxbench records file: first line is {first[:80]!r}, expected {MAGIC!r}")
    if len(lines) < 2 or lines[1].rstrip("\r") != HEADER:
        found = lines[1][:200] if len(lines) > 1 else "nothing"
        raise RecordsError(f"{path}:2: wrong header: expected {HEADER!r}, found {found!r}")
    cols: dict[str, list] = {c: [] for c in COLUMNS}
    for lineno, line in enumerate(lines[2:], start=3):
        fields = next(csv.reader([line.rstrip("\r")])) if line.strip() else []
        if len(fields) != len(COLUMNS):
            raise RecordsError(
                f"{path}:{lineno}: expected {len(COLUMNS)} fields, found {len(fields)} (truncated or corrupted row)"
            )
        for c, s in zip(COLUMNS, fields):
            try:
                cols[c].append(_convert(c, s))
            except ValueError as e:
                raise RecordsError(f"{path}:{lineno}: column {c!r}: {e}") from None
    return _frame(cols)


def _convert(column: str, s: str):
    if column in INT_COLUMNS:
        try:
            return int(s)
        except ValueError:
            raise ValueError(f"{s!r} is not an integer") from None
    if column in FLOAT_COLUMNS:
        if s == "" and column in OPTIONAL_FLOATS:
            return math.nan
        try:
            return float(s)
        except ValueError:
            raise ValueError(f"{s!r} is not a number") from None
    if column in NONEMPTY and not s:
        raise ValueError("empty, but it is required")
    return s


def _normalise_rows(rows: Iterable[Mapping]) -> pd.DataFrame:
    """Validate row dicts (every column; optional floats default NaN, ``recorded_at`` now)."""
    if isinstance(rows, Mapping) or isinstance(rows, (str, bytes)):
        raise ValueError("rows must be a list of dicts (one per metric per checkpoint), got a single mapping/string")
    rows = list(rows)
    if not rows:
        raise ValueError("rows is empty: append() takes the rows of one finished run")
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    cols: dict[str, list] = {c: [] for c in COLUMNS}
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise ValueError(f"rows[{i}] must be a dict, got {type(row).__name__}")
        unknown = sorted(set(row) - set(COLUMNS))
        if unknown:
            raise ValueError(f"rows[{i}]: unknown column(s) {unknown}; the columns are {list(COLUMNS)}")
        for c in COLUMNS:
            if c not in row:
                if c in OPTIONAL_FLOATS:
                    cols[c].append(math.nan)
                    continue
                if c == "recorded_at":
                    cols[c].append(now)
                    continue
                raise ValueError(f"rows[{i}]: missing column {c!r}")
            cols[c].append(_check_value(i, c, row[c]))
    return _frame(cols)


def _check_value(i: int, c: str, v):
    where = f"rows[{i}][{c!r}]"
    if c in INT_COLUMNS:
        if isinstance(v, (bool, np.bool_, str)):
            raise ValueError(f"{where} must be an integer, got {v!r}")
        try:
            return operator.index(v)
        except TypeError:
            raise ValueError(f"{where} must be an integer, got {v!r}") from None
    if c in FLOAT_COLUMNS:
        if v is None and c in OPTIONAL_FLOATS:
            return math.nan
        if isinstance(v, (bool, np.bool_, str)):
            raise ValueError(f"{where} must be a number, got {v!r}")
        try:
            return float(v)
        except (TypeError, ValueError):
            raise ValueError(f"{where} must be a number, got {v!r}") from None
    if not isinstance(v, str):
        raise ValueError(f"{where} must be a string, got {type(v).__name__} {v!r}")
    if "\n" in v or "\r" in v:
        raise ValueError(f"{where} contains a newline (every record is one line)")
    if c in NONEMPTY and not v:
        raise ValueError(f"{where} is empty, but it is required")
    return v


def _format(df: pd.DataFrame) -> str:
    """CSV lines (no header) of a validated table; floats by ``repr`` (exact round trip)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    for row in df[list(COLUMNS)].itertuples(index=False, name=None):
        out = []
        for c, v in zip(COLUMNS, row):
            out.append(str(int(v)) if c in INT_COLUMNS else repr(float(v)) if c in FLOAT_COLUMNS else v)
        w.writerow(out)
    return buf.getvalue()


def _duplicates(df: pd.DataFrame) -> pd.DataFrame:
    return df[df.duplicated(subset=list(KEY), keep=False)]


def _describe_key(row) -> str:
    return ", ".join(f"{k}={row[k]!r}" for k in KEY)


def _write_all(fh, data: bytes) -> None:
    """The one write of the new file's bytes (a seam for the crash tests)."""
    fh.write(data)


def _replace(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync, ``os.replace``, fsync the directory."""
    atomic_write(path, lambda fh: _write_all(fh, data), binary=True)
    with contextlib.suppress(OSError, AttributeError):  # durability of the rename; not on Windows
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Serialise read-modify-replace cycles of processes sharing a directory (flock; POSIX)."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock; shards write separate files anyway
        yield
        return
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


class Records:
    """One records file (created with its header on the first :meth:`append`).

    Atomicity: :meth:`append` never modifies the file in place. Under an exclusive lock on
    the directory it reads the current bytes, validates them, writes old bytes + the new
    run's lines to a temporary file in the same directory, fsyncs it and renames it over
    the records file (``os.replace``), then fsyncs the directory. A reader (or a crash at
    any instant) therefore sees either the file before the run or the file with the whole
    run; never half a run, and never a loss of what was recorded before. (An in-place
    ``O_APPEND`` write would be cheaper, but a crash or a full disk during it leaves a
    partial last line that makes the whole file unreadable, and a concurrent reader can
    see half a run.) The cost is a copy of the file per run, which is small (kilobytes
    per run) next to a run's training.

    Args:
        path: the CSV file (``.csv``), which need not exist yet.
    """

    def __init__(self, path: str | os.PathLike):
        if isinstance(path, Records):
            path = path.path
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"Records({str(self.path)!r})"

    def exists(self) -> bool:
        return self.path.exists()

    def load(self) -> pd.DataFrame:
        """The file's rows as a DataFrame (no rows if the file does not exist yet).

        Raises:
            RecordsError: a foreign file, a wrong header or version, a truncated last line,
                a row with the wrong number of fields or a bad value (message names path and line).
        """
        if not self.path.exists():
            return empty_records()
        return _read(self.path)

    def done(self, commit: str, suite_hash: str, *, tier: str | None = None) -> set[str]:
        """Run keys already recorded for ``commit`` and ``suite_hash`` (and ``tier`` if given).

        Runs are appended whole, so a recorded run key is a finished run: the runner skips it.
        """
        df = self.load()
        mask = (df["commit"] == commit) & (df["suite_hash"] == suite_hash)
        if tier is not None:
            mask &= df["tier"] == tier
        return set(df.loc[mask, "run"].tolist())

    def append(self, rows: Sequence[Mapping]) -> pd.DataFrame:
        """Append the rows of one finished run, atomically (see the class docstring).

        Args:
            rows: dicts with every column of :data:`COLUMNS`, except that ``stderr``,
                ``noise_floor``, ``p_value`` and ``wall_s`` default to NaN and ``recorded_at``
                to the current UTC time.

        Returns:
            The appended rows as a DataFrame (the dtypes of :meth:`load`).

        Raises:
            ValueError: a bad row (unknown or missing column, wrong type, newline in a string),
                or a row whose key (:data:`KEY`) is already in the file or repeated in ``rows``.
            RecordsError: the existing file is foreign or damaged (nothing is written).
        """
        new = _normalise_rows(rows)
        dup = _duplicates(new)
        if len(dup):
            raise ValueError(f"rows repeat the key {_describe_key(dup.iloc[0])}")
        with _locked(self.path.parent):
            if self.path.exists():
                old_bytes = self.path.read_bytes()
                old = _parse(self.path, _decode(self.path, old_bytes))
                both = pd.concat([old[list(KEY)], new[list(KEY)]], ignore_index=True)
                dup = _duplicates(both)
                if len(dup):
                    raise ValueError(f"{self.path} already records the key {_describe_key(dup.iloc[0])}")
            else:
                old_bytes = f"{MAGIC}\n{HEADER}\n".encode()
            _replace(self.path, old_bytes + _format(new).encode())
        return new


def _decode(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise RecordsError(f"{path}:{line}: not UTF-8 text, not a fluxbench records file") from None


def _read(path: Path) -> pd.DataFrame:
    if path.is_dir():
        raise RecordsError(f"{path}: is a directory, not a records file")
    return _parse(path, _decode(path, path.read_bytes()))


def merge(paths: Iterable[str | os.PathLike], out: str | os.PathLike) -> pd.DataFrame:
    """Union of records files (the shards of a job array) written to ``out``, atomically.

    Every input is validated like :meth:`Records.load`. Rows with the same key
    (:data:`KEY`: suite, tier, run, metric, step, commit, suite_hash) appear once: the first
    in the order of ``paths``; a repeated key with a different value gives a warning.
    ``out`` may be one of the inputs; an existing ``out`` that is not a records file is refused.

    Returns:
        The merged table.

    Raises:
        RecordsError: an input is missing, foreign or damaged, or ``out`` is a foreign file.
        ValueError: no input paths.
    """
    paths = [Path(p) for p in ([paths] if isinstance(paths, (str, os.PathLike)) else paths)]
    if not paths:
        raise ValueError("merge needs at least one records file")
    out = Path(out)
    frames = []
    for p in paths:
        if not p.exists():
            raise RecordsError(f"{p}: no such records file")
        frames.append(_read(p))
    if out.exists() and out.resolve() not in {p.resolve() for p in paths}:
        _read(out)  # refuse to overwrite a foreign or damaged file
    df = pd.concat(frames, ignore_index=True)
    first = ~df.duplicated(subset=list(KEY), keep="first")
    conflicts = (~first) & ~df.duplicated(subset=list(KEY) + ["value"], keep="first")
    if conflicts.any():
        warnings.warn(
            f"merge: {int(conflicts.sum())} row(s) repeat a key with a different value "
            f"(e.g. {_describe_key(df[conflicts].iloc[0])}); kept the first file's",
            RuntimeWarning,
            stacklevel=2,
        )
    df = df[first].reset_index(drop=True)
    with _locked(out.parent):
        _replace(out, f"{MAGIC}\n{HEADER}\n{_format(df)}".encode())
    return df
