"""Atomic writes (fluxbench.fileio): complete files only, with ordinary permissions."""

from __future__ import annotations

import os

import pytest

from fluxbench.fileio import atomic_write, write_text


def test_written_file_has_the_mode_open_would_give(tmp_path):
    mask = os.umask(0o022)
    try:
        path = write_text(tmp_path / "a.txt", "hello")
        assert path.read_text() == "hello"
        assert path.stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(mask)


def test_interrupted_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    path = write_text(tmp_path / "a.txt", "old")

    def fail(fh):
        fh.write("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, fail)
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]
