"""Atomic writes (xpert_fl.files): the target is replaced whole or left as it was, nothing is left beside it,
and the result has the permissions a plain write would give."""

from __future__ import annotations

import pytest

from xpert_fl.files import atomic_dir, atomic_file, atomic_write_bytes, atomic_write_text


def test_writes_replace_the_target_and_leave_nothing_beside_it(tmp_path):
    path = tmp_path / "a.json"
    atomic_write_text(path, "old")
    atomic_write_text(path, "néw")
    assert path.read_text(encoding="utf-8") == "néw"
    atomic_write_bytes(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    with atomic_file(path, fsync=True) as tmp:
        tmp.write_text("synced")
    assert path.read_text() == "synced"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_a_failed_write_leaves_the_target_as_it_was(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("kept")
    with pytest.raises(RuntimeError), atomic_file(path) as tmp:
        tmp.write_text("partial")
        raise RuntimeError("crash")
    assert path.read_text() == "kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_permissions_are_those_of_a_plain_write(tmp_path):
    plain = tmp_path / "plain"
    plain.write_text("x")
    (tmp_path / "plain_dir").mkdir()
    atomic_write_text(tmp_path / "atomic", "x")
    with atomic_dir(tmp_path / "atomic_dir"):
        pass
    assert (tmp_path / "atomic").stat().st_mode == plain.stat().st_mode
    assert (tmp_path / "atomic_dir").stat().st_mode == (tmp_path / "plain_dir").stat().st_mode


def test_a_directory_replaces_an_existing_one_or_nothing(tmp_path):
    target = tmp_path / "set"
    target.mkdir()
    (target / "stale").write_text("x")
    with atomic_dir(target) as tmp:
        (tmp / "new").write_text("y")
    assert sorted(p.name for p in target.iterdir()) == ["new"]
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "partial").write_text("z")
        raise RuntimeError("crash")
    assert sorted(p.name for p in target.iterdir()) == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]
