"""learnforget.files: the one atomic writer, the one atomic folder and the one lock."""
from __future__ import annotations

import pytest

from learnforget.files import atomic_dir, atomic_write_json, read_json


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name)


def test_atomic_dir_renames_a_finished_folder_into_place(tmp_path):
    dest = tmp_path / "models" / "m"
    with atomic_dir(dest) as build:
        assert not build.exists() and build.parent.parent == dest.parent
        build.mkdir()
        (build / "a.txt").write_text("new")
        assert not dest.exists()
    assert (dest / "a.txt").read_text() == "new"
    assert _leftovers(dest.parent) == []


def test_atomic_dir_replaces_or_keeps_an_existing_folder(tmp_path):
    dest = tmp_path / "m"
    dest.mkdir()
    (dest / "a.txt").write_text("old")
    with atomic_dir(dest, replace=False) as build:  # a racing process's copy wins
        build.mkdir()
        (build / "a.txt").write_text("new")
    assert (dest / "a.txt").read_text() == "old"
    with atomic_dir(dest) as build:
        build.mkdir()
        (build / "b.txt").write_text("new")
    assert sorted(p.name for p in dest.iterdir()) == ["b.txt"]
    assert _leftovers(tmp_path) == []


def test_atomic_dir_leaves_nothing_when_the_build_fails(tmp_path):
    dest = tmp_path / "m"
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(dest) as build:
            build.mkdir()
            (build / "half.bin").write_bytes(b"x")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_json_sort_keys(tmp_path):
    atomic_write_json(tmp_path / "a.json", {"b": 1, "a": 2}, sort_keys=True)
    assert (tmp_path / "a.json").read_text().index('"a"') < (tmp_path / "a.json").read_text().index('"b"')
    assert read_json(tmp_path / "a.json") == {"a": 2, "b": 1}
    assert read_json(tmp_path / "missing.json") is None
