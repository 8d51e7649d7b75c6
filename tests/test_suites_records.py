"""The records store: round trip, atomic appends, damaged and foreign files, shard merges."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from fluxbench.suites import records as rec
from fluxbench.suites.records import COLUMNS, MAGIC, Records, RecordsError, merge


def row(run="triangle/flux/mlp/seed0", metric="w2", step=0, value=0.25, **kw):
    target, objective, model, seed = run.split("/")[:4]
    out = dict(
        suite="gmm2d", tier="quick", run=run, target=target, model=model, objective=objective,
        seed=int(seed.removeprefix("seed")), step=step, metric=metric, value=value, device="cpu",
        dtype="float32", torch="2.5.1", commit="abc1234", suite_hash="0123456789ab", wall_s=1.5,
        recorded_at="2025-01-01T00:00:00+00:00",
    )  # fmt: skip
    out.update(kw)
    return out


def run_rows(run="triangle/flux/mlp/seed0", **kw):
    """One run: w2 at two checkpoints, an MMD row with a p-value, a stationarity p-value."""
    return [
        row(run, "w2", 0, 0.5, noise_floor=0.2, stderr=0.01, **kw),
        row(run, "w2", 1000, 0.25, noise_floor=0.2, **kw),
        row(run, "mmd2", 1000, -1e-4, p_value=0.43, **kw),
        row(run, "stationarity", 0, 3.2, p_value=0.012, **kw),
    ]


def test_round_trip_values_and_dtypes(tmp_path):
    r = Records(tmp_path / "sub" / "gmm2d.csv")
    assert r.load().empty and list(r.load().columns) == list(COLUMNS)
    rows = run_rows()
    rows[0]["value"] = 0.1 + 0.2  # not exactly representable in few digits
    r.append(rows)
    df = r.load()
    assert list(df.columns) == list(COLUMNS)
    assert len(df) == 4
    assert df["value"].tolist() == [0.1 + 0.2, 0.25, -1e-4, 3.2]  # exact (repr round trip)
    assert df["seed"].dtype == np.int64 and df["step"].dtype == np.int64
    for c in ("value", "stderr", "noise_floor", "p_value", "wall_s"):
        assert df[c].dtype == np.float64, c
    for c in ("suite", "run", "commit", "recorded_at"):
        assert pd.api.types.is_string_dtype(df[c]), c
    assert math.isnan(df["p_value"].iloc[0]) and df["p_value"].iloc[2] == 0.43  # NaN p-values stay NaN
    assert math.isnan(df["stderr"].iloc[1]) and df["stderr"].iloc[0] == 0.01
    # the file identifies itself
    assert (tmp_path / "sub" / "gmm2d.csv").read_text().splitlines()[0] == MAGIC
    # an empty table has the same dtypes
    assert (rec.empty_records().dtypes == df.dtypes).all()


def test_strings_with_commas_and_quotes_round_trip(tmp_path):
    r = Records(tmp_path / "r.csv")
    r.append([row(run='ring/flux/mlp/seed1/lr=1e-3,"b"', model='mlp,"x"')])
    df = r.load()
    assert df["run"].iloc[0] == 'ring/flux/mlp/seed1/lr=1e-3,"b"' and df["model"].iloc[0] == 'mlp,"x"'


def test_done_lists_recorded_runs_for_commit_and_hash(tmp_path):
    r = Records(tmp_path / "r.csv")
    assert r.done("abc1234", "0123456789ab") == set()
    r.append(run_rows("triangle/flux/mlp/seed0"))
    r.append(run_rows("triangle/dsm/mlp/seed0"))
    r.append(run_rows("ring/dsm/mlp/seed0", commit="other"))
    r.append(run_rows("ring/flux/mlp/seed0", tier="full"))
    assert r.done("abc1234", "0123456789ab", tier="quick") == {"triangle/flux/mlp/seed0", "triangle/dsm/mlp/seed0"}
    assert r.done("abc1234", "0123456789ab") == {
        "triangle/flux/mlp/seed0", "triangle/dsm/mlp/seed0", "ring/flux/mlp/seed0"}  # fmt: skip
    assert r.done("other", "0123456789ab") == {"ring/dsm/mlp/seed0"}
    assert r.done("abc1234", "ffffffffffff") == set()


def test_crash_during_append_keeps_previous_runs_and_no_partial_run(tmp_path, monkeypatch):
    path = tmp_path / "r.csv"
    r = Records(path)
    r.append(run_rows("triangle/flux/mlp/seed0"))
    r.append(run_rows("triangle/dsm/mlp/seed0"))
    before = path.read_bytes()

    def crash(fh, data):  # the process dies after writing part of the new content
        fh.write(data[: len(data) - 37])
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(rec, "_write_all", crash)
    with pytest.raises(KeyboardInterrupt):
        r.append(run_rows("ring/flux/mlp/seed0"))
    monkeypatch.undo()
    assert path.read_bytes() == before
    df = r.load()  # still loads: two complete runs of four rows, nothing of the third
    assert df.groupby("run").size().to_dict() == {"triangle/dsm/mlp/seed0": 4, "triangle/flux/mlp/seed0": 4}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.csv"]  # no temporary file left behind
    r.append(run_rows("ring/flux/mlp/seed0"))  # and the store keeps working
    assert len(r.load()) == 12


def test_crash_before_rename_leaves_file_untouched(tmp_path, monkeypatch):
    path = tmp_path / "r.csv"
    Records(path).append(run_rows())
    before = path.read_bytes()
    monkeypatch.setattr(rec.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        Records(path).append(run_rows("ring/flux/mlp/seed0"))
    assert path.read_bytes() == before


def test_bad_rows_are_refused_before_writing(tmp_path):
    r = Records(tmp_path / "r.csv")
    with pytest.raises(ValueError, match="empty"):
        r.append([])
    with pytest.raises(ValueError, match=r"rows\[0\]: unknown column.*'w2_typo'"):
        r.append([{**row(), "w2_typo": 1.0}])
    bad = row()
    del bad["commit"]
    with pytest.raises(ValueError, match=r"rows\[0\]: missing column 'commit'"):
        r.append([bad])
    with pytest.raises(ValueError, match=r"rows\[1\]\['seed'\] must be an integer"):
        r.append([row(), row(metric="mmd2", seed=0.5)])
    with pytest.raises(ValueError, match=r"\['value'\] must be a number"):
        r.append([row(value="0.3")])
    with pytest.raises(ValueError, match="newline"):
        r.append([row(model="a\nb")])
    with pytest.raises(ValueError, match=r"\['suite'\] is empty"):
        r.append([row(suite="")])
    with pytest.raises(ValueError, match="rows repeat the key"):
        r.append([row(), row()])
    assert not r.exists()
    r.append([row()])
    with pytest.raises(ValueError, match="already records the key"):
        r.append([row(value=0.3)])
    assert len(r.load()) == 1


def write(path, text):
    path.write_text(text)
    return Records(path)


HEAD = f"{MAGIC}\n{rec.HEADER}\n"


def test_foreign_file_is_refused_naming_path_and_line(tmp_path):
    r = write(tmp_path / "other.csv", "a,b,c\n1,2,3\n")
    with pytest.raises(RecordsError, match=r"other\.csv:1: not a fluxbench records file"):
        r.load()
    with pytest.raises(RecordsError, match=r"other\.csv:1: not a fluxbench records file"):
        r.append(run_rows())  # and nothing is appended to it
    assert (tmp_path / "other.csv").read_text() == "a,b,c\n1,2,3\n"
    with pytest.raises(RecordsError, match=r":1: empty file"):
        write(tmp_path / "e.csv", "").load()
    with pytest.raises(RecordsError, match=r":1: unsupported records version"):
        write(tmp_path / "v.csv", "# fluxbench-records v9\n").load()
    with pytest.raises(RecordsError, match=r"h\.csv:2: wrong header"):
        write(tmp_path / "h.csv", f"{MAGIC}\nsuite,tier\n").load()
    (tmp_path / "bin.csv").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    with pytest.raises(RecordsError, match=r"bin\.csv:\d+: not UTF-8"):
        Records(tmp_path / "bin.csv").load()
    assert isinstance(RecordsError("x"), ValueError)


def test_truncated_file_is_refused_naming_the_line(tmp_path):
    path = tmp_path / "r.csv"
    Records(path).append(run_rows())
    full = path.read_text()
    write(path, full[:-10])  # cut mid-line: the last line has no newline
    with pytest.raises(RecordsError, match=r"r\.csv:6: truncated: the last line has no newline"):
        Records(path).load()
    cut = full.splitlines(keepends=True)
    cut[3] = ",".join(cut[3].split(",")[:7]) + "\n"  # a short row in the middle
    write(path, "".join(cut))
    with pytest.raises(RecordsError, match=r"r\.csv:4: expected 20 fields, found 7"):
        Records(path).load()
    cut = full.splitlines(keepends=True)
    cut[2] = cut[2].replace(",0,0,w2,", ",zero,0,w2,")
    write(path, "".join(cut))
    with pytest.raises(RecordsError, match=r"r\.csv:3: column 'seed': 'zero' is not an integer"):
        Records(path).load()
    with pytest.raises(RecordsError, match=r":3: expected 20 fields, found 0"):
        write(path, HEAD + "\n").load()
    assert write(path, HEAD).load().empty


def test_merge_two_shards_drops_duplicates_and_validates(tmp_path):
    a, b, out = tmp_path / "a.csv", tmp_path / "b.csv", tmp_path / "all" / "merged.csv"
    Records(a).append(run_rows("triangle/flux/mlp/seed0"))
    Records(a).append(run_rows("triangle/dsm/mlp/seed0"))
    Records(b).append(run_rows("ring/flux/mlp/seed0"))
    Records(b).append(run_rows("triangle/dsm/mlp/seed0"))  # the same run twice (a retried shard)
    Records(b).append(run_rows("triangle/dsm/mlp/seed0", tier="full"))  # same run key, other tier: kept
    df = merge([a, b], out)
    assert len(df) == 16 and not df.duplicated(subset=list(rec.KEY)).any()
    assert Records(out).load().equals(df)
    assert df.groupby(["tier", "run"]).size().to_dict() == {
        ("full", "triangle/dsm/mlp/seed0"): 4,
        ("quick", "ring/flux/mlp/seed0"): 4,
        ("quick", "triangle/dsm/mlp/seed0"): 4,
        ("quick", "triangle/flux/mlp/seed0"): 4,
    }
    assert merge([out, a], out).equals(df)  # out may be an input; idempotent
    write(b, b.read_text()[:-3])
    with pytest.raises(RecordsError, match=r"b\.csv:\d+: truncated"):
        merge([a, b], out)
    with pytest.raises(RecordsError, match="no such records file"):
        merge([a, tmp_path / "missing.csv"], out)
    foreign = write(tmp_path / "notes.csv", "x,y\n").path
    with pytest.raises(RecordsError, match=r"notes\.csv:1: not a fluxbench"):
        merge([a], foreign)
    assert foreign.read_text() == "x,y\n"
    with pytest.raises(ValueError, match="at least one"):
        merge([], out)


def test_merge_warns_on_conflicting_values(tmp_path):
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    Records(a).append([row(value=0.25)])
    Records(b).append([row(value=0.26)])
    with pytest.warns(RuntimeWarning, match="1 row.*different value"):
        df = merge([a, b], tmp_path / "m.csv")
    assert df["value"].tolist() == [0.25]


def test_concurrent_appends_lose_nothing(tmp_path):
    """Read-modify-replace under a directory lock: appends from threads (own file handles) all land."""
    import threading

    def worker(k):
        for i in range(5):
            Records(tmp_path / "r.csv").append(run_rows(f"t{k}/flux/mlp/seed{i}"))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    df = Records(tmp_path / "r.csv").load()
    assert df["run"].nunique() == 20 and len(df) == 80
