"""Atomic writes: a reader sees the old file or folder or the complete new one, never half of a write."""

from __future__ import annotations

import pytest

from hf_fsad.io import atomic_directory, atomic_file, atomic_write_text


def test_atomic_file_replaces_on_success_and_keeps_the_old_file_when_the_write_raises(tmp_path):
    path = tmp_path / "results.json"
    atomic_write_text(path, "old")
    with pytest.raises(RuntimeError, match="interrupted"), atomic_file(path) as temporary:
        temporary.write_text("half")
        raise RuntimeError("interrupted")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]

    atomic_write_text(path, "new")
    assert path.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_atomic_directory_replaces_a_previous_folder_whole_and_keeps_it_when_the_save_raises(tmp_path):
    folder = tmp_path / "model"
    with atomic_directory(folder) as staging:
        (staging / "config.json").write_text("1")
        (staging / "stale.bin").write_text("x")
    with pytest.raises(RuntimeError, match="interrupted"), atomic_directory(folder) as staging:
        (staging / "config.json").write_text("2")
        raise RuntimeError("interrupted")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "stale.bin"]
    assert (folder / "config.json").read_text() == "1"

    with atomic_directory(folder) as staging:
        (staging / "config.json").write_text("3")
    # the new save replaces the folder: nothing of the previous one is left
    assert sorted(p.name for p in folder.iterdir()) == ["config.json"]
    assert (folder / "config.json").read_text() == "3"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
